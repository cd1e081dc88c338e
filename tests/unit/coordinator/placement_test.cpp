// Placement: the decode node with the most free bytes that fits, the
// prefill node with the fewest queued tokens; exclusions and preferences.
#include "coordinator/placement.h"

#include <gtest/gtest.h>

#include "tests/unit/coordinator/cluster_test_util.h"

namespace kvgate::coordinator {
namespace {

using control::NodeRole;
using testing::FakeLink;

class PlacementTest : public ::testing::Test {
 protected:
  void add(NodeRole role, uint64_t id, uint64_t free_bytes, uint64_t queued_tokens = 0,
           uint32_t queue_length = 0) {
    control::Hello h;
    h.role = role;
    h.node_id = NodeId(id);
    h.node_name = "n" + std::to_string(id);
    h.model_name = "m";
    ASSERT_TRUE(m_.register_node(h, std::make_shared<FakeLink>(), t0_).ok());
    control::Heartbeat hb;
    hb.pool_free_bytes = free_bytes;
    hb.queued_tokens = queued_tokens;
    hb.queue_length = queue_length;
    ASSERT_TRUE(m_.heartbeat(NodeId(id), hb, t0_).ok());
  }
  Membership m_{MembershipOptions{"m", std::chrono::milliseconds(1000), std::chrono::milliseconds(5000)}};
  ClusterClock::time_point t0_ = ClusterClock::now();
};

TEST_F(PlacementTest, DecodeMostFreeThatFits) {
  add(NodeRole::kDecode, 1, 500);
  add(NodeRole::kDecode, 2, 900);
  add(NodeRole::kDecode, 3, 700);
  add(NodeRole::kPrefill, 4, 0);  // not a decode node, whatever it reports
  auto c = choose_decode_node(m_, 600);
  ASSERT_TRUE(c.node);
  EXPECT_EQ(*c.node, NodeId(2));
  EXPECT_EQ(c.free_bytes, 900u);
  // Too big for everyone: none, saying the largest.
  c = choose_decode_node(m_, 1000);
  EXPECT_FALSE(c.node);
  EXPECT_NE(c.why_not.find("1000"), std::string::npos);
  EXPECT_NE(c.why_not.find("900"), std::string::npos);
  EXPECT_NE(c.why_not.find("'n2'"), std::string::npos);
  // Outstanding reservations count against the node.
  m_.add_reservation(NodeId(2), RequestId(1), 400);
  c = choose_decode_node(m_, 600);
  ASSERT_TRUE(c.node);
  EXPECT_EQ(*c.node, NodeId(3));
}

TEST_F(PlacementTest, DecodeExcludeAvoidAndTies) {
  add(NodeRole::kDecode, 5, 800);
  add(NodeRole::kDecode, 2, 800);
  auto c = choose_decode_node(m_, 100);
  ASSERT_TRUE(c.node);
  EXPECT_EQ(*c.node, NodeId(2));  // tie: lower id
  const NodeId ex[] = {NodeId(2)};
  c = choose_decode_node(m_, 100, ex);
  ASSERT_TRUE(c.node);
  EXPECT_EQ(*c.node, NodeId(5));
  const NodeId both[] = {NodeId(2), NodeId(5)};
  c = choose_decode_node(m_, 100, both);
  EXPECT_FALSE(c.node);
  EXPECT_FALSE(c.why_not.empty());
  // Avoided nodes are used only when nothing else fits.
  const NodeId avoid[] = {NodeId(2)};
  c = choose_decode_node(m_, 100, {}, avoid);
  EXPECT_EQ(*c.node, NodeId(5));
  c = choose_decode_node(m_, 100, ex, std::span<const NodeId>(both));
  ASSERT_TRUE(c.node);
  EXPECT_EQ(*c.node, NodeId(5));
}

TEST_F(PlacementTest, DownNodesAreNotChosen) {
  add(NodeRole::kDecode, 1, 900);
  add(NodeRole::kDecode, 2, 100);
  add(NodeRole::kPrefill, 3, 0);
  auto link = m_.find(NodeId(1))->link.get();
  ASSERT_TRUE(m_.connection_closed(NodeId(1), link, "eof", t0_));
  auto c = choose_decode_node(m_, 50);
  ASSERT_TRUE(c.node);
  EXPECT_EQ(*c.node, NodeId(2));
  ASSERT_TRUE(m_.connection_closed(NodeId(2), m_.find(NodeId(2))->link.get(), "eof", t0_));
  c = choose_decode_node(m_, 50);
  EXPECT_FALSE(c.node);
  EXPECT_EQ(c.why_not, "no live decode node");
}

TEST_F(PlacementTest, PrefillFewestQueuedTokens) {
  EXPECT_EQ(choose_prefill_node(m_).why_not, "no live prefill node");
  add(NodeRole::kPrefill, 1, 0, 300);
  add(NodeRole::kPrefill, 2, 0, 100);
  add(NodeRole::kPrefill, 3, 0, 200);
  add(NodeRole::kDecode, 4, 1000);
  auto c = choose_prefill_node(m_);
  ASSERT_TRUE(c.node);
  EXPECT_EQ(*c.node, NodeId(2));
  EXPECT_EQ(c.queued_tokens, 100u);
  // Jobs sent since the heartbeat count.
  m_.add_prefill_job(NodeId(2), 150);
  c = choose_prefill_node(m_);
  EXPECT_EQ(*c.node, NodeId(3));
  const NodeId ex[] = {NodeId(3)};
  c = choose_prefill_node(m_, ex);
  EXPECT_EQ(*c.node, NodeId(2));  // 250 < 300
}

TEST_F(PlacementTest, PrefillTieBreaksOnQueuedJobsThenId) {
  add(NodeRole::kPrefill, 7, 0, 100, 3);
  add(NodeRole::kPrefill, 8, 0, 100, 1);
  add(NodeRole::kPrefill, 9, 0, 100, 1);
  auto c = choose_prefill_node(m_);
  ASSERT_TRUE(c.node);
  EXPECT_EQ(*c.node, NodeId(8));
}

}  // namespace
}  // namespace kvgate::coordinator
