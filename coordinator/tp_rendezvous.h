// TpRendezvous: the coordinator's side of the tensor-parallel bootstrap
// (control_protocol.h "tensor-parallel bootstrap", docs/cluster.md). The
// ranks of a group join by name; when the last rank has joined, the caller
// gets the one TpReady to send to every member. Pure logic: no I/O, no
// clock of its own (times are passed in), no threads.
//
// Rules:
//   - A group starts with its first join, which fixes its world size.
//   - Each rank is held by one node; a node holds one rank of a group. A
//     node repeating its own join (same rank, same id) is accepted and
//     changes nothing (a retry).
//   - Rank 0 brings the unique id (exactly kTpUniqueIdBytes); the other
//     ranks bring none.
//   - A complete group is forgotten as soon as its TpReady is handed out:
//     the coordinator keeps no state about running groups, and a later join
//     of the same name starts a NEW group (a restarted job re-bootstraps
//     with a fresh id). Consequence: a member that joins after completion
//     (a duplicate launcher) does not get "already complete" but starts a
//     group that times out unless the others rejoin.
//   - A node lost before its group completed aborts the group: the other
//     members are told (node_lost returns them); they must join again.
//   - A group not complete `timeout` after its first join is aborted by
//     expire(), its members told.
//
// Errors of join (the group is unchanged; errors name the field):
//   the TpJoin itself invalid (as the decoder checks)     kInvalidArgument
//   world differs from the group's                         kInvalidArgument
//   rank already held by another node                      kFailedPrecondition
//   the node already holds another rank of the group       kFailedPrecondition
//   rank 0's unique id differs from its earlier join       kFailedPrecondition
//   too many groups pending (options.max_pending_groups)   kResourceExhausted
//
// Threading: not thread-safe; the owner serializes calls (the cluster
// scheduler runs under the cluster backend's lock).
#pragma once

#include <chrono>
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/control_protocol.h"
#include "common/status.h"

namespace kvgate::coordinator {

struct TpRendezvousOptions {
  // A group not complete this long after its first join is aborted.
  std::chrono::milliseconds timeout{60000};
  // Groups waiting for ranks at once; more joins of new groups are refused.
  size_t max_pending_groups = 1024;
};

// A group that ended without completing: the members to tell and why (the
// Error to send each: request id none, status.code(), status.message(),
// which starts with control::tp_group_error_prefix(group)).
struct TpAbort {
  std::string group;
  std::vector<NodeId> notify;
  Status status;
};

class TpRendezvous {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  explicit TpRendezvous(TpRendezvousOptions options = {});

  // Outcome of an accepted join: `ready` set when this join completed the
  // group (send it to every node of `ready->members`; the group is then
  // forgotten).
  struct Joined {
    std::optional<control::TpReady> ready;
  };
  // `node_id` / `node_name`: the joining node's registration. Errors: see
  // the table above; the message starts with "tp group '<name>': ".
  Result<Joined> join(NodeId node_id, const std::string& node_name, const control::TpJoin& join,
                      TimePoint now);

  // The node's connection dropped: every incomplete group it had joined is
  // aborted; returns one TpAbort per group with the OTHER members to tell.
  std::vector<TpAbort> node_lost(NodeId node_id);

  // Aborts the groups whose first join is older than options.timeout
  // (kDeadlineExceeded); returns whom to tell.
  std::vector<TpAbort> expire(TimePoint now);

  size_t pending_groups() const { return groups_.size(); }
  const TpRendezvousOptions& options() const { return options_; }

 private:
  struct Group {
    uint32_t world = 0;
    TimePoint started{};
    control::Bytes unique_id;                        // from rank 0, once joined
    std::vector<std::optional<control::TpMember>> ranks;  // index: rank
  };

  TpRendezvousOptions options_;
  std::map<std::string, Group> groups_;  // incomplete groups only
};

}  // namespace kvgate::coordinator
