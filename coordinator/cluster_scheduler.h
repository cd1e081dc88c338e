// ClusterScheduler: the coordinator's side of docs/cluster.md as a state
// machine with no sockets, threads or clock of its own — the cluster backend
// (coordinator/cluster_backend.h) feeds it node connections, node messages,
// requests and ticks, with the time; tests feed it the same with fake links.
//
// Per request:
//
//   waiting ──Reserve──▶ reserving ──ReserveGrant / PrefillJob──▶ prefilling
//      ▲                    │ ReserveDeny: next decode node          │ Commit
//      │                    ▼ (none: wait for heartbeats)            ▼
//      └──── re-placement (Cancel to the attempt's nodes) ◀──── decoding ──TokenChunk…──▶ done
//
//   - waiting: needs a live prefill node and a live decode node whose free
//     bytes cover the prediction (FootprintPredictor); retried whenever a
//     heartbeat, registration or deny changes the picture; after
//     coordinator.placement_wait it fails kUnavailable (503) saying why.
//   - on_started() is called when the prefill job is sent (placed).
//   - Failures (docs/cluster.md table): before the first token streamed —
//     Error, Release "expired", failed transfer, a node of the attempt down
//     — Cancel to the attempt's nodes and re-place, at most
//     coordinator.max_attempts placements, then the last error. After a
//     token was streamed the request fails kUnavailable (its output cannot
//     be resumed). A prefill queue full (kResourceExhausted from the prefill
//     node) tries the next prefill node on the same lease, else 429.
//   - cancel(id): Cancel to the nodes holding it; the sink gets kCancelled.
//   - coordinator.request_timeout from submit: kDeadlineExceeded.
//
// Messages from a node are trusted for nothing: ones about requests the node
// does not hold for this coordinator, answers to Reserves this coordinator
// already abandoned, and out-of-order tokens are ignored or fail the request
// closed; nothing a peer sends can crash the process.
//
// Threading: not thread-safe. The owner serializes every call (the cluster
// backend holds one lock around it) and the sinks are called from inside
// those calls, one at a time: a sink must not call back into the backend.
// submit() never calls the sink.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/config.h"
#include "common/control_protocol.h"
#include "common/status.h"
#include "coordinator/backend.h"
#include "coordinator/footprint_predictor.h"
#include "coordinator/membership.h"
#include "coordinator/metrics.h"
#include "coordinator/tp_rendezvous.h"

namespace kvgate::coordinator {

struct ClusterSchedulerOptions {
  std::string model_name;      // the served model; nodes of another are refused
  int64_t context_tokens = 0;  // prompt + max_tokens limit
  NodeId self_id;              // this coordinator's id (HelloAck)
  std::chrono::milliseconds heartbeat_interval{1000};  // cluster.heartbeat_interval
  std::chrono::milliseconds node_deadline{5000};       // cluster.node_deadline
  std::chrono::milliseconds placement_wait{5000};      // coordinator.placement_wait
  std::chrono::milliseconds request_timeout{600000};   // coordinator.request_timeout
  std::chrono::milliseconds lease_ttl{30000};          // decode.lease_ttl (Reserve)
  std::chrono::milliseconds transfer_deadline{10000};  // transport.transfer_deadline
  // The time a prefill may take before its KV arrives is not fixed: a long
  // prompt behind a queue on a CPU node takes minutes. The scheduler keeps
  // a running estimate of prefill throughput (prompt tokens per second from
  // PrefillJob sent to Commit, over the last requests), and gives each
  // request prefill_allowance + 2x the estimated time of its prompt plus the
  // tokens queued ahead of it: added to lease_ttl in the Reserve (so the
  // lease does not expire while the prefill is still computing) and to
  // transfer_deadline in PrefillJob.deadline_in (capped by the grant's
  // expiry).
  std::chrono::milliseconds prefill_allowance{30000};
  // Until a Commit has been seen: a deliberately low rate (a long TTL only
  // keeps bytes reserved longer when a node fails silently; a short one
  // fails healthy requests).
  double initial_prefill_tokens_per_s = 50.0;
  int64_t max_attempts = 3;           // coordinator.max_attempts
  int64_t max_queued_requests = 256;  // not yet placed; more: kResourceExhausted
  int64_t max_active_requests = 1024; // accepted and not ended; more: kResourceExhausted
  control::KvPolicySpec kv_policy;    // sent with every PrefillJob
  // Tensor-parallel bootstrap (TpJoin): a group not complete this long
  // after its first join is aborted and its members get an Error.
  std::chrono::milliseconds tp_join_timeout{60000};

  // The fields above from a coordinator's config (model_name from
  // model.served_name / path, context from model.max_context_tokens when
  // set, else `model_context_tokens`).
  static ClusterSchedulerOptions from_config(const NodeConfig& config, NodeId self_id,
                                             int64_t model_context_tokens,
                                             control::KvPolicySpec kv_policy);
};

// One line per event ("request 42: ...", "node 'decode-a' ..."); may be null.
using ClusterLog = std::function<void(const std::string& line)>;

class ClusterScheduler {
 public:
  using TimePoint = ClusterClock::time_point;

  ClusterScheduler(ClusterSchedulerOptions options, FootprintPredictor predictor,
                   ClusterMetrics* metrics = nullptr, ClusterLog log = nullptr);
  ~ClusterScheduler();
  ClusterScheduler(const ClusterScheduler&) = delete;
  ClusterScheduler& operator=(const ClusterScheduler&) = delete;

  // ----------------------------------------------------------------- nodes
  // The answer to a node's verified Hello (membership's checks).
  Result<control::HelloAck> check_hello(const control::Hello& hello) const;
  // The node's registration connection is live (after HelloAck). Errors:
  // check_hello's (the caller closes the connection with it).
  Status node_opened(const control::Hello& hello, std::shared_ptr<NodeLink> link, TimePoint now);
  // The connection `link` of node `id` closed: the node is down if it was
  // its registration connection; its requests are re-placed or failed.
  void node_closed(NodeId id, const NodeLink* link, const Status& reason, TimePoint now);
  // A message from node `id` on `link` (ignored unless `link` is the node's
  // registration connection).
  void node_message(NodeId id, const NodeLink* link, const control::Message& message,
                    TimePoint now);

  // -------------------------------------------------------------- requests
  // Checks and queues the request (Backend::submit's contract): kNotFound
  // (another model), kInvalidArgument / kUnimplemented (a request this
  // backend cannot run: ignore_eos, too many stop strings, over the
  // context), kResourceExhausted (queues full), kUnavailable (shut down).
  Status submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink, TimePoint now);
  void cancel(RequestId id, TimePoint now);
  // Deadlines: node_deadline (nodes), placement_wait, request_timeout.
  // Call often (the backend: every few tens of milliseconds).
  void tick(TimePoint now);
  // Fails every request (kCancelled: "the coordinator is shutting down",
  // 503), sends Cancel to the nodes holding them, refuses later submits.
  void shutdown();

  BackendHealth health() const;
  std::vector<BackendModel> models() const;

  const Membership& membership() const { return membership_; }
  const FootprintPredictor& predictor() const { return predictor_; }
  const TpRendezvous& tp_rendezvous() const { return tp_; }
  size_t active_requests() const { return requests_.size(); }
  size_t queued_requests() const;  // accepted, not yet placed (no on_started)
  const ClusterSchedulerOptions& options() const { return options_; }

 private:
  enum class Phase { kWaiting, kReserving, kPrefilling, kDecoding };
  struct Request;
  using Iter = std::map<uint64_t, Request>::iterator;

  Iter find_request(RequestId id);
  void log(const std::string& line) const;
  void send(NodeId node, const control::Message& message);
  void update_gauges();

  // Placement.
  void try_place(Iter it, TimePoint now);
  // prefill_allowance + 2x the estimated prefill time of `prompt_tokens`
  // behind `queued_tokens` (options: the rate estimate).
  std::chrono::milliseconds expected_prefill_time(int64_t prompt_tokens,
                                                  int64_t queued_tokens) const;
  void observe_prefill(int64_t prompt_tokens, TimePoint::duration took);
  int64_t prefill_queued_tokens_of(NodeId node) const;
  void place_waiting(TimePoint now);
  void send_prefill_job(Iter it, TimePoint now);
  // Cancel to the nodes the request holds something on; stops tracking them.
  void release_holdings(Request& r, const std::string& reason);
  // The current attempt failed with `status`: re-place or fail the request.
  void fail_attempt(Iter it, const Status& status, ClusterCause cause, TimePoint now);
  // Terminal calls (erase the request).
  void finish_error(Iter it, const Status& status, std::optional<ClusterCause> cause);
  void finish_done(Iter it, const control::TokenChunk& last);
  void node_down(NodeId id, const std::string& reason, TimePoint now);

  // Node messages.
  void on_grant(NodeId from, const control::ReserveGrant& m, TimePoint now);
  void on_deny(NodeId from, const control::ReserveDeny& m, TimePoint now);
  void on_commit(NodeId from, const control::Commit& m, TimePoint now);
  void on_chunk(NodeId from, const control::TokenChunk& m, TimePoint now);
  void on_release(NodeId from, const control::Release& m, TimePoint now);
  void on_node_error(NodeId from, RequestId id, const Status& status, TimePoint now);
  bool take_stale_answer(NodeId from, RequestId id);
  // TpJoin (tensor-parallel bootstrap): TpReady to every member when the
  // group completes; a refused join gets Error (request id none, the
  // message naming the group) on the joiner's connection.
  void on_tp_join(NodeId from, const control::TpJoin& m, TimePoint now);
  void send_tp_aborts(const std::vector<TpAbort>& aborts);

  const ClusterSchedulerOptions options_;
  Membership membership_;
  FootprintPredictor predictor_;
  TpRendezvous tp_;
  ClusterMetrics* const metrics_;
  const ClusterLog log_;
  bool shut_down_ = false;

  uint64_t next_seq_ = 1;
  std::map<uint64_t, Request> requests_;  // by arrival: placement is first come, first tried
  std::unordered_map<RequestId, uint64_t> index_;
  // Answers still due from decode nodes to Reserves this coordinator gave
  // up on (cancelled, timed out, re-placed): the next ReserveGrant/Deny for
  // that (node, request) is the stale one (control connections are ordered).
  std::map<std::pair<NodeId, RequestId>, int> stale_answers_;
  double prefill_tokens_per_s_ = 0.0;  // running estimate; 0 until the first Commit
};

// The longest prefix of `text` that does not end inside a UTF-8 sequence
// (the rest is held until the next chunk). Exposed for tests.
size_t utf8_complete_prefix(std::string_view text);

}  // namespace kvgate::coordinator
