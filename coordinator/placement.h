// Placement: which live node gets a request (DESIGN.md §7, docs/cluster.md
// steps 1 and 3). Pure functions over Membership.
//
//   decode   the live decode node with the most free bytes (last heartbeat
//            minus this coordinator's outstanding reservations) that is at
//            least the predicted footprint; ties: the lower node id.
//   prefill  the live prefill node with the fewest queued prompt tokens
//            (heartbeat plus jobs sent since); ties: fewer queued jobs,
//            then the lower node id.
//
// `exclude` lists nodes that already refused this request (a ReserveDeny
// before their next heartbeat, a full prefill queue); `avoid` lists nodes of
// a failed attempt, used only when no other node fits.
//
// Nodes without a heartbeat yet report 0 free bytes, so a decode node is
// used only once it has said what it has.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "common/control_protocol.h"
#include "coordinator/membership.h"

namespace kvgate::coordinator {

struct PlacementChoice {
  std::optional<NodeId> node;
  uint64_t free_bytes = 0;      // decode: the chosen node's free bytes
  uint64_t queued_tokens = 0;   // prefill: the chosen node's queued tokens
  std::string why_not;          // when no node fits: "no live decode node", ...
};

PlacementChoice choose_decode_node(const Membership& membership, uint64_t predicted_bytes,
                                   std::span<const NodeId> exclude = {},
                                   std::span<const NodeId> avoid = {});

PlacementChoice choose_prefill_node(const Membership& membership,
                                    std::span<const NodeId> exclude = {},
                                    std::span<const NodeId> avoid = {});

}  // namespace kvgate::coordinator
