#include "prefill/prefill_engine.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "common/crc32c.h"
#include "common/log.h"
#include "engine/policy_cache.h"
#include "engine/sampler.h"
#include "kvstore/footprint.h"
#include "kvstore/page_pool.h"
#include "kvstore/wire_image.h"
#include "prefill/job_check.h"

namespace kvgate::prefill {

namespace {

// How long the engine sleeps between transport polls while a job waits
// (on a message, a connection or a transfer). Waits also wake at once on a
// message or a cancel; only transport progress is polled.
constexpr auto kPollInterval = std::chrono::milliseconds(1);
// Between jobs: how often an idle engine polls the transport (handshakes
// and goodbyes of its peers keep flowing).
constexpr auto kIdlePoll = std::chrono::milliseconds(20);

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string bytes_text(uint64_t n) { return std::to_string(n) + " bytes"; }

}  // namespace

// One job of the running batch.
struct PrefillEngine::JobRun {
  QueuedJob* job = nullptr;
  RequestId id;
  JobFailure cause = JobFailure::kEngine;
  Status status;  // the first failure; the job gets no more work after it
  std::unique_ptr<kvstore::PagePool> pool;
  std::vector<float> logits;
  transport::PeerId peer;
  uint64_t granted = 0;
  control::Bytes grant;
  transport::TransferId transfer;
  bool begun = false;      // begin_send done
  bool cancel_sent = false;
  Clock::time_point transfer_deadline;
  Clock::time_point transfer_start;
  // One staging buffer per wire segment (the transport reads it until the
  // transfer's event), with its manifest entry; segments[i] for buffer i.
  std::vector<std::vector<std::byte>> staging;
  std::vector<control::TransferSegment> segments;
  size_t sent = 0;          // segments issued to the transport
  uint64_t staged_bytes = 0;
  std::optional<control::ExtendResult> extend_result;
  std::optional<Status> decode_error;
};

PrefillCompute PrefillCompute::cpu(engine::CpuForward& forward) {
  PrefillCompute c;
  c.config = forward.model().config();
  c.run = [&forward](std::span<engine::CompressedPrefillJob> jobs,
                     const std::function<Status(int64_t)>& on_layer) {
    return engine::prefill_compressed_batch(forward, jobs, on_layer);
  };
  return c;
}

PrefillEngine::PrefillEngine(PrefillCompute compute, transport::Transport& transport,
                             JobQueue& queue, ControlLinks& links, PrefillMetrics& metrics,
                             EngineSettings settings)
    : compute_(std::move(compute)),
      transport_(transport),
      queue_(queue),
      links_(links),
      metrics_(metrics),
      settings_(settings) {}

PrefillEngine::~PrefillEngine() = default;

void PrefillEngine::run() {
  auto batchable = [](const QueuedJob& q) { return !engine::policy_needs_stats(q.plan->config); };
  while (true) {
    std::vector<QueuedJob> jobs =
        queue_.next_jobs(kIdlePoll, settings_.max_batch_jobs, settings_.max_batch_tokens, batchable);
    if (jobs.empty()) {
      if (queue_.closed()) break;
      pump();
      continue;
    }
    const QueueStats q = queue_.stats();
    metrics_.set_queue(q.queued_jobs, q.queued_tokens);
    run_batch(jobs);
    for (const QueuedJob& job : jobs) queue_.finish_running(job.job.request_id);
  }
}

void PrefillEngine::pump() {
  transport_.progress(events_);
  // Events nobody waits for: transfers abandoned earlier (their staging
  // buffers can go now) or late duplicates.
  if (!active_.empty()) return;
  for (const transport::TransferEvent& e : events_) {
    orphaned_.erase({e.peer.value(), e.id.value()});
    if (e.side == transport::TransferSide::kSend) {
      log::debug("transfer event after its job ended",
                 {{"lease", e.id.value()}, {"status", e.status}});
    }
  }
  events_.clear();
  drain_messages();
}

void PrefillEngine::drain_messages() {
  for (control::Message& m : queue_.take_messages()) {
    std::visit(
        [&](auto& msg) {
          using T = std::decay_t<decltype(msg)>;
          if constexpr (std::is_same_v<T, control::ExtendResult>) {
            auto it = active_.find(msg.request_id);
            if (it != active_.end()) {
              it->second->extend_result = std::move(msg);
            } else {
              log::info("extend result for no running job dropped", {{"request", msg.request_id}});
            }
          } else if constexpr (std::is_same_v<T, control::TransferResult>) {
            // The decode node adopted (or refused) the KV; it tells the
            // coordinator itself, so this is for the log.
            if (msg.code == StatusCode::kOk) {
              log::info("decode node adopted the KV", {{"request", msg.request_id}});
            } else {
              log::warn("decode node refused the KV",
                        {{"request", msg.request_id}, {"status", msg.status()}});
            }
          } else if constexpr (std::is_same_v<T, control::Error>) {
            auto it = active_.find(msg.request_id);
            if (it != active_.end()) {
              it->second->decode_error = msg.status();
            } else {
              log::warn("error from a decode node",
                        {{"request", msg.request_id}, {"status", msg.status()}});
            }
          }
        },
        m);
  }
}

template <typename Ready>
Status PrefillEngine::wait_for(const JobRun& run, Ready ready, Clock::time_point deadline,
                               const char* what) {
  while (true) {
    transport_.progress(events_);
    drain_messages();
    if (ready()) return Status();
    if (queue_.cancel_requested(run.id)) return Status(StatusCode::kCancelled, "cancelled");
    if (queue_.closed()) return unavailable("prefill node is shutting down");
    if (Clock::now() >= deadline) {
      return Status(StatusCode::kDeadlineExceeded, std::string("deadline passed waiting for ") + what);
    }
    queue_.wait(kPollInterval);
  }
}

Result<transport::PeerId> PrefillEngine::peer_for(const control::Bytes& address) {
  auto it = peers_.find(address);
  if (it != peers_.end()) return it->second;
  auto peer = transport_.connect(address);
  if (!peer.ok()) {
    return Status(peer.status().code(),
                  "decode_transport_address: " + peer.status().message());
  }
  peers_.emplace(address, *peer);
  return *peer;
}

Status PrefillEngine::wait_decode_link(const JobRun& run, Clock::time_point deadline) {
  const std::string& address = run.job->job.decode_control_address;
  Status state;
  Status s = wait_for(
      run,
      [&] {
        state = links_.decode_state(address);
        return state.code() != StatusCode::kInProgress;
      },
      deadline, "the decode node's control connection");
  if (!s.ok()) return s;
  if (!state.ok()) {
    return unavailable("decode node " + address + ": control connection: " + state.message());
  }
  return Status();
}

Status PrefillEngine::extend(JobRun& run, int64_t needed_bytes) {
  const control::PrefillJob& j = run.job->job;
  const uint64_t needed = static_cast<uint64_t>(needed_bytes);
  const std::string prefix =
      "needs " + bytes_text(needed) + ", granted " + std::to_string(run.granted) + ": ";
  control::Extend ext{j.request_id, j.lease_id, needed - run.granted};
  log::info("extend requested", {{"request", j.request_id},
                                 {"lease", j.lease_id},
                                 {"needed_bytes", needed},
                                 {"granted_bytes", run.granted},
                                 {"transfer_begun", run.begun}});
  if (Status s = links_.send_decode(j.decode_control_address, ext); !s.ok()) {
    run.cause = JobFailure::kDecodeUnreachable;
    return s;
  }
  Status s = wait_for(
      run, [&] { return run.extend_result.has_value() || run.decode_error.has_value(); },
      run.job->deadline, "the decode node's ExtendResult");
  if (!s.ok()) {
    if (s.code() == StatusCode::kUnavailable) run.cause = JobFailure::kDecodeUnreachable;
    return s;
  }
  run.cause = JobFailure::kExtendRefused;
  if (run.decode_error) {
    metrics_.extend(false);
    return resource_exhausted(prefix + run.decode_error->to_string());
  }
  const control::ExtendResult r = std::move(*run.extend_result);
  run.extend_result.reset();
  if (r.code != StatusCode::kOk) {
    metrics_.extend(false);
    return resource_exhausted(prefix + r.status().to_string());
  }
  if (r.granted_bytes < needed || r.pool_descriptor.empty()) {
    metrics_.extend(false);
    return resource_exhausted(prefix + "the extension granted only " +
                              std::to_string(r.granted_bytes) + " bytes");
  }
  if (run.begun) {
    // The receive grew in place; the sender's view of it must too.
    if (Status g = transport_.extend_send(run.peer, run.transfer, r.pool_descriptor); !g.ok()) {
      metrics_.extend(false);
      run.cause = JobFailure::kTransfer;
      return Status(g.code(), "transfer: extend: " + g.message());
    }
  }
  metrics_.extend(true);
  log::info("extend granted", {{"request", j.request_id}, {"granted_bytes", r.granted_bytes}});
  run.granted = r.granted_bytes;
  run.grant = r.pool_descriptor;
  return Status();
}

bool PrefillEngine::start(JobRun& run) {
  const control::PrefillJob& j = run.job->job;
  metrics_.job_started();
  log::info("prefill job started",
            {{"request", j.request_id},
             {"prompt_tokens", j.prompt_token_ids.size()},
             {"policy", j.kv_policy.name},
             {"queued_ms", Clock::now() - run.job->received_at}});
  if (Clock::now() >= run.job->deadline) {
    run.cause = JobFailure::kDeadline;
    end_job(run, Status(StatusCode::kDeadlineExceeded,
                        "the job's deadline (deadline_in " + std::to_string(j.deadline_in.count()) +
                            " ms) passed while it was queued"));
    return false;
  }
  // Connections first, so they open while the prefill computes.
  links_.open_decode(j.decode_control_address);
  auto peer = peer_for(j.decode_transport_address);
  if (!peer.ok()) {
    run.cause = JobFailure::kDecodeUnreachable;
    end_job(run, peer.status());
    return false;
  }
  run.peer = *peer;
  run.granted = j.granted_bytes;
  run.grant = j.pool_descriptor;
  run.transfer = transport::TransferId(j.lease_id.value());
  run.logits.resize(static_cast<size_t>(compute_.config.n_vocab));
  const auto n = static_cast<int64_t>(j.prompt_token_ids.size());
  // A pool per job, sized for this prompt under this policy: the arena is
  // uninitialized memory, so its size costs nothing until pages are used,
  // and the node never holds the worst case (a full context, dense) idle.
  auto bytes = engine::compressed_pool_bytes(run.job->plan->layout, n, settings_.page_bytes);
  if (bytes.ok()) {
    auto pool = kvstore::PagePool::create(settings_.page_bytes, *bytes);
    if (pool.ok()) {
      run.pool = std::move(*pool);
      return true;
    }
    bytes = pool.status();
  }
  end_job(run, bytes.status());
  return false;
}

Status PrefillEngine::stage_segment(JobRun& run, std::span<const kvstore::PageId> pages,
                                    const kvstore::PagePool& pool) {
  if (pages.empty()) return run.status;  // no tokens in these slots: no segment
  const auto page_bytes = static_cast<size_t>(settings_.page_bytes);
  std::vector<std::byte> buf(pages.size() * page_bytes);
  // The checksum is taken page by page right after each copy, while the
  // page is in cache; the transport gets it and does not read the bytes
  // again.
  uint32_t crc = 0;
  for (size_t i = 0; i < pages.size(); ++i) {
    std::byte* dst = buf.data() + i * page_bytes;
    std::memcpy(dst, pool.data(pages[i]), page_bytes);
    crc = crc32c(dst, page_bytes, crc);
  }
  const uint64_t length = buf.size();
  run.segments.push_back({run.staged_bytes, length, crc});
  run.staged_bytes += length;
  run.staging.push_back(std::move(buf));
  ship_ready(run);
  return run.status;
}

void PrefillEngine::ship_ready(JobRun& run) {
  while (run.status.ok() && run.sent < run.segments.size()) {
    const control::TransferSegment& seg = run.segments[run.sent];
    // Past the grant: held until the Extend after the prefill.
    if (seg.offset_bytes + seg.length_bytes > run.granted) return;
    // A job without a deadline gives no bound for a transfer that spans the
    // rest of the prefill: it ships after the prefill, under
    // transport.transfer_deadline from its start.
    if (!run.begun && in_prefill_ && run.job->deadline == Clock::time_point::max()) return;
    if (!run.begun) {
      run.transfer_start = Clock::now();
      // Started during the prefill, the transfer lasts as long as the rest
      // of it: bounded by the job's deadline (which the coordinator sized
      // for the prefill); started after it, by transport.transfer_deadline.
      run.transfer_deadline = std::min(run.job->deadline, run.transfer_start + settings_.transfer_deadline);
      if (in_prefill_) run.transfer_deadline = run.job->deadline;
      if (Status s = transport_.begin_send(run.peer, run.transfer, run.grant, run.transfer_deadline);
          !s.ok()) {
        run.cause = JobFailure::kTransfer;
        run.status = Status(s.code(), "transfer: " + s.message());
        return;
      }
      run.begun = true;
    }
    Status s = transport_.send_segment(run.peer, run.transfer, static_cast<uint32_t>(run.sent),
                                       run.staging[run.sent].data(), seg.length_bytes,
                                       seg.offset_bytes, seg.crc32c);
    if (!s.ok()) {
      run.cause = JobFailure::kTransfer;
      run.status = Status(s.code(), "transfer: " + s.message());
      return;
    }
    ++run.sent;
    metrics_.segment_sent(in_prefill_);
  }
}

Status PrefillEngine::between_layers() {
  transport_.progress(events_);
  drain_messages();
  bool any_alive = false;
  for (auto& [id, run] : active_) {
    if (!run->status.ok()) continue;
    if (queue_.cancel_requested(id)) {
      run->status = Status(StatusCode::kCancelled, "cancelled");
      continue;
    }
    if (queue_.closed()) {
      run->status = unavailable("prefill node is shutting down");
      continue;
    }
    any_alive = true;
  }
  // Nobody left to compute for: stop the prefill early.
  if (!any_alive) return Status(StatusCode::kCancelled, "every job of the batch ended");
  return Status();
}

void PrefillEngine::abandon_transfer(JobRun& run) {
  if (!run.begun) return;
  if (!run.cancel_sent) (void)transport_.cancel_send(run.peer, run.transfer);
  run.cancel_sent = true;
  orphaned_[{run.peer.value(), run.transfer.value()}] = std::move(run.staging);
  run.staging.clear();
}

void PrefillEngine::end_job(JobRun& run, const Status& s) {
  const control::PrefillJob& j = run.job->job;
  if (s.ok()) {
    metrics_.job_done();
  } else if (s.code() == StatusCode::kCancelled && queue_.cancel_requested(run.id)) {
    metrics_.job_failed(JobFailure::kCancelled);
    log::info("prefill job cancelled", {{"request", j.request_id}});
  } else {
    JobFailure cause = run.cause;
    if (s.code() == StatusCode::kDeadlineExceeded) cause = JobFailure::kDeadline;
    metrics_.job_failed(cause);
    log::warn("prefill job failed",
              {{"request", j.request_id}, {"cause", job_failure_name(cause)}, {"status", s}});
    links_.reply(*run.job, control::Error{j.request_id, s.code(), s.message()});
  }
}

void PrefillEngine::run_batch(std::vector<QueuedJob>& jobs) {
  std::vector<std::unique_ptr<JobRun>> runs;
  std::vector<engine::CompressedPrefillJob> batch;
  std::vector<JobRun*> in_batch;
  for (QueuedJob& job : jobs) {
    auto run = std::make_unique<JobRun>();
    run->job = &job;
    run->id = job.job.request_id;
    if (start(*run)) {
      JobRun* r = run.get();
      active_[r->id] = r;
      in_batch.push_back(r);
      batch.push_back(engine::CompressedPrefillJob{
          job.plan, job.job.prompt_token_ids, r->pool.get(), r->logits,
          [this, r](int64_t, const kvstore::WireSlotGroup&, std::span<const kvstore::PageId> pages) {
            return stage_segment(*r, pages, *r->pool);
          }});
    }
    runs.push_back(std::move(run));
  }
  if (!batch.empty()) {
    int64_t tokens = 0;
    for (const JobRun* r : in_batch) tokens += static_cast<int64_t>(r->job->job.prompt_token_ids.size());
    log::info("prefill batch", {{"jobs", in_batch.size()}, {"prompt_tokens", tokens}});
    const auto t0 = Clock::now();
    in_prefill_ = true;
    auto results = compute_.run(
        batch, [this, last = compute_.config.n_layers - 1](int64_t layer) {
          // Segments of the last layer ship after the prefill's compute
          // (the GPU form reports layer -1 between jobs: still computing).
          if (layer + 1 == last) in_prefill_ = false;
          return between_layers();
        });
    in_prefill_ = false;
    pass_end_ = Clock::now();
    const double batch_s = seconds(pass_end_ - t0);
    metrics_.batch(static_cast<int64_t>(in_batch.size()), tokens, batch_s);
    for (size_t i = 0; i < in_batch.size(); ++i) {
      JobRun& run = *in_batch[i];
      Status s = run.status;
      if (s.ok() && !results.ok()) s = results.status();
      if (s.ok() && !(*results)[i].ok()) s = (*results)[i].status();
      if (s.ok()) {
        engine::CompressedPrefill& pre = *(*results)[i];
        s = complete(run, pre.cache, batch_s);
      }
      if (!s.ok()) abandon_transfer(run);
      end_job(run, s);
      active_.erase(run.id);
    }
  }
  active_.clear();
}

Status PrefillEngine::complete(JobRun& run, kvstore::CompressedKvCache& cache, double prefill_s) {
  const control::PrefillJob& j = run.job->job;
  const kvstore::KvLayout& layout = run.job->plan->layout;
  const std::span<const int32_t> tokens(j.prompt_token_ids);
  const auto n = static_cast<int64_t>(tokens.size());
  run.cause = JobFailure::kEngine;
  metrics_.prefill_done(n, prefill_s);
  engine::Sampler sampler(sampling_params(j.generation.sampling));
  const int32_t first_token = sampler.sample(run.logits, tokens);
  const int64_t actual_bytes = cache.bytes();
  const int64_t dense_bytes = kvstore::dense_bytes(layout, n);
  const double keep_rate = engine::cache_keep_rate(cache);
  log::info("prefill done", {{"request", j.request_id},
                             {"prompt_tokens", n},
                             {"seconds", prefill_s},
                             {"first_token", first_token},
                             {"kv_bytes", actual_bytes},
                             {"kv_capacity_bytes", cache.capacity_bytes()},
                             {"dense_bytes", dense_bytes},
                             {"keep_rate", keep_rate},
                             {"segments_in_flight", run.sent}});
  if (queue_.cancel_requested(run.id)) return Status(StatusCode::kCancelled, "cancelled");

  KVGATE_ASSIGN_OR_RETURN(kvstore::WireImage image, kvstore::export_wire_image(cache));
  const int64_t needed = image.total_bytes();
  if (static_cast<uint64_t>(needed) != run.staged_bytes || image.segments.size() != run.segments.size()) {
    return internal_error("wire image of " + bytes_text(static_cast<uint64_t>(needed)) + " in " +
                          std::to_string(image.segments.size()) + " segments, but " +
                          bytes_text(run.staged_bytes) + " in " + std::to_string(run.segments.size()) +
                          " were staged");
  }

  run.cause = JobFailure::kDecodeUnreachable;
  KVGATE_RETURN_IF_ERROR(wait_decode_link(run, run.job->deadline));
  if (static_cast<uint64_t>(needed) > run.granted) KVGATE_RETURN_IF_ERROR(extend(run, needed));
  run.cause = JobFailure::kTransfer;
  ship_ready(run);
  KVGATE_RETURN_IF_ERROR(run.status);
  if (!run.begun) {
    // An empty image cannot happen (a prompt has tokens); keep the promise
    // of one event anyway by refusing to go on.
    return internal_error("transfer: nothing was shipped");
  }
  if (Status s = transport_.finish(run.peer, run.transfer); !s.ok()) {
    return Status(s.code(), "transfer: " + s.message());
  }

  control::TransferManifest manifest;
  manifest.request_id = j.request_id;
  manifest.lease_id = j.lease_id;
  manifest.layout_version = kvstore::kWireImageVersion;
  manifest.layout_descriptor = image.descriptor;
  manifest.segments = run.segments;
  manifest.actual_bytes = static_cast<uint64_t>(actual_bytes);
  manifest.dense_bytes = static_cast<uint64_t>(dense_bytes);
  manifest.keep_rate = keep_rate;
  manifest.prompt_tokens = static_cast<uint32_t>(n);
  manifest.first_token_id = first_token;
  manifest.generation = j.generation;
  manifest.kv_policy = j.kv_policy;
  {
    const auto window = static_cast<size_t>(std::max<int32_t>(0, j.generation.sampling.repetition_window));
    const size_t tail = std::min(window, tokens.size());
    manifest.prompt_tail_token_ids.assign(tokens.end() - static_cast<std::ptrdiff_t>(tail), tokens.end());
  }

  // The transfer's one event. A cancel or shutdown cancels the send and
  // keeps waiting: the staging buffers must outlive what was issued.
  std::optional<transport::TransferEvent> event;
  const auto give_up = run.transfer_deadline + settings_.quiesce_timeout + std::chrono::seconds(5);
  while (!event) {
    transport_.progress(events_);
    drain_messages();
    for (auto it = events_.begin(); it != events_.end(); ++it) {
      if (it->side == transport::TransferSide::kSend && it->id == run.transfer && it->peer == run.peer) {
        event = *it;
        events_.erase(it);
        break;
      }
    }
    if (event) break;
    if (!run.cancel_sent && (queue_.cancel_requested(run.id) || queue_.closed())) {
      (void)transport_.cancel_send(run.peer, run.transfer);
      run.cancel_sent = true;
    }
    if (Clock::now() > give_up) {
      // The transport broke its promise of one event per transfer: keep
      // the buffers for when the event comes, and fail the job.
      return internal_error("transfer: no event from the transport past its deadline");
    }
    queue_.wait(kPollInterval);
  }
  run.begun = false;  // the transfer is over: nothing reads the buffers any more
  run.staging.clear();
  if (!event->status.ok()) {
    metrics_.transfer_failed(transfer_failure_of(event->status.code()));
    if (event->status.code() == StatusCode::kUnavailable) peers_.erase(j.decode_transport_address);
    if (event->status.code() == StatusCode::kCancelled && queue_.closed()) {
      return unavailable("prefill node is shutting down");
    }
    return Status(event->status.code(), "transfer: " + event->status.message());
  }
  const double transfer_s = seconds(event->elapsed);
  const double exposed_s = seconds(Clock::now() - pass_end_);
  metrics_.transfer_done(needed, transfer_s, exposed_s);
  metrics_.kv_shipped(dense_bytes, actual_bytes, needed, keep_rate);
  log::info("kv shipped", {{"request", j.request_id},
                           {"lease", j.lease_id},
                           {"wire_bytes", needed},
                           {"segments", manifest.segments.size()},
                           {"seconds", transfer_s},
                           {"exposed_seconds", exposed_s}});

  run.cause = JobFailure::kDecodeUnreachable;
  if (Status s = links_.send_decode(j.decode_control_address, manifest); !s.ok()) return s;
  log::info("manifest sent", {{"request", j.request_id}, {"decode", j.decode_control_address}});
  return Status();
}

}  // namespace kvgate::prefill
