#include "prefill/prefill_engine.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
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

PrefillEngine::PrefillEngine(engine::CpuForward& forward, transport::Transport& transport,
                             JobQueue& queue, ControlLinks& links, PrefillMetrics& metrics,
                             EngineSettings settings)
    : forward_(forward),
      transport_(transport),
      queue_(queue),
      links_(links),
      metrics_(metrics),
      settings_(settings),
      logits_(static_cast<size_t>(forward.model().config().n_vocab)) {}

PrefillEngine::~PrefillEngine() = default;

void PrefillEngine::run() {
  while (true) {
    std::optional<QueuedJob> job = queue_.next_job(kIdlePoll);
    if (!job) {
      if (queue_.closed()) break;
      pump();
      continue;
    }
    const QueueStats q = queue_.stats();
    metrics_.set_queue(q.queued_jobs, q.queued_tokens);
    handle(*job);
    queue_.finish_running();
  }
}

void PrefillEngine::pump() {
  transport_.progress(events_);
  // Events nobody waits for: transfers abandoned earlier (their staging
  // buffer can go now) or late duplicates.
  if (current_.valid()) return;
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
            if (current_.valid() && msg.request_id == current_) {
              extend_result_ = std::move(msg);
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
            if (current_.valid() && msg.request_id == current_) {
              decode_error_ = msg.status();
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
Status PrefillEngine::wait_for(Ready ready, Clock::time_point deadline, const char* what) {
  while (true) {
    transport_.progress(events_);
    drain_messages();
    if (ready()) return Status();
    if (queue_.cancel_requested()) return Status(StatusCode::kCancelled, "cancelled");
    if (queue_.closed()) return unavailable("prefill node is shutting down");
    if (Clock::now() >= deadline) {
      return Status(StatusCode::kDeadlineExceeded, std::string("deadline passed waiting for ") + what);
    }
    queue_.wait(kPollInterval);
  }
}

void PrefillEngine::handle(QueuedJob& job) {
  const control::PrefillJob& j = job.job;
  current_ = j.request_id;
  extend_result_.reset();
  decode_error_.reset();
  metrics_.job_started();
  log::info("prefill job started",
            {{"request", j.request_id},
             {"prompt_tokens", j.prompt_token_ids.size()},
             {"policy", j.kv_policy.name},
             {"queued_ms", Clock::now() - job.received_at}});
  JobFailure cause = JobFailure::kEngine;
  Status s = process(job, cause);
  if (s.ok()) {
    metrics_.job_done();
  } else if (s.code() == StatusCode::kCancelled && queue_.cancel_requested()) {
    metrics_.job_failed(JobFailure::kCancelled);
    log::info("prefill job cancelled", {{"request", j.request_id}});
  } else {
    if (s.code() == StatusCode::kDeadlineExceeded) cause = JobFailure::kDeadline;
    metrics_.job_failed(cause);
    log::warn("prefill job failed",
              {{"request", j.request_id}, {"cause", job_failure_name(cause)}, {"status", s}});
    links_.reply(job, control::Error{j.request_id, s.code(), s.message()});
  }
  current_ = RequestId();
  extend_result_.reset();
  decode_error_.reset();
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

Status PrefillEngine::wait_decode_link(const QueuedJob& job, Clock::time_point deadline) {
  const std::string& address = job.job.decode_control_address;
  Status state;
  Status s = wait_for(
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

Status PrefillEngine::extend(QueuedJob& job, int64_t needed_bytes, uint64_t& granted_bytes,
                             control::Bytes& grant, JobFailure& cause) {
  const control::PrefillJob& j = job.job;
  const uint64_t needed = static_cast<uint64_t>(needed_bytes);
  const std::string prefix =
      "needs " + bytes_text(needed) + ", granted " + std::to_string(granted_bytes) + ": ";
  control::Extend ext{j.request_id, j.lease_id, needed - granted_bytes};
  log::info("extend requested", {{"request", j.request_id},
                                 {"lease", j.lease_id},
                                 {"needed_bytes", needed},
                                 {"granted_bytes", granted_bytes}});
  if (Status s = links_.send_decode(j.decode_control_address, ext); !s.ok()) {
    cause = JobFailure::kDecodeUnreachable;
    return s;
  }
  Status s = wait_for([&] { return extend_result_.has_value() || decode_error_.has_value(); },
                      job.deadline, "the decode node's ExtendResult");
  if (!s.ok()) {
    if (s.code() == StatusCode::kUnavailable) cause = JobFailure::kDecodeUnreachable;
    return s;
  }
  cause = JobFailure::kExtendRefused;
  if (decode_error_) {
    metrics_.extend(false);
    return resource_exhausted(prefix + decode_error_->to_string());
  }
  const control::ExtendResult r = std::move(*extend_result_);
  extend_result_.reset();
  if (r.code != StatusCode::kOk) {
    metrics_.extend(false);
    return resource_exhausted(prefix + r.status().to_string());
  }
  if (r.granted_bytes < needed || r.pool_descriptor.empty()) {
    metrics_.extend(false);
    return resource_exhausted(prefix + "the extension granted only " +
                              std::to_string(r.granted_bytes) + " bytes");
  }
  metrics_.extend(true);
  log::info("extend granted", {{"request", j.request_id}, {"granted_bytes", r.granted_bytes}});
  granted_bytes = r.granted_bytes;
  grant = r.pool_descriptor;
  return Status();
}

Status PrefillEngine::process(QueuedJob& job, JobFailure& cause) {
  const control::PrefillJob& j = job.job;
  const std::string& decode = j.decode_control_address;
  if (Clock::now() >= job.deadline) {
    cause = JobFailure::kDeadline;
    return Status(StatusCode::kDeadlineExceeded,
                  "the job's deadline (deadline_in " + std::to_string(j.deadline_in.count()) +
                      " ms) passed while it was queued");
  }
  // Connections first, so they open while the prefill computes.
  links_.open_decode(decode);
  auto peer = peer_for(j.decode_transport_address);
  if (!peer.ok()) {
    cause = JobFailure::kDecodeUnreachable;
    return peer.status();
  }

  // Prefill and compress.
  cause = JobFailure::kEngine;
  const kvstore::KvLayout& layout = job.plan->layout;
  const std::span<const int32_t> tokens(j.prompt_token_ids);
  const auto n = static_cast<int64_t>(tokens.size());
  KVGATE_ASSIGN_OR_RETURN(int64_t pool_bytes,
                          engine::compressed_pool_bytes(layout, n, settings_.page_bytes));
  // A pool per job, sized for this prompt under this policy: the arena is
  // uninitialized memory, so its size costs nothing until pages are used,
  // and the node never holds the worst case (a full context, dense) idle.
  KVGATE_ASSIGN_OR_RETURN(auto pool, kvstore::PagePool::create(settings_.page_bytes, pool_bytes));
  KVGATE_ASSIGN_OR_RETURN(auto pre,
                          engine::prefill_compressed(forward_, job.plan, tokens, pool.get(), logits_));
  const double prefill_s = pre.prefill_seconds + pre.compress_seconds;
  metrics_.prefill_done(n, prefill_s);
  engine::Sampler sampler(sampling_params(j.generation.sampling));
  const int32_t first_token = sampler.sample(logits_, tokens);
  const kvstore::CompressedKvCache& cache = pre.cache;
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
                             {"keep_rate", keep_rate}});
  if (queue_.cancel_requested()) return Status(StatusCode::kCancelled, "cancelled");

  KVGATE_ASSIGN_OR_RETURN(kvstore::WireImage image, kvstore::export_wire_image(cache));
  const int64_t page_bytes = settings_.page_bytes;
  const int64_t needed = image.total_bytes();

  cause = JobFailure::kDecodeUnreachable;
  KVGATE_RETURN_IF_ERROR(wait_decode_link(job, job.deadline));
  uint64_t granted = j.granted_bytes;
  control::Bytes grant = j.pool_descriptor;
  if (static_cast<uint64_t>(needed) > granted) {
    KVGATE_RETURN_IF_ERROR(extend(job, needed, granted, grant, cause));
  }

  // Gather each segment's pages into one staging buffer, kept until the
  // transfer's event (the transport reads it until then).
  cause = JobFailure::kTransfer;
  std::vector<std::byte> staging(static_cast<size_t>(needed));
  for (size_t i = 0; i < image.pages.size(); ++i) {
    std::memcpy(staging.data() + i * static_cast<size_t>(page_bytes), pool->data(image.pages[i]),
                static_cast<size_t>(page_bytes));
  }
  control::TransferManifest manifest;
  manifest.request_id = j.request_id;
  manifest.lease_id = j.lease_id;
  manifest.layout_version = kvstore::kWireImageVersion;
  manifest.layout_descriptor = image.descriptor;
  for (const kvstore::WireSegment& seg : image.segments) {
    const uint64_t offset = static_cast<uint64_t>(seg.first_page * page_bytes);
    const uint64_t length = static_cast<uint64_t>(seg.n_pages * page_bytes);
    manifest.segments.push_back({offset, length, crc32c(staging.data() + offset, length)});
  }
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

  const transport::TransferId id(j.lease_id.value());
  const auto start = Clock::now();
  const Clock::time_point deadline = std::min(job.deadline, start + settings_.transfer_deadline);
  if (Status s = transport_.begin_send(*peer, id, grant, deadline); !s.ok()) {
    return Status(s.code(), "transfer: " + s.message());
  }
  Status issued;
  for (size_t i = 0; i < manifest.segments.size() && issued.ok(); ++i) {
    const control::TransferSegment& seg = manifest.segments[i];
    issued = transport_.send_segment(*peer, id, static_cast<uint32_t>(i),
                                     staging.data() + seg.offset_bytes, seg.length_bytes,
                                     seg.offset_bytes);
  }
  if (issued.ok()) issued = transport_.finish(*peer, id);
  if (!issued.ok()) (void)transport_.cancel_send(*peer, id);

  // The transfer's one event. A cancel or shutdown cancels the send and
  // keeps waiting: the staging buffer must outlive what was issued.
  std::optional<transport::TransferEvent> event;
  bool cancel_sent = !issued.ok();
  const auto give_up = deadline + settings_.quiesce_timeout + std::chrono::seconds(5);
  while (!event) {
    transport_.progress(events_);
    drain_messages();
    for (auto it = events_.begin(); it != events_.end(); ++it) {
      if (it->side == transport::TransferSide::kSend && it->id == id && it->peer == *peer) {
        event = *it;
        events_.erase(it);
        break;
      }
    }
    if (event) break;
    if (!cancel_sent && (queue_.cancel_requested() || queue_.closed())) {
      (void)transport_.cancel_send(*peer, id);
      cancel_sent = true;
    }
    if (Clock::now() > give_up) {
      // The transport broke its promise of one event per transfer: keep
      // the buffer for when the event comes, and fail the job.
      orphaned_.emplace(std::make_pair(peer->value(), id.value()), std::move(staging));
      return internal_error("transfer: no event from the transport past its deadline");
    }
    queue_.wait(kPollInterval);
  }
  // Nothing else of ours is in flight (one job at a time): the other
  // events are of abandoned transfers.
  for (const transport::TransferEvent& e : events_) orphaned_.erase({e.peer.value(), e.id.value()});
  events_.clear();
  if (!issued.ok()) return Status(issued.code(), "transfer: " + issued.message());
  if (!event->status.ok()) {
    metrics_.transfer_failed(transfer_failure_of(event->status.code()));
    if (event->status.code() == StatusCode::kUnavailable) peers_.erase(j.decode_transport_address);
    if (event->status.code() == StatusCode::kCancelled && queue_.closed()) {
      return unavailable("prefill node is shutting down");
    }
    return Status(event->status.code(), "transfer: " + event->status.message());
  }
  const double transfer_s = seconds(event->elapsed);
  metrics_.transfer_done(needed, transfer_s);
  metrics_.kv_shipped(dense_bytes, actual_bytes, needed, keep_rate);
  log::info("kv shipped", {{"request", j.request_id},
                           {"lease", j.lease_id},
                           {"wire_bytes", needed},
                           {"segments", manifest.segments.size()},
                           {"seconds", transfer_s}});

  cause = JobFailure::kDecodeUnreachable;
  if (Status s = links_.send_decode(decode, manifest); !s.ok()) return s;
  log::info("manifest sent", {{"request", j.request_id}, {"decode", decode}});
  return Status();
}

}  // namespace kvgate::prefill
