#include "coordinator/placement.h"

#include <algorithm>

namespace kvgate::coordinator {

namespace {

bool contains(std::span<const NodeId> ids, NodeId id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

PlacementChoice decode_pass(const Membership& m, uint64_t predicted,
                            std::span<const NodeId> exclude, std::span<const NodeId> avoid,
                            bool use_avoided) {
  PlacementChoice best;
  int64_t live = 0;
  uint64_t largest = 0;
  std::string largest_name;
  for (const auto& [id, node] : m.nodes()) {
    if (node.role != control::NodeRole::kDecode || !node.live()) continue;
    ++live;
    if (contains(exclude, id) || (!use_avoided && contains(avoid, id))) continue;
    const uint64_t free = m.decode_free_bytes(node);
    if (free > largest || largest_name.empty()) {
      largest = free;
      largest_name = node.name;
    }
    if (free < predicted) continue;
    // Strictly more free wins; nodes iterate in id order, so ties keep the lower id.
    if (!best.node || free > best.free_bytes) {
      best.node = id;
      best.free_bytes = free;
    }
  }
  if (!best.node) {
    if (live == 0) {
      best.why_not = "no live decode node";
    } else if (largest_name.empty()) {
      best.why_not = "every live decode node refused the reservation";
    } else {
      best.why_not = "no decode node has " + std::to_string(predicted) +
                     " free bytes (most: " + std::to_string(largest) + " on '" + largest_name +
                     "')";
    }
  }
  return best;
}

PlacementChoice prefill_pass(const Membership& m, std::span<const NodeId> exclude,
                             std::span<const NodeId> avoid, bool use_avoided) {
  PlacementChoice best;
  uint32_t best_jobs = 0;
  int64_t live = 0;
  for (const auto& [id, node] : m.nodes()) {
    if (node.role != control::NodeRole::kPrefill || !node.live()) continue;
    ++live;
    if (contains(exclude, id) || (!use_avoided && contains(avoid, id))) continue;
    const uint64_t tokens = m.prefill_queued_tokens(node);
    const uint32_t jobs = node.last.queue_length + node.outstanding_prefill_jobs;
    if (!best.node || tokens < best.queued_tokens ||
        (tokens == best.queued_tokens && jobs < best_jobs)) {
      best.node = id;
      best.queued_tokens = tokens;
      best_jobs = jobs;
    }
  }
  if (!best.node) {
    best.why_not = live == 0 ? "no live prefill node"
                             : "every live prefill node refused the job (queue full)";
  }
  return best;
}

}  // namespace

PlacementChoice choose_decode_node(const Membership& membership, uint64_t predicted_bytes,
                                   std::span<const NodeId> exclude,
                                   std::span<const NodeId> avoid) {
  PlacementChoice c = decode_pass(membership, predicted_bytes, exclude, avoid, false);
  if (!c.node && !avoid.empty()) {
    // Only avoided nodes fit (or none): a node of a failed attempt beats no node.
    return decode_pass(membership, predicted_bytes, exclude, avoid, true);
  }
  return c;
}

PlacementChoice choose_prefill_node(const Membership& membership,
                                    std::span<const NodeId> exclude,
                                    std::span<const NodeId> avoid) {
  PlacementChoice c = prefill_pass(membership, exclude, avoid, false);
  if (!c.node && !avoid.empty()) return prefill_pass(membership, exclude, avoid, true);
  return c;
}

}  // namespace kvgate::coordinator
