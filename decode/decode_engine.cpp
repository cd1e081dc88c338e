// The decode engine loop: messages, leases, transfers (decode_engine.h).
// The batched decode step and token streaming are in decode_batch.cpp.
#include "decode/decode_engine.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <type_traits>

#include "common/log.h"
#include "decode/decode_sequence.h"
#include "engine/kv_policy_spec.h"
#include "kvstore/wire_image.h"

namespace kvgate::decode {

namespace {

using control::ConnectionPtr;

std::string req_name(RequestId id) {
  return "request " + std::to_string(id.value());
}

// The pages of a lease as destination ranges, adjacent pages merged (fewer
// ranges: kMaxSegments bounds them).
std::vector<transport::DestRange> page_ranges(std::span<const kvstore::PageId> pages,
                                              int64_t page_bytes) {
  std::vector<transport::DestRange> out;
  for (const kvstore::PageId& p : pages) {
    const uint64_t off = static_cast<uint64_t>(p.value) * static_cast<uint64_t>(page_bytes);
    if (!out.empty() && out.back().offset_bytes + out.back().length_bytes == off) {
      out.back().length_bytes += static_cast<uint64_t>(page_bytes);
    } else {
      out.push_back({off, static_cast<uint64_t>(page_bytes)});
    }
  }
  return out;
}

std::chrono::milliseconds until(Clock::time_point deadline, Clock::time_point now) {
  if (deadline <= now) return std::chrono::milliseconds(0);
  return std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
}

void send(const ConnectionPtr& to, const control::Message& message) {
  if (to) to->send(message);
}

}  // namespace

Result<std::unique_ptr<DecodeEngine>> DecodeEngine::start(
    const engine::LlamaModel& model, const engine::Tokenizer& tokenizer,
    std::shared_ptr<const engine::GateModel> gate, DecodeEngineOptions options,
    DecodeMetrics* metrics) {
  if (metrics == nullptr) return invalid_argument("decode engine: no metrics");
  const engine::LlamaConfig& c = model.config();
  const DecodeConfig& d = options.decode;
  if (d.page_tokens < 1) return invalid_argument("decode.page_tokens: must be >= 1");
  if (d.max_batch_requests < 1) return invalid_argument("decode.max_batch_requests: must be >= 1");
  if (d.lease_ttl.count() <= 0) return invalid_argument("decode.lease_ttl: must be > 0");
  // K/V rows are fp16 of head_dim: a page of page_tokens rows.
  const int64_t page_bytes = d.page_tokens * c.head_dim * kvstore::kKvElementBytes;
  if (page_bytes % 64 != 0) {
    return invalid_argument("decode.page_tokens: " + std::to_string(d.page_tokens) +
                            " rows of head_dim " + std::to_string(c.head_dim) + " make pages of " +
                            std::to_string(page_bytes) + " bytes, not a multiple of 64");
  }
  if (d.pool_bytes < page_bytes) {
    return invalid_argument("decode.pool_bytes: " + std::to_string(d.pool_bytes) +
                            " bytes hold no page of " + std::to_string(page_bytes) + " bytes");
  }
  std::unique_ptr<DecodeEngine> e(
      new DecodeEngine(model, tokenizer, std::move(gate), std::move(options), metrics));
  e->page_bytes_ = page_bytes;
  e->context_tokens_ = e->options_.context_tokens > 0
                           ? std::min<int64_t>(e->options_.context_tokens, c.n_ctx_train)
                           : c.n_ctx_train;
  auto pool = kvstore::PagePool::create(page_bytes, d.pool_bytes);
  if (!pool.ok()) return Status(pool.status().code(), "decode.pool_bytes: " + pool.status().message());
  e->pool_ = std::move(*pool);
  auto leases = kvstore::LeaseManager::create(e->pool_.get());
  if (!leases.ok()) return leases.status();
  e->leases_ = std::move(*leases);
  transport::TransportOptions to;
  to.cluster_token = e->options_.cluster_token;
  to.region = e->pool_->arena();
  to.region_bytes = static_cast<size_t>(e->pool_->capacity_bytes());
  auto tr = transport::create_transport(e->options_.transport, to);
  if (!tr.ok()) return tr.status();
  e->transport_ = std::move(*tr);
  e->transport_->set_test_hooks(e->options_.transport_hooks);
  auto addr = e->transport_->address();
  if (!addr.ok()) return addr.status();
  e->transport_address_ = std::move(*addr);
  e->transport_name_ = std::string(e->transport_->name());
  if (const auto& dev = e->options_.device) {
    if (dev->pool == nullptr || !dev->step) {
      return invalid_argument("decode engine: a device needs a page pool and a step");
    }
    if (dev->pool->page_bytes() != page_bytes || dev->pool->free_pages() < e->pool_->n_pages()) {
      return invalid_argument(
          "decode.pool_bytes: the device pool (" + std::to_string(dev->pool->free_pages()) +
          " free pages of " + std::to_string(dev->pool->page_bytes()) +
          " bytes) must hold the host pool's " + std::to_string(e->pool_->n_pages()) +
          " pages of " + std::to_string(page_bytes) + " bytes");
    }
  } else {
    e->forward_ = std::make_unique<engine::CpuForward>(model, e->options_.forward);
    e->batch_ = std::make_unique<engine::BatchDecoder>(*e->forward_);
  }
  e->publish_stats();
  // Everything above was made on this thread; from here the engine thread
  // owns it (the thread start orders those writes before its reads).
  e->thread_ = std::thread([raw = e.get()] { raw->loop(); });
  return e;
}

DecodeEngine::DecodeEngine(const engine::LlamaModel& model, const engine::Tokenizer& tokenizer,
                           std::shared_ptr<const engine::GateModel> gate,
                           DecodeEngineOptions options, DecodeMetrics* metrics)
    : model_(model),
      tokenizer_(tokenizer),
      gate_(std::move(gate)),
      options_(std::move(options)),
      metrics_(metrics) {}

DecodeEngine::~DecodeEngine() {
  stop();
  // Caches draw on the lease manager: destroy them before it.
  requests_.clear();
}

void DecodeEngine::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
}

void DecodeEngine::post(ConnectionPtr from, control::Message message) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      inbox_.push_back(Inbound{std::move(from), std::move(message), false});
      cv_.notify_one();
      return;
    }
  }
  // Draining: refuse from the caller's thread (Connection::send is
  // thread-safe), so a peer never waits for an answer that cannot come.
  const Status down(StatusCode::kUnavailable, "decode node shutting down");
  if (const auto* r = std::get_if<control::Reserve>(&message)) {
    send(from, control::ReserveDeny{r->request_id, down.code(), down.message(), 0});
  } else if (const auto* x = std::get_if<control::Extend>(&message)) {
    send(from, control::ExtendResult{x->request_id, x->lease_id, down.code(), down.message(), 0,
                                     {}, {}});
  } else if (const auto* m = std::get_if<control::TransferManifest>(&message)) {
    send(from, control::TransferResult{m->request_id, m->lease_id, down.code(), down.message()});
  }
}

void DecodeEngine::post_closed(ConnectionPtr connection) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return;
  inbox_.push_back(Inbound{std::move(connection), control::Message{}, true});
  cv_.notify_one();
}

DecodeStats DecodeEngine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void DecodeEngine::note(const std::string& line) const {
  // One line per event; the logger adds role and node (DESIGN.md §8).
  ::kvgate::log::info(line);
}

void DecodeEngine::loop() {
  std::deque<Inbound> inbox;
  for (;;) {
    bool stopping = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      inbox.swap(inbox_);
      stopping = stopping_;
    }
    for (Inbound& in : inbox) handle(in);
    inbox.clear();
    if (stopping) {
      drain();
      publish_stats();
      return;
    }
    // Leases first: a receive shares its lease's deadline, and an expired
    // lease is a Release{expired} (re-placed), not a transfer error.
    expire_leases(Clock::now());
    events_.clear();
    transport_->progress(events_);
    for (const auto& ev : events_) on_transfer_event(ev);
    step();
    ++iterations_;
    publish_stats();
    if (active_.empty()) {
      // The transport moves only when polled: poll often while receives are
      // posted; otherwise wake for messages, or to expire leases.
      const auto bound = by_transfer_.empty() ? std::chrono::milliseconds(20)
                                              : std::chrono::milliseconds(1);
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, bound, [&] { return stopping_ || !inbox_.empty(); });
    }
  }
}

void DecodeEngine::handle(Inbound& in) {
  if (in.closed) {
    on_closed(in.from);
    return;
  }
  std::visit(
      [&](auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, control::Reserve>) {
          on_reserve(in.from, m);
        } else if constexpr (std::is_same_v<T, control::Extend>) {
          on_extend(in.from, m);
        } else if constexpr (std::is_same_v<T, control::TransferManifest>) {
          on_manifest(in.from, std::move(m));
        } else if constexpr (std::is_same_v<T, control::Cancel>) {
          on_cancel(in.from, m);
        } else if constexpr (std::is_same_v<T, control::Release>) {
          on_release(in.from, m);
        } else if constexpr (std::is_same_v<T, control::Error>) {
          note("peer error: " + m.status().to_string());
        } else if constexpr (std::is_same_v<T, control::Heartbeat> ||
                             std::is_same_v<T, control::HelloAck>) {
          // Nothing to do: liveness is the channel's business.
        } else {
          send(in.from, control::Error{RequestId(), StatusCode::kInvalidArgument,
                                       std::string("decode node: unexpected ") +
                                           std::string(control::message_type_name(T::kType)) +
                                           " message"});
        }
      },
      in.message);
}

Result<transport::Bytes> DecodeEngine::post_receive(Request& r, Clock::time_point deadline) {
  const auto pages = leases_->pages(r.lease);
  transport::ReceiveSpec spec;
  // A receive is named by its lease (docs/cluster.md: the prefill node
  // begins its send with TransferId = lease id); an Extend grows it in
  // place, so the id never changes.
  spec.id = transport::TransferId(r.lease.value());
  spec.ranges = page_ranges(pages, page_bytes_);
  spec.deadline = deadline;
  auto grant = transport_->post_receive(spec);
  if (!grant.ok()) return grant.status();
  r.transfer = spec.id;
  by_transfer_[spec.id] = r.id;
  return grant;
}

void DecodeEngine::cancel_receive(Request& r) {
  if (!r.transfer.valid()) return;
  (void)transport_->cancel_receive(r.transfer);  // its event is ignored (no mapping)
  by_transfer_.erase(r.transfer);
  r.transfer = transport::TransferId();
}

void DecodeEngine::drop(RequestId id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  Request& r = *it->second;
  if (r.seq) {
    active_.erase(std::remove(active_.begin(), active_.end(), id), active_.end());
    r.seq.reset();  // the cache returns its pages to the lease first
  }
  cancel_receive(r);
  if (r.lease.valid()) (void)leases_->release(r.lease);
  requests_.erase(it);
}

void DecodeEngine::on_reserve(const ConnectionPtr& from, const control::Reserve& m) {
  auto deny = [&](StatusCode code, const std::string& reason) {
    metrics_->count_lease_denied();
    send(from, control::ReserveDeny{m.request_id, code, reason,
                                    static_cast<uint64_t>(leases_->free_bytes())});
  };
  if (!m.request_id.valid()) return deny(StatusCode::kInvalidArgument, "Reserve: request id 0");
  if (requests_.count(m.request_id) != 0) {
    return deny(StatusCode::kFailedPrecondition,
                "Reserve: " + req_name(m.request_id) + " already holds a lease on this node");
  }
  if (m.size_bytes == 0 || m.size_bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return deny(StatusCode::kInvalidArgument,
                "Reserve: size_bytes " + std::to_string(m.size_bytes) + " is out of range");
  }
  const auto ttl = m.lease_ttl.count() > 0 ? m.lease_ttl : options_.decode.lease_ttl;
  const auto now = Clock::now();
  auto lease = leases_->grant(m.request_id, static_cast<int64_t>(m.size_bytes), ttl, now);
  if (!lease.ok()) return deny(lease.status().code(), lease.status().message());
  auto req = std::make_unique<Request>();
  req->id = m.request_id;
  req->lease = *lease;
  req->coordinator = from;
  req->deadline = now + ttl;
  const auto info = leases_->info(*lease);
  const int64_t granted = info.ok() ? info->granted_bytes : 0;
  auto pages = leases_->take_pages(*lease, granted / page_bytes_);
  Result<transport::Bytes> grant =
      pages.ok() ? post_receive(*req, req->deadline) : Result<transport::Bytes>(pages.status());
  if (!grant.ok()) {
    cancel_receive(*req);
    (void)leases_->release(*lease);
    return deny(grant.status().code() == StatusCode::kOk ? StatusCode::kInternal
                                                         : grant.status().code(),
                "Reserve: cannot post the receive: " + grant.status().message());
  }
  metrics_->count_lease_granted();
  send(from, control::ReserveGrant{m.request_id, *lease, static_cast<uint64_t>(granted), ttl,
                                   std::move(*grant)});
  requests_.emplace(m.request_id, std::move(req));
}

void DecodeEngine::on_extend(const ConnectionPtr& from, const control::Extend& m) {
  auto answer = [&](const Status& s, uint64_t granted, std::chrono::milliseconds expires,
                    transport::Bytes descriptor) {
    send(from, control::ExtendResult{m.request_id, m.lease_id, s.code(), s.message(), granted,
                                     expires, std::move(descriptor)});
  };
  auto it = requests_.find(m.request_id);
  if (it == requests_.end()) {
    return answer(not_found("Extend: " + req_name(m.request_id) + " holds no lease here"), 0, {},
                  {});
  }
  Request& r = *it->second;
  if (r.lease != m.lease_id) {
    return answer(invalid_argument("Extend: lease " + std::to_string(m.lease_id.value()) +
                                   " is not the lease of " + req_name(m.request_id)),
                  0, {}, {});
  }
  // The sender is done once its manifest (or the verified receive) is here:
  // nothing more can use new pages.
  if (r.manifest && !r.seq) {
    return answer(failed_precondition("Extend: the manifest of " + req_name(m.request_id) +
                                      " already arrived (the sender is done)"),
                  0, {}, {});
  }
  if (r.seq || r.received || !r.transfer.valid()) {
    return answer(failed_precondition("Extend: the KV of " + req_name(m.request_id) +
                                      " already arrived"),
                  0, {}, {});
  }
  if (m.extra_bytes == 0 || m.extra_bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return answer(invalid_argument("Extend: extra_bytes " + std::to_string(m.extra_bytes) +
                                   " is out of range"),
                  0, {}, {});
  }
  const auto now = Clock::now();
  auto grown = leases_->extend(r.lease, static_cast<int64_t>(m.extra_bytes), now);
  if (!grown.ok()) return answer(grown.status(), 0, {}, {});
  auto more = leases_->take_pages(r.lease, leases_->pages_left(r.lease));
  if (!more.ok()) return answer(more.status(), 0, {}, {});
  // Grow the live receive in place (the sender may already have landed
  // segments): take_pages appends to the lease's pages, so the new pages
  // follow the old ones in pages() order, and the receive's new ranges
  // continue its logical offsets after the old total, the same layout
  // adopt_wire_image reads. The receiver's map grows before the prefill
  // node learns of the pages (ExtendResult), so nothing can land early.
  auto grant = transport_->extend_receive(r.transfer, page_ranges(*more, page_bytes_));
  if (!grant.ok()) {
    // The receive is unchanged and may still complete over its old grant:
    // give the new pages back (last first, which keeps pages() order); the
    // lease keeps the bytes, committed or released with it.
    for (auto p = more->rbegin(); p != more->rend(); ++p) (void)leases_->return_page(r.lease, *p);
    return answer(Status(grant.status().code(),
                         "Extend: cannot grow the receive: " + grant.status().message()),
                  0, {}, {});
  }
  r.prefill = from;
  answer(Status(), static_cast<uint64_t>(*grown), until(r.deadline, now), std::move(*grant));
}

void DecodeEngine::on_manifest(const ConnectionPtr& from, control::TransferManifest m) {
  auto refuse = [&](const Status& s) {
    metrics_->count_transfer(TransferResultKind::kBadManifest);
    send(from, control::TransferResult{m.request_id, m.lease_id, s.code(), s.message()});
  };
  auto it = requests_.find(m.request_id);
  if (it == requests_.end()) {
    return refuse(not_found("TransferManifest: " + req_name(m.request_id) +
                            " holds no lease here (expired, cancelled or never reserved)"));
  }
  Request& r = *it->second;
  if (r.lease != m.lease_id) {
    return refuse(invalid_argument("TransferManifest: lease " + std::to_string(m.lease_id.value()) +
                                   " is not the lease of " + req_name(m.request_id)));
  }
  if (r.manifest || r.seq) {
    return refuse(failed_precondition("TransferManifest: a second manifest for " +
                                      req_name(m.request_id)));
  }
  r.prefill = from;
  r.manifest = std::move(m);
  try_finish_transfer(r);
}

void DecodeEngine::on_transfer_event(const transport::TransferEvent& event) {
  if (event.side != transport::TransferSide::kReceive) return;
  auto t = by_transfer_.find(event.id);
  if (t == by_transfer_.end()) return;  // cancelled by us (Extend re-post, Cancel, expiry)
  const RequestId id = t->second;
  by_transfer_.erase(t);
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  Request& r = *it->second;
  r.transfer = transport::TransferId();
  if (!event.status.ok()) {
    note(req_name(id) + ": transfer failed: " + event.status.to_string());
    fail_transfer(r, event.status, transfer_result_of(event.status.code()));
    return;
  }
  r.received = true;
  r.received_bytes = event.bytes;
  r.transfer_elapsed = event.elapsed;
  try_finish_transfer(r);
}

void DecodeEngine::try_finish_transfer(Request& r) {
  if (!r.received || !r.manifest) return;
  const Status s = adopt_and_admit(r);
  if (!s.ok()) {
    note(req_name(r.id) + ": manifest refused: " + s.to_string());
    fail_transfer(r, s, TransferResultKind::kBadManifest);
    return;
  }
  const control::TransferManifest& m = *r.manifest;
  metrics_->count_transfer(TransferResultKind::kOk);
  metrics_->observe_transfer(std::chrono::duration<double>(r.transfer_elapsed).count(),
                             r.received_bytes);
  send(r.prefill, control::TransferResult{r.id, r.lease, StatusCode::kOk, {}});
  send(r.coordinator, control::Commit{r.id, r.lease, m.actual_bytes, m.keep_rate});
  // The first chunk carries the prefill's first token.
  control::TokenChunk chunk;
  chunk.first_token_index = 0;
  const control::FinishReason finish = accept_token(r, m.first_token_id, chunk);
  chunk.finish_reason = finish;
  if (finish == control::FinishReason::kNone) active_.push_back(r.id);
  send_chunk(r, chunk);  // drops the request when it finished at once
}

Status DecodeEngine::adopt_and_admit(Request& r) {
  const control::TransferManifest& m = *r.manifest;
  const std::string what = "TransferManifest of " + req_name(r.id) + ": ";
  const engine::LlamaConfig& c = model_.config();
  if (m.layout_version != kvstore::kWireImageVersion) {
    return unimplemented(what + "layout_version " + std::to_string(m.layout_version) +
                         " (this node reads " + std::to_string(kvstore::kWireImageVersion) + ")");
  }
  if (m.prompt_tokens < 1) return invalid_argument(what + "prompt_tokens is 0");
  if (static_cast<int64_t>(m.prompt_tokens) >= context_tokens_) {
    return invalid_argument(what + "a prompt of " + std::to_string(m.prompt_tokens) +
                            " tokens leaves no room in the context of " +
                            std::to_string(context_tokens_) + " tokens");
  }
  if (m.first_token_id < 0 || m.first_token_id >= c.n_vocab) {
    return invalid_argument(what + "first_token_id " + std::to_string(m.first_token_id) +
                            " is outside the vocabulary [0, " + std::to_string(c.n_vocab) + ")");
  }
  if (m.generation.max_new_tokens < 1) return invalid_argument(what + "max_new_tokens is 0");
  engine::SamplingParams sampling;
  const control::SamplingParams& sp = m.generation.sampling;
  sampling.temperature = sp.temperature;
  sampling.top_k = sp.top_k;
  sampling.top_p = sp.top_p;
  sampling.min_p = sp.min_p;
  sampling.repetition_penalty = sp.repetition_penalty;
  sampling.repetition_window = sp.repetition_window;
  sampling.seed = sp.seed;
  if (Status s = sampling.validate(); !s.ok()) return invalid_argument(what + s.message());
  KVGATE_ASSIGN_OR_RETURN(auto plan, plan_for(m.kv_policy));

  auto seq = std::make_unique<Sequence>(tokenizer_, sampling, m.generation.stop_strings);
  seq->plan = plan;
  seq->pages = std::make_unique<kvstore::LeasePages>(leases_.get(), r.lease);
  // adopt returns surplus pages to the lease, which reorders pages(): copy.
  const auto held = leases_->pages(r.lease);
  const std::vector<kvstore::PageId> pages(held.begin(), held.end());
  auto cache = kvstore::adopt_wire_image(plan->layout, seq->pages.get(), m.layout_descriptor, pages);
  if (!cache.ok()) return Status(cache.status().code(), what + cache.status().message());
  seq->cache.emplace(std::move(*cache));
  if (seq->cache->n_tokens() != static_cast<int64_t>(m.prompt_tokens)) {
    return invalid_argument(what + "the descriptor holds " +
                            std::to_string(seq->cache->n_tokens()) + " tokens, prompt_tokens says " +
                            std::to_string(m.prompt_tokens));
  }
  if (const auto& dev = options_.device) {
    // Decode runs on the device: the landed cache moves there, its pages
    // charged to the same lease (decode/device_pages.h).
    seq->device_pages = std::make_unique<LeaseChargedPages>(leases_.get(), r.lease, dev->pool);
    auto moved = move_to_device(seq->cache, *seq->device_pages);
    if (!moved.ok()) {
      return Status(moved.status().code(), what + "moving the KV to the " + dev->name + " device: " +
                                               moved.status().message());
    }
    seq->cache.emplace(std::move(*moved));
    if (dev->after_move) KVGATE_RETURN_IF_ERROR(dev->after_move());
  }
  const auto info = leases_->info(r.lease);
  if (!info.ok()) return info.status();
  // Everything granted stays with the request (decode growth draws on it).
  KVGATE_RETURN_IF_ERROR(leases_->commit(r.lease, info->granted_bytes, Clock::now()));
  seq->prompt_tokens = m.prompt_tokens;
  if (m.prompt_tail_token_ids.size() > m.prompt_tokens) {
    return invalid_argument(what + "prompt_tail_token_ids has " +
                            std::to_string(m.prompt_tail_token_ids.size()) +
                            " tokens, more than the prompt's " + std::to_string(m.prompt_tokens));
  }
  // The repetition penalty sees the prompt's tail, and the random stream
  // continues past the prefill node's draw of the first token: the same
  // tokens as one process (engine::generate) for any sampling parameters.
  seq->history.assign(m.prompt_tail_token_ids.begin(), m.prompt_tail_token_ids.end());
  seq->sampler.advance(1);
  seq->max_new_tokens = m.generation.max_new_tokens;
  seq->ignore_eos = m.generation.ignore_eos;
  seq->last_token_at = Clock::now();
  r.seq = std::move(seq);
  return Status();
}

void DecodeEngine::fail_transfer(Request& r, const Status& status, TransferResultKind kind) {
  metrics_->count_transfer(kind);
  const StatusCode code = status.ok() ? StatusCode::kInternal : status.code();
  send(r.prefill, control::TransferResult{r.id, r.lease, code, status.message()});
  send(r.coordinator, control::Error{r.id, code, status.message()});
  drop(r.id);
}

void DecodeEngine::on_cancel(const ConnectionPtr& from, const control::Cancel& m) {
  auto it = requests_.find(m.request_id);
  if (it == requests_.end()) return;  // finished or never here: nothing held
  Request& r = *it->second;
  control::TokenChunk chunk;
  chunk.request_id = r.id;
  chunk.finish_reason = control::FinishReason::kCancelled;
  if (r.seq) {
    chunk.first_token_index = r.seq->completion_tokens;
    chunk.usage = {r.seq->prompt_tokens, r.seq->completion_tokens};
  }
  note(req_name(r.id) + ": cancelled" + (m.reason.empty() ? "" : " (" + m.reason + ")"));
  const ConnectionPtr to = r.coordinator ? r.coordinator : from;
  drop(m.request_id);
  send(to, chunk);
}

void DecodeEngine::on_release(const ConnectionPtr& from, const control::Release& m) {
  auto it = requests_.find(m.request_id);
  if (it == requests_.end()) return;
  if (m.lease_id.valid() && it->second->lease != m.lease_id) {
    note(req_name(m.request_id) + ": Release names lease " + std::to_string(m.lease_id.value()) +
        ", not its lease; ignored");
    return;
  }
  drop(m.request_id);
}

void DecodeEngine::on_closed(const ConnectionPtr& connection) {
  std::vector<RequestId> orphaned;
  for (const auto& [id, r] : requests_) {
    if (r->coordinator == connection) orphaned.push_back(id);
  }
  for (RequestId id : orphaned) {
    note(req_name(id) + ": its coordinator connection closed; dropped");
    drop(id);
  }
}

void DecodeEngine::expire_leases(Clock::time_point now) {
  for (const kvstore::ExpiredLease& e : leases_->expire(now)) {
    metrics_->count_lease_expired();
    auto it = requests_.find(e.request_id);
    if (it == requests_.end()) continue;
    Request& r = *it->second;
    r.lease = LeaseId();  // already freed by expire()
    cancel_receive(r);
    note(req_name(r.id) + ": lease " + std::to_string(e.lease_id.value()) +
        " expired before its KV arrived");
    send(r.coordinator, control::Release{r.id, e.lease_id, "expired"});
    drop(r.id);
  }
}

Result<std::shared_ptr<const engine::PolicyPlan>> DecodeEngine::plan_for(
    const control::KvPolicySpec& spec) {
  std::string key = spec.name;
  for (const auto& p : spec.params) key += "|" + p.key + "=" + std::to_string(p.value);
  for (const auto& [k, plan] : plans_) {
    if (k == key) return plan;
  }
  // Plans are never evicted (the batch decoder keeps per-plan state by
  // address), so their number is bounded.
  constexpr size_t kMaxPlans = 256;
  if (plans_.size() >= kMaxPlans) {
    return resource_exhausted("kv_policy: more than " + std::to_string(kMaxPlans) +
                              " distinct KV policies on this node");
  }
  auto policy = engine::kv_policy_from_spec(spec, gate_);
  if (!policy.ok()) return Status(policy.status().code(), "kv_policy: " + policy.status().message());
  auto plan = engine::plan_kv_policy(model_.config(), *policy);
  if (!plan.ok()) return Status(plan.status().code(), "kv_policy: " + plan.status().message());
  plans_.emplace_back(std::move(key), *plan);
  return *plan;
}

void DecodeEngine::publish_stats() {
  DecodeStats s;
  s.leases = leases_->stats();
  s.active_sequences = static_cast<uint32_t>(active_.size());
  s.waiting_transfers = static_cast<uint32_t>(requests_.size() - active_.size());
  for (RequestId id : active_) {
    auto it = requests_.find(id);
    if (it != requests_.end() && it->second->seq && it->second->seq->cache) {
      s.context_tokens += static_cast<uint64_t>(it->second->seq->cache->n_tokens());
    }
  }
  s.steps = steps_;
  s.iterations = iterations_;
  metrics_->set_pool({s.leases.capacity_bytes, s.leases.free_bytes, s.leases.reserved_bytes,
                      s.leases.used_bytes});
  metrics_->set_active_requests(s.active_sequences);
  std::lock_guard<std::mutex> lock(mu_);
  stats_ = s;
}

void DecodeEngine::drain() {
  const Status down(StatusCode::kUnavailable, "decode node shutting down");
  std::vector<RequestId> ids;
  for (const auto& [id, r] : requests_) ids.push_back(id);
  for (RequestId id : ids) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    Request& r = *it->second;
    if (r.seq) {
      fail_sequence(r, down);
    } else {
      send(r.prefill, control::TransferResult{r.id, r.lease, down.code(), down.message()});
      send(r.coordinator, control::Error{r.id, down.code(), down.message()});
      drop(id);
    }
  }
  // Nothing may land in the pool after this: cancel and let the transport
  // settle what it can (its destructor says goodbye to peers).
  events_.clear();
  transport_->progress(events_);
}

}  // namespace kvgate::decode
