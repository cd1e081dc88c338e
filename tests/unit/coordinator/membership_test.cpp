// Membership: registration checks, heartbeats, the deadline sweep, closed
// connections, and the outstanding reservations placement subtracts.
#include "coordinator/membership.h"

#include <gtest/gtest.h>

#include "tests/unit/coordinator/cluster_test_util.h"

namespace kvgate::coordinator {
namespace {

using namespace std::chrono_literals;
using control::NodeRole;
using testing::FakeLink;

control::Hello hello(NodeRole role, uint64_t id, std::string name = "", std::string model = "m") {
  control::Hello h;
  h.role = role;
  h.node_id = NodeId(id);
  h.node_name = std::move(name);
  h.model_name = std::move(model);
  h.control_address = "127.0.0.1:7200";
  h.transport_name = "loopback";
  h.transport_address = {std::byte{1}, std::byte{2}};
  return h;
}

control::Heartbeat beat(uint64_t id, uint64_t free_bytes, uint64_t queued_tokens = 0) {
  control::Heartbeat hb;
  hb.node_id = NodeId(id);
  hb.pool_free_bytes = free_bytes;
  hb.queued_tokens = queued_tokens;
  return hb;
}

MembershipOptions options() {
  MembershipOptions o;
  o.model_name = "m";
  o.node_deadline = 500ms;
  o.forget_after = 2000ms;
  return o;
}

TEST(Membership, RegistersWithTheHelloFields) {
  Membership m(options());
  const auto t0 = ClusterClock::now();
  auto link = std::make_shared<FakeLink>();
  ASSERT_TRUE(m.register_node(hello(NodeRole::kDecode, 7, "decode-a"), link, t0).ok());
  const NodeInfo* n = m.find(NodeId(7));
  ASSERT_NE(n, nullptr);
  EXPECT_EQ(n->role, NodeRole::kDecode);
  EXPECT_EQ(n->name, "decode-a");
  EXPECT_EQ(n->control_address, "127.0.0.1:7200");
  EXPECT_EQ(n->transport_name, "loopback");
  EXPECT_EQ(n->transport_address.size(), 2u);
  EXPECT_TRUE(n->live());
  EXPECT_EQ(n->link.get(), link.get());
  EXPECT_EQ(m.counts().live_decode, 1);
  EXPECT_EQ(m.counts().live_prefill, 0);
  // An unnamed node gets a name from its role and id.
  ASSERT_TRUE(m.register_node(hello(NodeRole::kPrefill, 0x2a), std::make_shared<FakeLink>(), t0).ok());
  EXPECT_EQ(m.find(NodeId(0x2a))->name, "prefill-000000000000002a");
}

TEST(Membership, RefusesBadHellos) {
  Membership m(options());
  const auto t0 = ClusterClock::now();
  EXPECT_EQ(m.check_hello(hello(NodeRole::kDecode, 1, "x", "other")).code(),
            StatusCode::kInvalidArgument);
  EXPECT_NE(m.check_hello(hello(NodeRole::kDecode, 1, "x", "other")).message().find("'other'"),
            std::string::npos);
  EXPECT_EQ(m.check_hello(hello(NodeRole::kCoordinator, 1)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.check_hello(hello(NodeRole::kDecode, 0)).code(), StatusCode::kInvalidArgument);
  auto link = std::make_shared<FakeLink>();
  ASSERT_TRUE(m.register_node(hello(NodeRole::kDecode, 1), link, t0).ok());
  // The same id again while live: refused, the first registration stays.
  auto second = std::make_shared<FakeLink>();
  Status dup = m.register_node(hello(NodeRole::kDecode, 1), second, t0);
  EXPECT_EQ(dup.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(m.find(NodeId(1))->link.get(), link.get());
  // Once its connection closed, it may register again (reconnect).
  EXPECT_TRUE(m.connection_closed(NodeId(1), link.get(), "eof", t0 + 1ms));
  EXPECT_FALSE(m.find(NodeId(1))->live());
  EXPECT_TRUE(m.register_node(hello(NodeRole::kDecode, 1), second, t0 + 2ms).ok());
  EXPECT_TRUE(m.find(NodeId(1))->live());
  EXPECT_EQ(m.find(NodeId(1))->link.get(), second.get());
}

TEST(Membership, HeartbeatsUpdateStatsAndDeadline) {
  Membership m(options());
  const auto t0 = ClusterClock::now();
  ASSERT_TRUE(m.register_node(hello(NodeRole::kDecode, 1), std::make_shared<FakeLink>(), t0).ok());
  EXPECT_EQ(m.decode_free_bytes(*m.find(NodeId(1))), 0u);  // nothing known before a heartbeat
  control::Heartbeat hb = beat(1, 1000);
  hb.pool_reserved_bytes = 20;
  hb.pool_used_bytes = 30;
  hb.in_flight_requests = 2;
  ASSERT_TRUE(m.heartbeat(NodeId(1), hb, t0 + 400ms).ok());
  const NodeInfo* n = m.find(NodeId(1));
  EXPECT_EQ(n->last.pool_free_bytes, 1000u);
  EXPECT_EQ(n->last.pool_reserved_bytes, 20u);
  EXPECT_EQ(n->last.pool_used_bytes, 30u);
  EXPECT_EQ(n->last.in_flight_requests, 2u);
  EXPECT_EQ(n->heartbeats, 1u);
  EXPECT_EQ(m.decode_free_bytes(*n), 1000u);
  // The deadline counts from the last heartbeat, not the registration.
  EXPECT_TRUE(m.sweep(t0 + 800ms).empty());
  auto down = m.sweep(t0 + 901ms);
  ASSERT_EQ(down.size(), 1u);
  EXPECT_EQ(down[0], NodeId(1));
  EXPECT_FALSE(m.find(NodeId(1))->live());
  EXPECT_NE(m.find(NodeId(1))->down_reason.find("node_deadline"), std::string::npos);
  // Heartbeats from a down node or an unknown one are errors; a heartbeat
  // naming another node on this node's connection too.
  EXPECT_EQ(m.heartbeat(NodeId(1), beat(1, 5), t0 + 950ms).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(m.heartbeat(NodeId(9), beat(9, 5), t0 + 950ms).code(), StatusCode::kNotFound);
  ASSERT_TRUE(m.register_node(hello(NodeRole::kPrefill, 2), std::make_shared<FakeLink>(), t0).ok());
  EXPECT_EQ(m.heartbeat(NodeId(2), beat(3, 5), t0 + 10ms).code(), StatusCode::kInvalidArgument);
}

TEST(Membership, DownNodesAreForgottenAfterTheirLinkIsTaken) {
  Membership m(options());
  const auto t0 = ClusterClock::now();
  auto link = std::make_shared<FakeLink>();
  ASSERT_TRUE(m.register_node(hello(NodeRole::kPrefill, 3), link, t0).ok());
  ASSERT_EQ(m.sweep(t0 + 600ms).size(), 1u);
  EXPECT_EQ(m.take_link(NodeId(3)).get(), link.get());
  EXPECT_EQ(m.counts().down_prefill, 1);
  EXPECT_TRUE(m.sweep(t0 + 2000ms).empty());
  EXPECT_NE(m.find(NodeId(3)), nullptr);
  m.sweep(t0 + 2700ms);  // down at 600 ms + forget_after 2 s
  EXPECT_EQ(m.find(NodeId(3)), nullptr);
}

TEST(Membership, ClosedOldConnectionDoesNotDownTheNewRegistration) {
  Membership m(options());
  const auto t0 = ClusterClock::now();
  auto old_link = std::make_shared<FakeLink>();
  auto new_link = std::make_shared<FakeLink>();
  ASSERT_TRUE(m.register_node(hello(NodeRole::kDecode, 1), old_link, t0).ok());
  ASSERT_TRUE(m.connection_closed(NodeId(1), old_link.get(), "reset", t0));
  ASSERT_TRUE(m.register_node(hello(NodeRole::kDecode, 1), new_link, t0).ok());
  EXPECT_FALSE(m.connection_closed(NodeId(1), old_link.get(), "reset again", t0));
  EXPECT_TRUE(m.find(NodeId(1))->live());
  EXPECT_TRUE(m.is_current_link(NodeId(1), new_link.get()));
  EXPECT_FALSE(m.is_current_link(NodeId(1), old_link.get()));
}

TEST(Membership, OutstandingReservationsUntilAHeartbeatAccountsForThem) {
  Membership m(options());
  const auto t0 = ClusterClock::now();
  ASSERT_TRUE(m.register_node(hello(NodeRole::kDecode, 1), std::make_shared<FakeLink>(), t0).ok());
  ASSERT_TRUE(m.heartbeat(NodeId(1), beat(1, 1000), t0).ok());
  m.add_reservation(NodeId(1), RequestId(10), 300);
  m.add_reservation(NodeId(1), RequestId(11), 200);
  m.add_reservation(NodeId(1), RequestId(12), 100);
  const NodeInfo& n = *m.find(NodeId(1));
  EXPECT_EQ(m.decode_free_bytes(n), 400u);
  m.reservation_answered(NodeId(1), RequestId(11), /*granted=*/false);  // denied: gone at once
  EXPECT_EQ(m.decode_free_bytes(n), 600u);
  m.reservation_answered(NodeId(1), RequestId(10), /*granted=*/true);  // until the next heartbeat
  EXPECT_EQ(m.decode_free_bytes(n), 600u);
  // The next heartbeat counts the granted lease; the pending Reserve stays.
  ASSERT_TRUE(m.heartbeat(NodeId(1), beat(1, 700), t0 + 1ms).ok());
  EXPECT_EQ(m.decode_free_bytes(n), 600u);  // 700 - 100 pending
  m.remove_reservation(NodeId(1), RequestId(12));
  EXPECT_EQ(m.decode_free_bytes(n), 700u);
  // Never below zero.
  m.add_reservation(NodeId(1), RequestId(13), 5000);
  EXPECT_EQ(m.decode_free_bytes(n), 0u);
}

TEST(Membership, PrefillQueuedTokensIncludeJobsSentSinceTheHeartbeat) {
  Membership m(options());
  const auto t0 = ClusterClock::now();
  ASSERT_TRUE(m.register_node(hello(NodeRole::kPrefill, 2), std::make_shared<FakeLink>(), t0).ok());
  ASSERT_TRUE(m.heartbeat(NodeId(2), beat(2, 0, 50), t0).ok());
  m.add_prefill_job(NodeId(2), 30);
  EXPECT_EQ(m.prefill_queued_tokens(*m.find(NodeId(2))), 80u);
  EXPECT_EQ(m.find(NodeId(2))->outstanding_prefill_jobs, 1u);
  ASSERT_TRUE(m.heartbeat(NodeId(2), beat(2, 0, 60), t0 + 1ms).ok());
  EXPECT_EQ(m.prefill_queued_tokens(*m.find(NodeId(2))), 60u);
}

}  // namespace
}  // namespace kvgate::coordinator
