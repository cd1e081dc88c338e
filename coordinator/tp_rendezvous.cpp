#include "coordinator/tp_rendezvous.h"

#include <utility>

namespace kvgate::coordinator {

using control::kMaxTpGroupNameBytes;
using control::kMaxTpWorld;
using control::kTpUniqueIdBytes;
using control::tp_group_error_prefix;

namespace {

std::string node_label(NodeId id, const std::string& name) {
  return "node '" + name + "' (" + std::to_string(id.value()) + ")";
}

// The decoder's checks again: join() is also called with messages built in
// process (tests, a future local path), and must not trust them either.
Status check_join(const control::TpJoin& j) {
  const std::string p = tp_group_error_prefix(j.group);
  if (j.group.empty()) return invalid_argument(p + "TpJoin.group: empty");
  if (j.group.size() > kMaxTpGroupNameBytes) {
    return invalid_argument(p + "TpJoin.group: " + std::to_string(j.group.size()) +
                            " bytes, at most " + std::to_string(kMaxTpGroupNameBytes));
  }
  if (j.world < 1 || j.world > kMaxTpWorld) {
    return invalid_argument(p + "TpJoin.world " + std::to_string(j.world) + " is not in 1.." +
                            std::to_string(kMaxTpWorld));
  }
  if (j.rank >= j.world) {
    return invalid_argument(p + "TpJoin.rank " + std::to_string(j.rank) + " >= world " +
                            std::to_string(j.world));
  }
  if (j.rank == 0 && j.unique_id.size() != kTpUniqueIdBytes) {
    return invalid_argument(p + "TpJoin.unique_id: " + std::to_string(j.unique_id.size()) +
                            " bytes from rank 0, need " + std::to_string(kTpUniqueIdBytes));
  }
  if (j.rank != 0 && !j.unique_id.empty()) {
    return invalid_argument(p + "TpJoin.unique_id: " + std::to_string(j.unique_id.size()) +
                            " bytes from rank " + std::to_string(j.rank) +
                            ", only rank 0 sends one");
  }
  return Status();
}

}  // namespace

TpRendezvous::TpRendezvous(TpRendezvousOptions options) : options_(options) {}

Result<TpRendezvous::Joined> TpRendezvous::join(NodeId node_id, const std::string& node_name,
                                                const control::TpJoin& j, TimePoint now) {
  KVGATE_RETURN_IF_ERROR(check_join(j));
  const std::string p = tp_group_error_prefix(j.group);
  auto it = groups_.find(j.group);
  if (it == groups_.end()) {
    if (groups_.size() >= options_.max_pending_groups) {
      return resource_exhausted(p + std::to_string(groups_.size()) +
                                " groups are already waiting for ranks (at most " +
                                std::to_string(options_.max_pending_groups) + ")");
    }
    Group g;
    g.world = j.world;
    g.started = now;
    g.ranks.resize(j.world);
    it = groups_.emplace(j.group, std::move(g)).first;
  }
  Group& g = it->second;
  if (j.world != g.world) {
    return invalid_argument(p + "TpJoin.world " + std::to_string(j.world) +
                            " differs from the group's world " + std::to_string(g.world));
  }
  for (uint32_t r = 0; r < g.world; ++r) {
    if (r != j.rank && g.ranks[r] && g.ranks[r]->node_id == node_id) {
      return failed_precondition(p + "TpJoin.rank " + std::to_string(j.rank) + ": " +
                                 node_label(node_id, node_name) + " already joined as rank " +
                                 std::to_string(r));
    }
  }
  std::optional<control::TpMember>& slot = g.ranks[j.rank];
  if (slot) {
    if (slot->node_id != node_id) {
      return failed_precondition(p + "TpJoin.rank " + std::to_string(j.rank) +
                                 " is already held by " +
                                 node_label(slot->node_id, slot->node_name));
    }
    if (j.rank == 0 && j.unique_id != g.unique_id) {
      return failed_precondition(p + "TpJoin.unique_id differs from rank 0's earlier join");
    }
    return Joined{};  // a retry of the same join
  }
  slot = control::TpMember{node_id, node_name};
  if (j.rank == 0) g.unique_id = j.unique_id;

  for (const auto& m : g.ranks) {
    if (!m) return Joined{};
  }
  control::TpReady ready;
  ready.group = j.group;
  ready.world = g.world;
  ready.unique_id = std::move(g.unique_id);
  ready.members.reserve(g.world);
  for (auto& m : g.ranks) ready.members.push_back(std::move(*m));
  groups_.erase(it);  // forgotten once complete (see the header)
  return Joined{std::move(ready)};
}

std::vector<TpAbort> TpRendezvous::node_lost(NodeId node_id) {
  std::vector<TpAbort> out;
  for (auto it = groups_.begin(); it != groups_.end();) {
    const Group& g = it->second;
    std::optional<uint32_t> lost_rank;
    std::string lost_name;
    std::vector<NodeId> others;
    for (uint32_t r = 0; r < g.world; ++r) {
      if (!g.ranks[r]) continue;
      if (g.ranks[r]->node_id == node_id) {
        lost_rank = r;
        lost_name = g.ranks[r]->node_name;
      } else {
        others.push_back(g.ranks[r]->node_id);
      }
    }
    if (!lost_rank) {
      ++it;
      continue;
    }
    out.push_back(TpAbort{
        it->first, std::move(others),
        unavailable(tp_group_error_prefix(it->first) + "rank " + std::to_string(*lost_rank) + " (" +
                    node_label(node_id, lost_name) +
                    ") left before the group completed; join again")});
    it = groups_.erase(it);
  }
  return out;
}

std::vector<TpAbort> TpRendezvous::expire(TimePoint now) {
  std::vector<TpAbort> out;
  for (auto it = groups_.begin(); it != groups_.end();) {
    const Group& g = it->second;
    if (now - g.started < options_.timeout) {
      ++it;
      continue;
    }
    std::vector<NodeId> members;
    std::string missing;
    for (uint32_t r = 0; r < g.world; ++r) {
      if (g.ranks[r]) {
        members.push_back(g.ranks[r]->node_id);
      } else {
        missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
    }
    out.push_back(TpAbort{
        it->first, std::move(members),
        Status(StatusCode::kDeadlineExceeded,
               tp_group_error_prefix(it->first) + "not complete after " +
                   std::to_string(options_.timeout.count()) + " ms (ranks " + missing +
                   " of world " + std::to_string(g.world) + " never joined)")});
    it = groups_.erase(it);
  }
  return out;
}

}  // namespace kvgate::coordinator
