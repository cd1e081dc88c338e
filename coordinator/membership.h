// Membership: the prefill and decode nodes registered with this coordinator
// (DESIGN.md §7, docs/cluster.md "Processes and connections").
//
// Pure bookkeeping: no sockets, no clock — every call that depends on time
// takes `now`. A node is registered from its verified Hello together with an
// opaque NodeLink (the connection everything for that node goes back on);
// it is live until its connection closes or no heartbeat came for
// node_deadline, then down. A down node may register again with the same id
// (it reconnected); a live id registering again is refused
// (kFailedPrecondition, as docs/cluster.md says).
//
// Besides the node's own heartbeat numbers, membership keeps what THIS
// coordinator sent the node since its last heartbeat, so that placement does
// not hand the same free bytes twice between two heartbeats:
//   - decode: reservations. A Reserve is outstanding until it is answered;
//     a granted one stays outstanding until the next heartbeat (the
//     connection is ordered, so a heartbeat that arrives after the grant
//     already counts the lease in its reserved bytes); a denied one is
//     dropped at once.
//   - prefill: prompt tokens of jobs sent since the last heartbeat.
//
// Threading: not thread-safe; owned by the cluster scheduler, which is used
// under the cluster backend's lock.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/control_protocol.h"
#include "common/status.h"

namespace kvgate::coordinator {

using ClusterClock = std::chrono::steady_clock;

// The connection a node registered on: everything for the node is sent on
// it. Implemented over control::Connection by the cluster backend and by
// recording fakes in tests. send() and close() must not block.
class NodeLink {
 public:
  virtual ~NodeLink() = default;
  virtual void send(const control::Message& message) = 0;
  virtual void close(const Status& reason) = 0;
};

enum class NodeState { kLive, kDown };
const char* node_state_name(NodeState state);

struct NodeInfo {
  NodeId id;
  control::NodeRole role = control::NodeRole::kPrefill;
  std::string name;  // Hello::node_name, or "<role>-<id hex>" when empty
  std::string model;
  std::string control_address;
  std::string transport_name;
  control::Bytes transport_address;
  std::shared_ptr<NodeLink> link;  // null once down

  NodeState state = NodeState::kLive;
  std::string down_reason;  // why it went down ("" while live)
  ClusterClock::time_point registered_at{};
  ClusterClock::time_point last_heartbeat_at{};  // registration counts as one
  ClusterClock::time_point down_at{};
  uint64_t heartbeats = 0;        // received since this registration
  control::Heartbeat last;        // the latest heartbeat (zeros before the first)

  // This coordinator's outstanding work on the node (see the header comment).
  struct Reservation {
    uint64_t bytes = 0;
    bool granted = false;  // answered with a grant, waiting for a heartbeat
  };
  std::map<RequestId, Reservation> reservations;
  uint64_t outstanding_prefill_tokens = 0;
  uint32_t outstanding_prefill_jobs = 0;

  bool live() const { return state == NodeState::kLive; }
};

struct MembershipOptions {
  std::string model_name;  // the served model; nodes of another model are refused
  std::chrono::milliseconds node_deadline{5000};
  // Down nodes are forgotten this long after they went down (restarted
  // processes are new nodes, so the table would otherwise only grow).
  std::chrono::milliseconds forget_after{60000};
};

// Node counts for health and metrics.
struct MembershipCounts {
  int64_t live_prefill = 0;
  int64_t live_decode = 0;
  int64_t down_prefill = 0;
  int64_t down_decode = 0;
};

class Membership {
 public:
  explicit Membership(MembershipOptions options);

  // Whether a node with this Hello may register now: role prefill or decode
  // (kInvalidArgument otherwise), a non-zero node id (kInvalidArgument), the
  // served model (kInvalidArgument naming both), no live node with the same
  // id (kFailedPrecondition). Does not register.
  Status check_hello(const control::Hello& hello) const;

  // Registers (or re-registers a down node with the same id): live, its
  // deadline counted from `now`. check_hello's errors; `link` must be set.
  Status register_node(const control::Hello& hello, std::shared_ptr<NodeLink> link,
                       ClusterClock::time_point now);

  // A heartbeat from a live node: its numbers replace the previous ones and
  // the outstanding reservations it now accounts for are dropped. NOT_FOUND
  // for an unknown node, FAILED_PRECONDITION for a down one, INVALID_ARGUMENT
  // when heartbeat.node_id names another node.
  Status heartbeat(NodeId id, const control::Heartbeat& heartbeat, ClusterClock::time_point now);

  // Marks down every live node whose last heartbeat is older than
  // node_deadline and forgets nodes down for longer than forget_after.
  // Returns the ids newly marked down (their links are still set in the
  // returned infos' place: the caller closes them; see take_link).
  std::vector<NodeId> sweep(ClusterClock::time_point now);

  // The node's registration connection closed. Marks it down if `link` is
  // still its registered link (a closed old connection of a node that has
  // re-registered is ignored). Returns true if the node went down.
  bool connection_closed(NodeId id, const NodeLink* link, const std::string& reason,
                         ClusterClock::time_point now);

  // Removes and returns a node's link (after it went down), so the caller
  // can close it. Null if none.
  std::shared_ptr<NodeLink> take_link(NodeId id);

  // Outstanding work (no-ops for unknown nodes).
  void add_reservation(NodeId decode, RequestId request, uint64_t bytes);
  // The Reserve was answered: a grant keeps it until the next heartbeat, a
  // deny removes it.
  void reservation_answered(NodeId decode, RequestId request, bool granted);
  void remove_reservation(NodeId decode, RequestId request);
  void add_prefill_job(NodeId prefill, uint64_t prompt_tokens);

  // Free bytes for placement: the last heartbeat's free bytes minus this
  // coordinator's outstanding reservations (never below 0).
  uint64_t decode_free_bytes(const NodeInfo& node) const;
  // Prompt tokens waiting on a prefill node: the heartbeat's plus the jobs
  // sent since.
  uint64_t prefill_queued_tokens(const NodeInfo& node) const;

  const NodeInfo* find(NodeId id) const;
  // Live if `link` is the node's registered link (messages from an older
  // connection of the node are not the node's).
  bool is_current_link(NodeId id, const NodeLink* link) const;
  const std::map<NodeId, NodeInfo>& nodes() const { return nodes_; }
  MembershipCounts counts() const;
  const MembershipOptions& options() const { return options_; }

 private:
  MembershipOptions options_;
  std::map<NodeId, NodeInfo> nodes_;  // ordered: deterministic iteration
};

}  // namespace kvgate::coordinator
