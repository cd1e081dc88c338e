#include "coordinator/cluster_scheduler.h"

#include <algorithm>
#include <optional>
#include <type_traits>

#include "coordinator/placement.h"

namespace kvgate::coordinator {

using control::FinishReason;

struct ClusterScheduler::Request {
  GenerationRequest req;
  std::shared_ptr<GenerationSink> sink;
  Phase phase = Phase::kWaiting;
  TimePoint submitted_at{};
  TimePoint waiting_since{};    // submit or the last re-placement (placement_wait)
  TimePoint reserve_sent_at{};  // kReserving
  TimePoint job_sent_at{};      // kPrefilling: for the prefill-rate estimate
  std::string waiting_reason;   // why it is not placed yet (for the 503)
  bool started = false;         // on_started called
  int64_t attempts = 0;         // prefill jobs sent (placements)
  Status last_error;
  FootprintPrediction prediction;

  // The current attempt.
  NodeId decode;
  NodeId prefill;
  control::ReserveGrant grant;                  // kPrefilling: for another prefill node
  std::vector<std::pair<NodeId, uint64_t>> denied;  // node, its heartbeat count at the deny
  std::vector<NodeId> prefill_refused;          // queue full, this attempt
  std::vector<NodeId> avoid;                    // nodes of failed attempts (preference only)
  bool committed = false;

  // Output.
  uint32_t tokens_out = 0;
  std::string utf8_tail;  // bytes of an incomplete code point held back
};

namespace {

std::string quoted(const NodeInfo* node, NodeId id) {
  return node ? "'" + node->name + "'" : "node " + std::to_string(id.value());
}

std::string id_str(RequestId id) {
  return std::to_string(id.value());
}

}  // namespace

std::chrono::milliseconds ClusterScheduler::expected_prefill_time(int64_t prompt_tokens,
                                                                   int64_t queued_tokens) const {
  const double rate = prefill_tokens_per_s_ > 0 ? prefill_tokens_per_s_
                                                 : options_.initial_prefill_tokens_per_s;
  const double seconds = 2.0 * static_cast<double>(prompt_tokens + queued_tokens) / rate;
  return options_.prefill_allowance +
         std::chrono::milliseconds(static_cast<int64_t>(std::min(seconds, 86400.0) * 1000.0));
}

void ClusterScheduler::observe_prefill(int64_t prompt_tokens, TimePoint::duration took) {
  const double seconds = std::chrono::duration<double>(took).count();
  if (seconds <= 0.0 || prompt_tokens <= 0) return;
  const double sample = static_cast<double>(prompt_tokens) / seconds;
  // Short prompts say little about throughput (fixed costs dominate); they
  // still count, with the weight of their length.
  const double w = std::min(0.3, static_cast<double>(prompt_tokens) / 4096.0);
  prefill_tokens_per_s_ =
      prefill_tokens_per_s_ > 0 ? (1.0 - w) * prefill_tokens_per_s_ + w * sample : sample;
}

int64_t ClusterScheduler::prefill_queued_tokens_of(NodeId node) const {
  const NodeInfo* info = membership_.find(node);
  return info ? static_cast<int64_t>(membership_.prefill_queued_tokens(*info)) : 0;
}

size_t utf8_complete_prefix(std::string_view text) {
  // Look back at most 3 bytes for the lead byte of the last sequence.
  const size_t n = text.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(text[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    size_t len = 1;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
    }
    return back < len ? n - back : n;
  }
  return n;  // only continuation bytes: invalid anyway, pass them on
}

ClusterSchedulerOptions ClusterSchedulerOptions::from_config(const NodeConfig& c, NodeId self_id,
                                                             int64_t model_context_tokens,
                                                             control::KvPolicySpec kv_policy) {
  ClusterSchedulerOptions o;
  o.model_name = served_model_name(c.model);
  o.context_tokens = c.model.max_context_tokens > 0
                         ? std::min(c.model.max_context_tokens, model_context_tokens)
                         : model_context_tokens;
  o.self_id = self_id;
  o.heartbeat_interval = c.cluster.heartbeat_interval;
  o.node_deadline = c.cluster.node_deadline;
  o.placement_wait = c.coordinator.placement_wait;
  o.request_timeout = c.coordinator.request_timeout;
  o.lease_ttl = c.decode.lease_ttl;
  o.transfer_deadline = c.transport.transfer_deadline;
  o.max_attempts = c.coordinator.max_attempts;
  o.max_queued_requests = c.coordinator.max_queued_requests;
  o.max_active_requests = c.coordinator.max_active_requests;
  o.kv_policy = std::move(kv_policy);
  return o;
}

ClusterScheduler::ClusterScheduler(ClusterSchedulerOptions options, FootprintPredictor predictor,
                                   ClusterMetrics* metrics, ClusterLog log)
    : options_(std::move(options)),
      membership_(MembershipOptions{options_.model_name, options_.node_deadline,
                                    std::max(options_.node_deadline * 10,
                                             std::chrono::milliseconds(60000))}),
      predictor_(std::move(predictor)),
      tp_(TpRendezvousOptions{options_.tp_join_timeout}),
      metrics_(metrics),
      log_(std::move(log)) {
  update_gauges();
}

ClusterScheduler::~ClusterScheduler() = default;

void ClusterScheduler::log(const std::string& line) const {
  if (log_) log_(line);
}

void ClusterScheduler::send(NodeId node, const control::Message& message) {
  const NodeInfo* info = membership_.find(node);
  if (info && info->live() && info->link) info->link->send(message);
}

ClusterScheduler::Iter ClusterScheduler::find_request(RequestId id) {
  auto it = index_.find(id);
  return it == index_.end() ? requests_.end() : requests_.find(it->second);
}

size_t ClusterScheduler::queued_requests() const {
  size_t n = 0;
  for (const auto& [seq, r] : requests_) n += r.started ? 0 : 1;
  return n;
}

void ClusterScheduler::update_gauges() {
  if (!metrics_) return;
  const MembershipCounts c = membership_.counts();
  metrics_->set_nodes(c.live_prefill, c.live_decode, c.down_prefill, c.down_decode);
  metrics_->set_placement_queue_length(static_cast<int64_t>(queued_requests()));
  metrics_->set_active_requests(static_cast<int64_t>(requests_.size()));
}

// ------------------------------------------------------------------- nodes

Result<control::HelloAck> ClusterScheduler::check_hello(const control::Hello& hello) const {
  if (shut_down_) return unavailable("the coordinator is shutting down");
  KVGATE_RETURN_IF_ERROR(membership_.check_hello(hello));
  control::HelloAck ack;
  ack.node_id = options_.self_id;
  ack.heartbeat_interval = options_.heartbeat_interval;
  return ack;
}

Status ClusterScheduler::node_opened(const control::Hello& hello, std::shared_ptr<NodeLink> link,
                                     TimePoint now) {
  if (shut_down_) return unavailable("the coordinator is shutting down");
  Status s = membership_.register_node(hello, std::move(link), now);
  if (!s.ok()) {
    log("node '" + hello.node_name + "' refused: " + s.message());
    return s;
  }
  // A re-registration starts a fresh connection: no answer is due on it.
  for (auto it = stale_answers_.begin(); it != stale_answers_.end();) {
    it = it->first.first == hello.node_id ? stale_answers_.erase(it) : std::next(it);
  }
  const NodeInfo* node = membership_.find(hello.node_id);
  log("node '" + node->name + "' registered (" +
      std::string(control::node_role_name(hello.role)) + ", control " + hello.control_address +
      ", transport " + hello.transport_name + ")");
  place_waiting(now);
  update_gauges();
  return Status();
}

void ClusterScheduler::node_closed(NodeId id, const NodeLink* link, const Status& reason,
                                   TimePoint now) {
  if (!membership_.connection_closed(id, link, "connection closed: " + reason.message(), now)) {
    return;
  }
  node_down(id, "its connection closed (" + reason.message() + ")", now);
  update_gauges();
}

void ClusterScheduler::node_down(NodeId id, const std::string& reason, TimePoint now) {
  const NodeInfo* node = membership_.find(id);
  const std::string name = quoted(node, id);
  log("node " + name + " is down: " + reason);
  send_tp_aborts(tp_.node_lost(id));
  for (auto it = stale_answers_.begin(); it != stale_answers_.end();) {
    it = it->first.first == id ? stale_answers_.erase(it) : std::next(it);
  }
  std::vector<RequestId> affected;
  for (auto& [seq, r] : requests_) {
    if (r.decode == id || (r.prefill == id && r.phase == Phase::kPrefilling)) {
      affected.push_back(r.req.id);
    }
  }
  for (RequestId rid : affected) {
    Iter it = find_request(rid);
    if (it == requests_.end()) continue;
    Request& r = it->second;
    if (r.decode == id && r.phase == Phase::kReserving) {
      // No lease was granted (or its grant is lost with the connection and
      // the lease expires there): try another node; not an attempt.
      r.decode = NodeId();
      r.phase = Phase::kWaiting;
      try_place(it, now);
      continue;
    }
    fail_attempt(it, unavailable((r.decode == id ? "decode node " : "prefill node ") + name +
                                 " went down: " + reason),
                 ClusterCause::kNodeDown, now);
  }
}

void ClusterScheduler::node_message(NodeId id, const NodeLink* link,
                                    const control::Message& message, TimePoint now) {
  if (!membership_.is_current_link(id, link)) return;  // an old connection of the node
  const NodeInfo* node = membership_.find(id);
  std::visit(
      [&](const auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, control::Heartbeat>) {
          Status s = membership_.heartbeat(id, m, now);
          if (!s.ok()) {
            log(s.message());
            return;
          }
          place_waiting(now);
        } else if constexpr (std::is_same_v<T, control::ReserveGrant>) {
          on_grant(id, m, now);
        } else if constexpr (std::is_same_v<T, control::ReserveDeny>) {
          on_deny(id, m, now);
        } else if constexpr (std::is_same_v<T, control::Commit>) {
          on_commit(id, m, now);
        } else if constexpr (std::is_same_v<T, control::TokenChunk>) {
          on_chunk(id, m, now);
        } else if constexpr (std::is_same_v<T, control::Release>) {
          on_release(id, m, now);
        } else if constexpr (std::is_same_v<T, control::Error>) {
          if (!m.request_id.valid()) {
            log("node " + quoted(node, id) + " reported: " + m.status().to_string());
            return;
          }
          on_node_error(id, m.request_id,
                        Status(m.code, "node " + quoted(node, id) + ": " + m.message), now);
        } else if constexpr (std::is_same_v<T, control::TpJoin>) {
          on_tp_join(id, m, now);
        } else if constexpr (std::is_same_v<T, control::TransferResult>) {
          if (m.code != StatusCode::kOk) {
            on_node_error(id, m.request_id,
                          Status(m.code, "transfer to node " + quoted(node, id) + ": " + m.message),
                          now);
          }
        } else {
          log("node " + quoted(node, id) + " sent " +
              std::string(control::message_type_name(T::kType)) +
              ", which a coordinator does not accept; ignored");
        }
      },
      message);
  update_gauges();
}

void ClusterScheduler::on_tp_join(NodeId from, const control::TpJoin& m, TimePoint now) {
  const NodeInfo* node = membership_.find(from);
  auto joined = tp_.join(from, node ? node->name : std::string(), m, now);
  if (!joined.ok()) {
    log("node " + quoted(node, from) + ": " + joined.status().message());
    send(from, control::Error{RequestId(), joined.status().code(), joined.status().message()});
    return;
  }
  if (!joined->ready) return;
  log(control::tp_group_error_prefix(m.group) + "complete (world " +
      std::to_string(joined->ready->world) + "); TpReady sent to every rank");
  for (const control::TpMember& member : joined->ready->members) {
    send(member.node_id, *joined->ready);
  }
}

void ClusterScheduler::send_tp_aborts(const std::vector<TpAbort>& aborts) {
  for (const TpAbort& a : aborts) {
    log(a.status.message());
    for (NodeId n : a.notify) {
      send(n, control::Error{RequestId(), a.status.code(), a.status.message()});
    }
  }
}

bool ClusterScheduler::take_stale_answer(NodeId from, RequestId id) {
  auto it = stale_answers_.find({from, id});
  if (it == stale_answers_.end()) return false;
  if (--it->second == 0) stale_answers_.erase(it);
  return true;
}

void ClusterScheduler::on_grant(NodeId from, const control::ReserveGrant& m, TimePoint now) {
  if (take_stale_answer(from, m.request_id)) return;  // the Cancel sent after it frees it
  Iter it = find_request(m.request_id);
  if (it == requests_.end() || it->second.phase != Phase::kReserving ||
      it->second.decode != from) {
    // Nobody here asked for it: free it rather than wait for its expiry.
    send(from, control::Release{m.request_id, m.lease_id, "no such reservation"});
    return;
  }
  Request& r = it->second;
  membership_.reservation_answered(from, r.req.id, true);
  r.grant = m;
  r.phase = Phase::kPrefilling;
  r.prefill_refused.clear();
  send_prefill_job(it, now);
}

void ClusterScheduler::on_deny(NodeId from, const control::ReserveDeny& m, TimePoint now) {
  if (take_stale_answer(from, m.request_id)) return;
  Iter it = find_request(m.request_id);
  if (it == requests_.end() || it->second.phase != Phase::kReserving ||
      it->second.decode != from) {
    return;
  }
  Request& r = it->second;
  const NodeInfo* node = membership_.find(from);
  membership_.reservation_answered(from, r.req.id, false);
  if (metrics_) metrics_->count_reserve_denial();
  r.denied.emplace_back(from, node ? node->heartbeats : 0);
  r.waiting_reason = "decode node " + quoted(node, from) + " denied " +
                     std::to_string(r.prediction.capacity_bytes) + " bytes (" +
                     std::string(status_code_name(m.code)) + ": " + m.reason + "; " +
                     std::to_string(m.available_bytes) + " available)";
  log("request " + id_str(r.req.id) + ": " + r.waiting_reason);
  r.decode = NodeId();
  r.phase = Phase::kWaiting;
  try_place(it, now);
}

void ClusterScheduler::on_commit(NodeId from, const control::Commit& m, TimePoint now) {
  Iter it = find_request(m.request_id);
  if (it == requests_.end() || it->second.decode != from ||
      it->second.phase != Phase::kPrefilling) {
    return;
  }
  Request& r = it->second;
  r.phase = Phase::kDecoding;
  r.committed = true;
  const auto prompt = static_cast<int64_t>(r.req.prompt_tokens.size());
  observe_prefill(prompt, now - r.job_sent_at);
  Status s = predictor_.observe(prompt, m.keep_rate);
  if (!s.ok()) log("request " + id_str(r.req.id) + ": Commit ignored for prediction: " + s.message());
  if (metrics_) {
    metrics_->observe_committed_bytes(static_cast<double>(m.committed_bytes));
    if (s.ok()) metrics_->observe_keep_rate(m.keep_rate);
    if (m.committed_bytes > 0) {
      metrics_->observe_prediction_ratio(static_cast<double>(r.prediction.prompt_capacity_bytes) /
                                         static_cast<double>(m.committed_bytes));
    }
    metrics_->add_kv_bytes(static_cast<double>(r.prediction.dense_prompt_bytes),
                           static_cast<double>(m.committed_bytes));
  }
}

void ClusterScheduler::on_chunk(NodeId from, const control::TokenChunk& m, TimePoint now) {
  Iter it = find_request(m.request_id);
  if (it == requests_.end() || it->second.decode != from ||
      (it->second.phase != Phase::kDecoding && it->second.phase != Phase::kPrefilling)) {
    return;
  }
  Request& r = it->second;
  if (m.first_token_index != r.tokens_out) {
    // Tokens lost or repeated: fail closed rather than show wrong output.
    fail_attempt(it,
                 internal_error("decode node sent tokens from index " +
                                std::to_string(m.first_token_index) + ", expected " +
                                std::to_string(r.tokens_out)),
                 ClusterCause::kProtocol, now);
    return;
  }
  if (m.finish_reason == FinishReason::kError || m.finish_reason == FinishReason::kCancelled) {
    const NodeInfo* node = membership_.find(from);
    fail_attempt(it,
                 unavailable("decode node " + quoted(node, from) + " ended the request (" +
                             std::string(control::finish_reason_name(m.finish_reason)) + ")"),
                 ClusterCause::kDecodeError, now);
    return;
  }
  if (!r.committed) {
    // Tokens imply the KV was adopted; the Commit may have been lost to a
    // reordering we do not expect, but the request is on the decode node now.
    r.committed = true;
    r.phase = Phase::kDecoding;
  }
  r.tokens_out += static_cast<uint32_t>(m.token_ids.size());
  std::string text = std::move(r.utf8_tail);
  r.utf8_tail.clear();
  text += m.text;
  const bool last = m.finish_reason != FinishReason::kNone;
  if (!last) {
    const size_t keep = utf8_complete_prefix(text);
    r.utf8_tail = text.substr(keep);
    text.resize(keep);
  } else if (utf8_complete_prefix(text) != text.size()) {
    // The stream ended inside a code point: show the replacement character.
    text.resize(utf8_complete_prefix(text));
    text += "\xEF\xBF\xBD";
  }
  if (!text.empty() || !m.token_ids.empty()) {
    r.sink->on_tokens(text, static_cast<int32_t>(m.token_ids.size()));
  }
  if (last) finish_done(it, m);
}

void ClusterScheduler::on_release(NodeId from, const control::Release& m, TimePoint now) {
  Iter it = find_request(m.request_id);
  if (it == requests_.end() || it->second.decode != from) return;
  Request& r = it->second;
  if (r.phase != Phase::kPrefilling && r.phase != Phase::kDecoding) return;
  const NodeInfo* node = membership_.find(from);
  const bool expired = m.reason == "expired";
  fail_attempt(it,
               unavailable("decode node " + quoted(node, from) + " released lease " +
                           std::to_string(m.lease_id.value()) + " (" + m.reason + ")"),
               expired ? ClusterCause::kLeaseExpired : ClusterCause::kDecodeError, now);
}

void ClusterScheduler::on_node_error(NodeId from, RequestId id, const Status& status,
                                     TimePoint now) {
  Iter it = find_request(id);
  if (it == requests_.end()) return;
  Request& r = it->second;
  const bool from_decode = r.decode == from && r.phase != Phase::kWaiting;
  const bool from_prefill = r.prefill == from && r.phase == Phase::kPrefilling;
  if (!from_decode && !from_prefill) return;  // about an attempt already given up
  if (from_decode && r.phase == Phase::kReserving) {
    // An Error in place of the Reserve's answer: no lease, as a deny.
    on_deny(from, control::ReserveDeny{id, status.code(), status.message(), 0}, now);
    return;
  }
  if (from_prefill && !from_decode && status.code() == StatusCode::kResourceExhausted) {
    // Its queue is full: the lease is still good, try another prefill node.
    r.prefill_refused.push_back(from);
    log("request " + id_str(id) + ": " + status.message());
    send_prefill_job(it, now);
    return;
  }
  fail_attempt(it, status, from_decode ? ClusterCause::kDecodeError : ClusterCause::kPrefillError,
               now);
}

// --------------------------------------------------------------- placement

void ClusterScheduler::place_waiting(TimePoint now) {
  std::vector<RequestId> waiting;
  for (auto& [seq, r] : requests_) {
    if (r.phase == Phase::kWaiting) waiting.push_back(r.req.id);
  }
  for (RequestId id : waiting) {
    Iter it = find_request(id);
    if (it != requests_.end() && it->second.phase == Phase::kWaiting) try_place(it, now);
  }
}

void ClusterScheduler::try_place(Iter it, TimePoint now) {
  Request& r = it->second;
  // A prefill node must be there before bytes are reserved for the job.
  PlacementChoice prefill = choose_prefill_node(membership_);
  if (!prefill.node) {
    r.waiting_reason = prefill.why_not;
    return;
  }
  auto prediction = predictor_.predict(static_cast<int64_t>(r.req.prompt_tokens.size()),
                                       r.req.max_tokens);
  if (prediction.ok()) r.prediction = *prediction;  // else: keep the one from submit
  std::vector<NodeId> exclude;
  for (const auto& [node, heartbeats] : r.denied) {
    const NodeInfo* info = membership_.find(node);
    // A node that denied is asked again once a heartbeat says what it has.
    if (info && info->heartbeats == heartbeats) exclude.push_back(node);
  }
  const auto bytes = static_cast<uint64_t>(r.prediction.capacity_bytes);
  PlacementChoice decode = choose_decode_node(membership_, bytes, exclude, r.avoid);
  if (!decode.node) {
    // While nodes that denied are excluded, their deny says more.
    if (exclude.empty()) r.waiting_reason = decode.why_not;
    return;
  }
  r.decode = *decode.node;
  r.phase = Phase::kReserving;
  r.reserve_sent_at = now;
  membership_.add_reservation(r.decode, r.req.id, bytes);
  const auto prefill_time = expected_prefill_time(
      static_cast<int64_t>(r.req.prompt_tokens.size()),
      prefill.node ? prefill_queued_tokens_of(*prefill.node) : 0);
  send(r.decode, control::Reserve{r.req.id, bytes, options_.lease_ttl + prefill_time});
}

void ClusterScheduler::send_prefill_job(Iter it, TimePoint now) {
  Request& r = it->second;
  PlacementChoice prefill = choose_prefill_node(membership_, r.prefill_refused, r.avoid);
  if (!prefill.node) {
    const bool none_live = membership_.counts().live_prefill == 0;
    release_holdings(r, none_live ? "no live prefill node" : "every prefill queue is full");
    if (none_live) {
      r.waiting_reason = prefill.why_not;
      return;  // back to waiting: a prefill node may register within placement_wait
    }
    finish_error(it,
                 resource_exhausted(prefill.why_not + "; retry later"),
                 ClusterCause::kPrefillQueueFull);
    return;
  }
  const NodeInfo* decode = membership_.find(r.decode);
  const NodeInfo* node = membership_.find(*prefill.node);
  r.prefill = *prefill.node;
  r.waiting_reason.clear();
  control::PrefillJob job;
  job.request_id = r.req.id;
  job.prompt_token_ids = r.req.prompt_tokens;
  const engine::SamplingParams& s = r.req.sampling;
  job.generation.sampling = control::SamplingParams{s.temperature, s.top_k,
                                                    s.top_p,       s.min_p,
                                                    s.repetition_penalty, s.repetition_window,
                                                    s.seed};
  job.generation.max_new_tokens = static_cast<uint32_t>(r.req.max_tokens);
  job.generation.stop_strings = r.req.stop;
  job.generation.ignore_eos = r.req.ignore_eos;
  job.kv_policy = options_.kv_policy;
  job.decode_node = r.decode;
  if (decode) {
    job.decode_transport_address = decode->transport_address;
    job.decode_control_address = decode->control_address;
  }
  job.lease_id = r.grant.lease_id;
  job.granted_bytes = r.grant.granted_bytes;
  job.pool_descriptor = r.grant.pool_descriptor;
  job.deadline_in = options_.transfer_deadline +
                    expected_prefill_time(static_cast<int64_t>(r.req.prompt_tokens.size()),
                                          prefill_queued_tokens_of(*prefill.node));
  if (r.grant.expires_in.count() > 0) job.deadline_in = std::min(job.deadline_in, r.grant.expires_in);
  membership_.add_prefill_job(r.prefill, r.req.prompt_tokens.size());
  r.job_sent_at = now;
  send(r.prefill, job);
  ++r.attempts;
  if (metrics_) {
    metrics_->count_placement();
    metrics_->observe_predicted_bytes(static_cast<double>(r.prediction.capacity_bytes));
  }
  log("request " + id_str(r.req.id) + ": placed (attempt " + std::to_string(r.attempts) +
      "): decode " + quoted(decode, r.decode) + " lease " +
      std::to_string(r.grant.lease_id.value()) + " " + std::to_string(r.grant.granted_bytes) +
      " bytes (predicted " + std::to_string(r.prediction.capacity_bytes) + "), prefill " +
      quoted(node, r.prefill));
  if (!r.started) {
    r.started = true;
    r.sink->on_started();
  }
}

void ClusterScheduler::release_holdings(Request& r, const std::string& reason) {
  const control::Cancel cancel{r.req.id, reason};
  if (r.decode.valid()) {
    if (r.phase == Phase::kReserving) {
      // Its answer is still due; the Cancel behind it frees a grant.
      ++stale_answers_[{r.decode, r.req.id}];
    }
    membership_.remove_reservation(r.decode, r.req.id);
    send(r.decode, cancel);
  }
  if (r.prefill.valid() && r.phase == Phase::kPrefilling) send(r.prefill, cancel);
  r.decode = NodeId();
  r.prefill = NodeId();
  r.grant = control::ReserveGrant{};
  r.committed = false;
  r.phase = Phase::kWaiting;
}

void ClusterScheduler::fail_attempt(Iter it, const Status& status, ClusterCause cause,
                                    TimePoint now) {
  Request& r = it->second;
  r.last_error = status;
  const NodeId decode = r.decode;
  const NodeId prefill = r.prefill;
  release_holdings(r, "attempt failed: " + status.message());
  if (r.tokens_out > 0) {
    finish_error(it,
                 unavailable("the request failed after " + std::to_string(r.tokens_out) +
                             " tokens were streamed and cannot be resumed: " + status.message()),
                 cause);
    return;
  }
  if (r.attempts >= options_.max_attempts) {
    finish_error(it,
                 Status(status.code(), "failed after " + std::to_string(r.attempts) +
                                           " placement attempts (coordinator.max_attempts); last: " +
                                           status.message()),
                 cause);
    return;
  }
  log("request " + id_str(r.req.id) + ": re-placing after attempt " +
      std::to_string(r.attempts) + " failed: " + status.to_string());
  if (metrics_) metrics_->count_replacement(cause);
  for (NodeId n : {decode, prefill}) {
    if (n.valid() && std::find(r.avoid.begin(), r.avoid.end(), n) == r.avoid.end()) {
      r.avoid.push_back(n);
    }
  }
  r.denied.clear();
  r.prefill_refused.clear();
  r.utf8_tail.clear();
  r.waiting_since = now;
  try_place(it, now);
}

void ClusterScheduler::finish_error(Iter it, const Status& status,
                                    std::optional<ClusterCause> cause) {
  Request& r = it->second;
  if (cause && metrics_) metrics_->count_failure(*cause);
  log("request " + id_str(r.req.id) + ": failed: " + status.to_string());
  std::shared_ptr<GenerationSink> sink = std::move(r.sink);
  index_.erase(r.req.id);
  requests_.erase(it);
  sink->on_error(status);
}

void ClusterScheduler::finish_done(Iter it, const control::TokenChunk& last) {
  Request& r = it->second;
  GenerationResult result;
  result.finish_reason = last.finish_reason == FinishReason::kStop ? "stop" : "length";
  result.usage.prompt_tokens = last.usage.prompt_tokens > 0
                                   ? last.usage.prompt_tokens
                                   : static_cast<int64_t>(r.req.prompt_tokens.size());
  result.usage.completion_tokens =
      last.usage.completion_tokens > 0 ? last.usage.completion_tokens : r.tokens_out;
  std::shared_ptr<GenerationSink> sink = std::move(r.sink);
  index_.erase(r.req.id);
  requests_.erase(it);
  sink->on_done(result);
}

// ---------------------------------------------------------------- requests

Status ClusterScheduler::submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink,
                                TimePoint now) {
  if (shut_down_) return unavailable("the coordinator is shutting down");
  if (!sink) return invalid_argument("no sink");
  if (!request.id.valid()) return invalid_argument("request id 0");
  if (request.model != options_.model_name) return not_found("model " + request.model);
  if (request.prompt_tokens.empty()) return invalid_argument("prompt is empty");
  if (request.max_tokens < 1) return invalid_argument("max_tokens must be >= 1");
  const int64_t need = static_cast<int64_t>(request.prompt_tokens.size()) + request.max_tokens;
  if (options_.context_tokens > 0 && need > options_.context_tokens) {
    return invalid_argument("prompt + max_tokens (" + std::to_string(need) +
                            " tokens) exceeds the model context of " +
                            std::to_string(options_.context_tokens) + " tokens");
  }
  if (request.stop.size() > control::kMaxStopStrings) {
    return invalid_argument("at most " + std::to_string(control::kMaxStopStrings) +
                            " stop strings");
  }
  KVGATE_RETURN_IF_ERROR(request.sampling.validate());
  if (index_.count(request.id) != 0) {
    return invalid_argument("request id " + id_str(request.id) + " is already running");
  }
  if (static_cast<int64_t>(requests_.size()) >= options_.max_active_requests) {
    return resource_exhausted("the coordinator runs its maximum of " +
                              std::to_string(options_.max_active_requests) +
                              " requests (coordinator.max_active_requests)");
  }
  if (static_cast<int64_t>(queued_requests()) >= options_.max_queued_requests) {
    return resource_exhausted("the placement queue is full (" +
                              std::to_string(options_.max_queued_requests) +
                              " requests, coordinator.max_queued_requests)");
  }
  KVGATE_ASSIGN_OR_RETURN(FootprintPrediction prediction,
                          predictor_.predict(static_cast<int64_t>(request.prompt_tokens.size()),
                                             request.max_tokens));
  const uint64_t seq = next_seq_++;
  Request r;
  r.req = std::move(request);
  r.sink = std::move(sink);
  r.submitted_at = now;
  r.waiting_since = now;
  r.prediction = prediction;
  r.waiting_reason = "not placed yet";
  const RequestId id = r.req.id;
  index_[id] = seq;
  Iter it = requests_.emplace(seq, std::move(r)).first;
  try_place(it, now);  // sends a Reserve at most: never calls the sink
  update_gauges();
  return Status();
}

void ClusterScheduler::cancel(RequestId id, TimePoint now) {
  Iter it = find_request(id);
  if (it == requests_.end()) return;
  release_holdings(it->second, "cancelled by the client");
  std::shared_ptr<GenerationSink> sink = std::move(it->second.sink);
  log("request " + id_str(id) + ": cancelled by the client");
  index_.erase(id);
  requests_.erase(it);
  sink->on_error(Status(StatusCode::kCancelled, "cancelled by the client"));
  update_gauges();
}

void ClusterScheduler::tick(TimePoint now) {
  for (NodeId id : membership_.sweep(now)) {
    if (auto link = membership_.take_link(id)) {
      link->close(unavailable("no heartbeat within cluster.node_deadline (" +
                              std::to_string(options_.node_deadline.count()) + " ms)"));
    }
    node_down(id, membership_.find(id) ? membership_.find(id)->down_reason : "deadline", now);
  }
  send_tp_aborts(tp_.expire(now));
  std::vector<RequestId> ids;
  for (auto& [seq, r] : requests_) ids.push_back(r.req.id);
  for (RequestId id : ids) {
    Iter it = find_request(id);
    if (it == requests_.end()) continue;
    Request& r = it->second;
    if (now - r.submitted_at > options_.request_timeout) {
      release_holdings(r, "request_timeout");
      finish_error(it,
                   Status(StatusCode::kDeadlineExceeded,
                          "the request did not finish within coordinator.request_timeout (" +
                              std::to_string(options_.request_timeout.count()) + " ms)"),
                   ClusterCause::kTimeout);
      continue;
    }
    if (r.phase == Phase::kReserving && now - r.reserve_sent_at > options_.placement_wait) {
      // The decode node does not answer: treat as a deny and move on.
      const NodeInfo* node = membership_.find(r.decode);
      r.denied.emplace_back(r.decode, node ? node->heartbeats : 0);
      r.waiting_reason = "decode node " + quoted(node, r.decode) + " did not answer the Reserve";
      release_holdings(r, "no answer to Reserve within coordinator.placement_wait");
      try_place(it, now);
      continue;
    }
    if (r.phase == Phase::kWaiting && now - r.waiting_since > options_.placement_wait) {
      finish_error(it,
                   unavailable("no placement within coordinator.placement_wait (" +
                               std::to_string(options_.placement_wait.count()) +
                               " ms): " + r.waiting_reason),
                   ClusterCause::kNoCapacity);
    }
  }
  update_gauges();
}

void ClusterScheduler::shutdown() {
  shut_down_ = true;
  while (!requests_.empty()) {
    Iter it = requests_.begin();
    release_holdings(it->second, "the coordinator is shutting down");
    finish_error(it, Status(StatusCode::kCancelled, "the coordinator is shutting down"),
                 ClusterCause::kShutdown);
  }
  update_gauges();
}

BackendHealth ClusterScheduler::health() const {
  if (shut_down_) return {false, "the coordinator is shutting down"};
  const MembershipCounts c = membership_.counts();
  if (c.live_prefill > 0 && c.live_decode > 0) return {true, {}};
  std::string reason;
  if (c.live_prefill == 0) reason = "no live prefill node";
  if (c.live_decode == 0) reason += std::string(reason.empty() ? "" : " and ") + "no live decode node";
  return {false, reason + " serves model '" + options_.model_name + "'"};
}

std::vector<BackendModel> ClusterScheduler::models() const {
  return {BackendModel{options_.model_name, options_.context_tokens}};
}

}  // namespace kvgate::coordinator
