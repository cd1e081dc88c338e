// TpRendezvous (coordinator/tp_rendezvous.h) alone, with explicit time.
#include "coordinator/tp_rendezvous.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

namespace kvgate::coordinator {
namespace {

using namespace std::chrono_literals;
using control::Bytes;
using control::TpJoin;
using control::TpReady;

const TpRendezvous::TimePoint kT0{std::chrono::seconds(1000)};

Bytes nccl_id(uint8_t seed) {
  Bytes b(control::kTpUniqueIdBytes);
  for (size_t i = 0; i < b.size(); ++i) b[i] = std::byte(static_cast<uint8_t>(seed ^ (i * 7)));
  return b;
}

TpJoin join_msg(const std::string& group, uint32_t rank, uint32_t world, Bytes id = {}) {
  return TpJoin{group, rank, world, std::move(id)};
}

std::string name_of(uint64_t node) { return "gpu-" + std::to_string(node); }

// Joins node `node` (named gpu-<node>) and expects success.
std::optional<TpReady> ok_join(TpRendezvous& tp, uint64_t node, const TpJoin& j,
                               TpRendezvous::TimePoint now = kT0) {
  auto r = tp.join(NodeId(node), name_of(node), j, now);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? r->ready : std::nullopt;
}

void expect_error(const Result<TpRendezvous::Joined>& r, StatusCode code, const std::string& text) {
  ASSERT_FALSE(r.ok()) << "accepted; expected: " << text;
  EXPECT_EQ(r.status().code(), code) << r.status().to_string();
  EXPECT_EQ(r.status().message(), text);
}

TEST(TpRendezvous, GroupOfThreeInEveryJoinOrder) {
  const Bytes id = nccl_id(0xA5);
  std::array<uint32_t, 3> order = {0, 1, 2};
  int orders = 0;
  do {
    TpRendezvous tp;
    std::optional<TpReady> ready;
    for (size_t i = 0; i < order.size(); ++i) {
      const uint32_t rank = order[i];
      // Node ids are not rank-ordered: rank r is node 100 + 7 * (2 - r).
      const uint64_t node = 100 + 7 * (2 - rank);
      auto got = ok_join(tp, node, join_msg("g", rank, 3, rank == 0 ? id : Bytes{}));
      if (i + 1 < order.size()) {
        EXPECT_FALSE(got.has_value()) << "ready before the last rank";
        EXPECT_EQ(tp.pending_groups(), 1u);
      } else {
        ready = got;
      }
    }
    ASSERT_TRUE(ready.has_value());
    EXPECT_EQ(ready->group, "g");
    EXPECT_EQ(ready->world, 3u);
    EXPECT_EQ(ready->unique_id, id);
    ASSERT_EQ(ready->members.size(), 3u);
    for (uint32_t r = 0; r < 3; ++r) {
      EXPECT_EQ(ready->members[r].node_id, NodeId(100 + 7 * (2 - r)));
      EXPECT_EQ(ready->members[r].node_name, name_of(100 + 7 * (2 - r)));
    }
    EXPECT_EQ(tp.pending_groups(), 0u);  // forgotten once complete
    ++orders;
  } while (std::next_permutation(order.begin(), order.end()));
  EXPECT_EQ(orders, 6);
}

TEST(TpRendezvous, WorldOfOneIsReadyAtOnce) {
  TpRendezvous tp;
  auto ready = ok_join(tp, 5, join_msg("solo", 0, 1, nccl_id(1)));
  ASSERT_TRUE(ready.has_value());
  EXPECT_EQ(ready->members.size(), 1u);
  EXPECT_EQ(ready->members[0].node_id, NodeId(5));
}

TEST(TpRendezvous, RefusedJoinsNameTheFieldAndLeaveTheGroupAlone) {
  TpRendezvous tp;
  const Bytes id = nccl_id(3);
  ok_join(tp, 1, join_msg("g", 0, 3, id));
  ok_join(tp, 2, join_msg("g", 1, 3));

  expect_error(tp.join(NodeId(3), "gpu-3", join_msg("g", 2, 4), kT0),
               StatusCode::kInvalidArgument,
               "tp group 'g': TpJoin.world 4 differs from the group's world 3");
  expect_error(tp.join(NodeId(3), "gpu-3", join_msg("g", 1, 3), kT0),
               StatusCode::kFailedPrecondition,
               "tp group 'g': TpJoin.rank 1 is already held by node 'gpu-2' (2)");
  expect_error(tp.join(NodeId(2), "gpu-2", join_msg("g", 2, 3), kT0),
               StatusCode::kFailedPrecondition,
               "tp group 'g': TpJoin.rank 2: node 'gpu-2' (2) already joined as rank 1");
  expect_error(tp.join(NodeId(1), "gpu-1", join_msg("g", 0, 3, nccl_id(4)), kT0),
               StatusCode::kFailedPrecondition,
               "tp group 'g': TpJoin.unique_id differs from rank 0's earlier join");
  // The message's own checks (as the decoder's).
  expect_error(tp.join(NodeId(3), "gpu-3", join_msg("g", 3, 3), kT0),
               StatusCode::kInvalidArgument, "tp group 'g': TpJoin.rank 3 >= world 3");
  expect_error(tp.join(NodeId(3), "gpu-3", join_msg("h", 0, 3, Bytes(16)), kT0),
               StatusCode::kInvalidArgument,
               "tp group 'h': TpJoin.unique_id: 16 bytes from rank 0, need 128");
  expect_error(tp.join(NodeId(3), "gpu-3", join_msg("h", 0, 3), kT0),
               StatusCode::kInvalidArgument,
               "tp group 'h': TpJoin.unique_id: 0 bytes from rank 0, need 128");
  expect_error(tp.join(NodeId(3), "gpu-3", join_msg("g", 2, 3, id), kT0),
               StatusCode::kInvalidArgument,
               "tp group 'g': TpJoin.unique_id: 128 bytes from rank 2, only rank 0 sends one");
  expect_error(tp.join(NodeId(3), "gpu-3", join_msg("g", 0, 0, id), kT0),
               StatusCode::kInvalidArgument, "tp group 'g': TpJoin.world 0 is not in 1..64");
  expect_error(tp.join(NodeId(3), "gpu-3", join_msg("", 0, 1, id), kT0),
               StatusCode::kInvalidArgument, "tp group '': TpJoin.group: empty");
  EXPECT_EQ(tp.pending_groups(), 1u);  // "h" was never created

  // A retry of an accepted join changes nothing.
  EXPECT_FALSE(ok_join(tp, 2, join_msg("g", 1, 3)).has_value());
  EXPECT_FALSE(ok_join(tp, 1, join_msg("g", 0, 3, id)).has_value());

  // The group still completes with the members it had.
  auto ready = ok_join(tp, 3, join_msg("g", 2, 3));
  ASSERT_TRUE(ready.has_value());
  EXPECT_EQ(ready->unique_id, id);
  EXPECT_EQ(ready->members[0].node_id, NodeId(1));
  EXPECT_EQ(ready->members[1].node_id, NodeId(2));
  EXPECT_EQ(ready->members[2].node_id, NodeId(3));
}

TEST(TpRendezvous, ACompletedGroupIsForgottenAndItsNameStartsANewGroup) {
  TpRendezvous tp;
  ok_join(tp, 1, join_msg("g", 0, 2, nccl_id(1)));
  ASSERT_TRUE(ok_join(tp, 2, join_msg("g", 1, 2)).has_value());
  EXPECT_EQ(tp.pending_groups(), 0u);
  // The same name again: a new group with another world and id, other nodes.
  EXPECT_FALSE(ok_join(tp, 2, join_msg("g", 2, 3)).has_value());
  EXPECT_FALSE(ok_join(tp, 7, join_msg("g", 0, 3, nccl_id(9))).has_value());
  auto ready = ok_join(tp, 1, join_msg("g", 1, 3));
  ASSERT_TRUE(ready.has_value());
  EXPECT_EQ(ready->world, 3u);
  EXPECT_EQ(ready->unique_id, nccl_id(9));
  EXPECT_EQ(ready->members[0].node_id, NodeId(7));
  EXPECT_EQ(ready->members[1].node_id, NodeId(1));
  EXPECT_EQ(ready->members[2].node_id, NodeId(2));
}

TEST(TpRendezvous, NodeLostAbortsItsIncompleteGroupsAndNotifiesTheOthers) {
  TpRendezvous tp;
  ok_join(tp, 1, join_msg("a", 0, 4, nccl_id(1)));
  ok_join(tp, 2, join_msg("a", 2, 4));
  ok_join(tp, 3, join_msg("a", 3, 4));
  ok_join(tp, 2, join_msg("b", 1, 2));  // node 2 is in two groups
  ok_join(tp, 9, join_msg("c", 1, 2));  // node 2 is not in "c"

  auto aborts = tp.node_lost(NodeId(2));
  ASSERT_EQ(aborts.size(), 2u);
  std::sort(aborts.begin(), aborts.end(),
            [](const TpAbort& x, const TpAbort& y) { return x.group < y.group; });
  EXPECT_EQ(aborts[0].group, "a");
  EXPECT_EQ(aborts[0].notify, (std::vector<NodeId>{NodeId(1), NodeId(3)}));
  EXPECT_EQ(aborts[0].status.code(), StatusCode::kUnavailable);
  EXPECT_EQ(aborts[0].status.message(),
            "tp group 'a': rank 2 (node 'gpu-2' (2)) left before the group completed; join again");
  EXPECT_EQ(aborts[1].group, "b");
  EXPECT_TRUE(aborts[1].notify.empty());  // it was alone
  EXPECT_EQ(tp.pending_groups(), 1u);     // "c" untouched

  // A lost node that is in no group: nothing.
  EXPECT_TRUE(tp.node_lost(NodeId(42)).empty());
  // "a" starts over: the earlier members' joins count no more.
  EXPECT_FALSE(ok_join(tp, 1, join_msg("a", 0, 2, nccl_id(5))).has_value());
  EXPECT_TRUE(ok_join(tp, 3, join_msg("a", 1, 2)).has_value());
}

TEST(TpRendezvous, ExpireAbortsGroupsIncompletePastTheTimeout) {
  TpRendezvous tp(TpRendezvousOptions{10s, 16});
  ok_join(tp, 1, join_msg("old", 0, 3, nccl_id(1)), kT0);
  ok_join(tp, 2, join_msg("old", 2, 3), kT0 + 9s);  // joining later does not extend it
  ok_join(tp, 3, join_msg("new", 0, 2, nccl_id(2)), kT0 + 5s);

  EXPECT_TRUE(tp.expire(kT0 + 9999ms).empty());
  auto aborts = tp.expire(kT0 + 10s);
  ASSERT_EQ(aborts.size(), 1u);
  EXPECT_EQ(aborts[0].group, "old");
  EXPECT_EQ(aborts[0].notify, (std::vector<NodeId>{NodeId(1), NodeId(2)}));
  EXPECT_EQ(aborts[0].status.code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(aborts[0].status.message(),
            "tp group 'old': not complete after 10000 ms (ranks 1 of world 3 never joined)");
  EXPECT_EQ(tp.pending_groups(), 1u);
  aborts = tp.expire(kT0 + 15s);
  ASSERT_EQ(aborts.size(), 1u);
  EXPECT_EQ(aborts[0].group, "new");
  EXPECT_EQ(tp.pending_groups(), 0u);
}

TEST(TpRendezvous, PendingGroupsAreBounded) {
  TpRendezvous tp(TpRendezvousOptions{10s, 2});
  ok_join(tp, 1, join_msg("g1", 1, 2));
  ok_join(tp, 1, join_msg("g2", 1, 2));
  expect_error(tp.join(NodeId(1), "gpu-1", join_msg("g3", 1, 2), kT0),
               StatusCode::kResourceExhausted,
               "tp group 'g3': 2 groups are already waiting for ranks (at most 2)");
  // Joining an existing group still works.
  EXPECT_TRUE(ok_join(tp, 2, join_msg("g1", 0, 2, nccl_id(1))).has_value());
}

}  // namespace
}  // namespace kvgate::coordinator
