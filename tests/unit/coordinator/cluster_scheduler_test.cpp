// ClusterScheduler: docs/cluster.md's message flow and failure table,
// driven with recording links and explicit time (no sockets, no sleeps).
#include "coordinator/cluster_scheduler.h"

#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "tests/unit/coordinator/cluster_test_util.h"

namespace kvgate::coordinator {
namespace {

using namespace std::chrono_literals;
using control::NodeRole;
using testing::FakeLink;
using testing::RecordingSink;

class SchedulerTest : public ::testing::Test {
 protected:
  SchedulerTest() { make_scheduler(); }

  void make_scheduler() {
    ClusterSchedulerOptions o;
    o.model_name = "m";
    o.context_tokens = 4096;
    o.self_id = NodeId(99);
    o.heartbeat_interval = 100ms;
    o.node_deadline = node_deadline_;
    o.placement_wait = 1000ms;
    o.request_timeout = 60000ms;
    o.lease_ttl = 3000ms;
    o.transfer_deadline = 1000ms;
    o.prefill_allowance = 5000ms;
    o.max_attempts = max_attempts_;
    o.max_queued_requests = max_queued_;
    o.kv_policy.name = "h2o";
    o.kv_policy.params = {{"keep_rate", 0.3}};
    metrics_ = std::make_unique<ClusterMetrics>(registry_);
    s_ = std::make_unique<ClusterScheduler>(o, testing::small_predictor(), metrics_.get());
  }

  std::shared_ptr<FakeLink> add(NodeRole role, uint64_t id, uint64_t free_bytes,
                                uint64_t queued_tokens = 0) {
    control::Hello h;
    h.role = role;
    h.node_id = NodeId(id);
    h.node_name = std::string(role == NodeRole::kDecode ? "d" : "p") + std::to_string(id);
    h.model_name = "m";
    h.control_address = "127.0.0.1:" + std::to_string(7000 + id);
    h.transport_name = "loopback";
    h.transport_address = {std::byte(id), std::byte{0xAB}};
    auto link = std::make_shared<FakeLink>();
    EXPECT_TRUE(s_->node_opened(h, link, now_).ok());
    links_[id] = link;
    beat(id, free_bytes, queued_tokens);
    return link;
  }
  void beat(uint64_t id, uint64_t free_bytes, uint64_t queued_tokens = 0) {
    control::Heartbeat hb;
    hb.node_id = NodeId(id);
    hb.pool_free_bytes = free_bytes;
    hb.queued_tokens = queued_tokens;
    free_[id] = free_bytes;
    s_->node_message(NodeId(id), links_[id].get(), hb, now_);
  }
  void from(uint64_t id, const control::Message& m) {
    s_->node_message(NodeId(id), links_[id].get(), m, now_);
  }
  GenerationRequest request(uint64_t id, int n_prompt = 20, int max_tokens = 10) {
    GenerationRequest r;
    r.id = RequestId(id);
    r.model = "m";
    for (int i = 0; i < n_prompt; ++i) r.prompt_tokens.push_back(i + 1);
    r.max_tokens = max_tokens;
    r.stop = {"\n\n"};
    r.sampling.temperature = 0.5f;
    r.sampling.seed = 1234;
    return r;
  }
  std::shared_ptr<RecordingSink> submit(uint64_t id, int n_prompt = 20, int max_tokens = 10) {
    auto sink = std::make_shared<RecordingSink>();
    Status st = s_->submit(request(id, n_prompt, max_tokens), sink, now_);
    EXPECT_TRUE(st.ok()) << st.to_string();
    return sink;
  }
  uint64_t predicted(int n_prompt = 20, int max_tokens = 10) {
    return static_cast<uint64_t>(s_->predictor().predict(n_prompt, max_tokens)->capacity_bytes);
  }
  control::ReserveGrant grant(uint64_t request, uint64_t lease) {
    return control::ReserveGrant{RequestId(request), LeaseId(lease), predicted(), 3000ms,
                                 {std::byte{9}, std::byte{8}}};
  }
  void advance(std::chrono::milliseconds d) {
    now_ += d;
    s_->tick(now_);
  }

  std::chrono::milliseconds node_deadline_ = 500ms;
  int64_t max_attempts_ = 2;
  int64_t max_queued_ = 8;
  std::string metrics_text() {
    return prometheus::TextSerializer().Serialize(registry_->Collect());
  }
  std::shared_ptr<prometheus::Registry> registry_ = std::make_shared<prometheus::Registry>();
  std::unique_ptr<ClusterMetrics> metrics_;
  std::unique_ptr<ClusterScheduler> s_;
  ClusterClock::time_point now_ = ClusterClock::now();
  std::map<uint64_t, std::shared_ptr<FakeLink>> links_;
  std::map<uint64_t, uint64_t> free_;
};

TEST_F(SchedulerTest, HappyPathReserveGrantJobCommitTokens) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto p = add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(42);
  ASSERT_EQ(d->count<control::Reserve>(), 1u);
  const auto reserve = d->all<control::Reserve>()[0];
  EXPECT_EQ(reserve.request_id, RequestId(42));
  EXPECT_EQ(reserve.size_bytes, predicted());
  // lease_ttl + prefill_allowance + 2 x the prefill of 20 prompt tokens at
  // the initial 50 tokens/s: the lease outlives the prefill.
  EXPECT_EQ(reserve.lease_ttl, 3000ms + 5000ms + 800ms);
  EXPECT_EQ(sink->started(), 0);
  EXPECT_EQ(p->sent.size(), 0u);
  EXPECT_EQ(s_->queued_requests(), 1u);

  from(1, grant(42, 7));
  ASSERT_EQ(p->count<control::PrefillJob>(), 1u);
  const auto job = p->all<control::PrefillJob>()[0];
  EXPECT_EQ(job.request_id, RequestId(42));
  EXPECT_EQ(job.prompt_token_ids.size(), 20u);
  EXPECT_EQ(job.prompt_token_ids[0], 1);
  EXPECT_EQ(job.generation.max_new_tokens, 10u);
  EXPECT_EQ(job.generation.stop_strings, std::vector<std::string>{"\n\n"});
  EXPECT_FLOAT_EQ(job.generation.sampling.temperature, 0.5f);
  EXPECT_EQ(job.generation.sampling.seed, 1234u);
  EXPECT_EQ(job.kv_policy.name, "h2o");
  EXPECT_EQ(job.decode_node, NodeId(1));
  EXPECT_EQ(job.decode_control_address, "127.0.0.1:7001");
  EXPECT_EQ(job.decode_transport_address, (control::Bytes{std::byte{1}, std::byte{0xAB}}));
  EXPECT_EQ(job.lease_id, LeaseId(7));
  EXPECT_EQ(job.granted_bytes, predicted());
  EXPECT_EQ(job.pool_descriptor, (control::Bytes{std::byte{9}, std::byte{8}}));
  // transfer_deadline + allowance (6 s), capped by the grant's 3 s expiry.
  EXPECT_EQ(job.deadline_in, 3000ms);
  EXPECT_EQ(sink->started(), 1);
  EXPECT_EQ(s_->queued_requests(), 0u);

  advance(100ms);  // the prefill took 0.1 s: 200 prompt tokens/s
  from(1, control::Commit{RequestId(42), LeaseId(7), 4096, 0.5});
  EXPECT_EQ(s_->predictor().bucket_observations(20), 1);
  EXPECT_NEAR(s_->predictor().bucket_keep_rate(20), 0.4, 1e-12);

  from(1, control::TokenChunk{RequestId(42), 0, {5, 6}, "Hel", control::FinishReason::kNone, {}});
  EXPECT_EQ(sink->text(), "Hel");
  from(1, control::TokenChunk{RequestId(42), 2, {7}, "lo", control::FinishReason::kStop, {20, 3}});
  EXPECT_EQ(sink->text(), "Hello");
  EXPECT_EQ(sink->tokens(), 3);
  ASSERT_TRUE(sink->done());
  EXPECT_EQ(sink->done()->finish_reason, "stop");
  EXPECT_EQ(sink->done()->usage.prompt_tokens, 20);
  EXPECT_EQ(sink->done()->usage.completion_tokens, 3);
  EXPECT_EQ(sink->terminal(), 1);
  EXPECT_EQ(s_->active_requests(), 0u);
  // Nothing was cancelled anywhere.
  EXPECT_EQ(d->count<control::Cancel>(), 0u);
  EXPECT_EQ(p->count<control::Cancel>(), 0u);

  // The next lease budgets the measured rate, 200 tokens/s, for its 20
  // tokens behind the 20 the prefill node is still counted for (no
  // heartbeat since the first job): 2 x 40 / 200 s.
  submit(43);
  ASSERT_EQ(d->count<control::Reserve>(), 2u);
  EXPECT_EQ(d->all<control::Reserve>()[1].lease_ttl, 3000ms + 5000ms + 400ms);
}

TEST_F(SchedulerTest, LengthFinishAndUtf8HeldAcrossChunks) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(1);
  from(1, grant(1, 1));
  from(1, control::Commit{RequestId(1), LeaseId(1), 100, 0.3});
  // "é" split across two chunks: nothing invalid reaches the sink.
  from(1, control::TokenChunk{RequestId(1), 0, {1}, "a\xC3", control::FinishReason::kNone, {}});
  EXPECT_EQ(sink->text(), "a");
  from(1, control::TokenChunk{RequestId(1), 1, {2}, "\xA9", control::FinishReason::kLength, {}});
  EXPECT_EQ(sink->text(), "a\xC3\xA9");
  ASSERT_TRUE(sink->done());
  EXPECT_EQ(sink->done()->finish_reason, "length");
  EXPECT_EQ(sink->done()->usage.completion_tokens, 2);  // counted here when the chunk has none
  EXPECT_EQ(sink->done()->usage.prompt_tokens, 20);
}

TEST(Utf8, CompletePrefix) {
  EXPECT_EQ(utf8_complete_prefix(""), 0u);
  EXPECT_EQ(utf8_complete_prefix("abc"), 3u);
  EXPECT_EQ(utf8_complete_prefix("a\xC3"), 1u);
  EXPECT_EQ(utf8_complete_prefix("a\xC3\xA9"), 3u);
  EXPECT_EQ(utf8_complete_prefix("\xE2\x82"), 0u);
  EXPECT_EQ(utf8_complete_prefix("\xE2\x82\xAC"), 3u);
  EXPECT_EQ(utf8_complete_prefix("x\xF0\x9F\x98"), 1u);
  EXPECT_EQ(utf8_complete_prefix("x\xF0\x9F\x98\x80"), 5u);
}

TEST_F(SchedulerTest, DenyMovesToTheNextDecodeNode) {
  auto d1 = add(NodeRole::kDecode, 1, 2 << 20);
  auto d2 = add(NodeRole::kDecode, 3, 1 << 20);
  auto p = add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(5);
  ASSERT_EQ(d1->count<control::Reserve>(), 1u);  // the most free bytes
  EXPECT_EQ(d2->count<control::Reserve>(), 0u);
  from(1, control::ReserveDeny{RequestId(5), StatusCode::kResourceExhausted, "full", 10});
  ASSERT_EQ(d2->count<control::Reserve>(), 1u);
  EXPECT_EQ(d1->count<control::Reserve>(), 1u);
  from(3, grant(5, 11));
  ASSERT_EQ(p->count<control::PrefillJob>(), 1u);
  EXPECT_EQ(p->all<control::PrefillJob>()[0].decode_node, NodeId(3));
  EXPECT_EQ(sink->started(), 1);
}

TEST_F(SchedulerTest, DeniedEverywhereWaitsForHeartbeatsThen503) {
  node_deadline_ = 5000ms;  // the nodes stay live without heartbeats here
  make_scheduler();
  auto d1 = add(NodeRole::kDecode, 1, 1 << 20);
  add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(5);
  from(1, control::ReserveDeny{RequestId(5), StatusCode::kResourceExhausted, "full", 10});
  EXPECT_EQ(d1->count<control::Reserve>(), 1u);  // not asked again without news
  advance(300ms);
  EXPECT_EQ(d1->count<control::Reserve>(), 1u);
  beat(1, 1 << 20);  // a heartbeat: asked again
  EXPECT_EQ(d1->count<control::Reserve>(), 2u);
  from(1, control::ReserveDeny{RequestId(5), StatusCode::kResourceExhausted, "still full", 10});
  advance(600ms);
  EXPECT_EQ(sink->terminal(), 0);  // 900 ms of the 1000 ms placement_wait
  advance(200ms);
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kUnavailable);
  EXPECT_NE(sink->error()->message().find("placement_wait"), std::string::npos);
  EXPECT_NE(sink->error()->message().find("still full"), std::string::npos)
      << sink->error()->message();
  EXPECT_EQ(sink->started(), 0);
  EXPECT_EQ(d1->count<control::Reserve>(), 2u);
}

TEST_F(SchedulerTest, NoRoomAnywhereIs503NamingTheLargestFree) {
  auto d1 = add(NodeRole::kDecode, 1, 100);  // less than any prediction
  add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(5);
  EXPECT_EQ(d1->count<control::Reserve>(), 0u);
  advance(400ms);
  beat(1, 100);
  beat(2, 0);
  advance(400ms);
  beat(1, 100);
  beat(2, 0);
  // Room appears before placement_wait: placed on the heartbeat.
  advance(100ms);
  beat(1, 1 << 20);
  EXPECT_EQ(d1->count<control::Reserve>(), 1u);
  // A second request when there is no room at all fails after the wait.
  beat(1, 100);
  auto sink2 = submit(6);
  for (int i = 0; i < 11; ++i) {
    advance(100ms);
    beat(1, 100);
    beat(2, 0);
  }
  ASSERT_TRUE(sink2->error());
  EXPECT_EQ(sink2->error()->code(), StatusCode::kUnavailable);
  EXPECT_NE(sink2->error()->message().find("no decode node has"), std::string::npos)
      << sink2->error()->message();
}

TEST_F(SchedulerTest, OutstandingReservationsSpreadRequestsBetweenHeartbeats) {
  const uint64_t need = predicted();
  auto d1 = add(NodeRole::kDecode, 1, need * 3 / 2);
  auto d2 = add(NodeRole::kDecode, 3, need * 6 / 5);
  add(NodeRole::kPrefill, 2, 0);
  submit(1);
  submit(2);
  ASSERT_EQ(d1->count<control::Reserve>(), 1u);
  ASSERT_EQ(d2->count<control::Reserve>(), 1u);
  EXPECT_EQ(d1->all<control::Reserve>()[0].request_id, RequestId(1));
  EXPECT_EQ(d2->all<control::Reserve>()[0].request_id, RequestId(2));
  // A third one does not fit anywhere until a heartbeat shows room.
  submit(3);
  EXPECT_EQ(d1->count<control::Reserve>() + d2->count<control::Reserve>(), 2u);
}

TEST_F(SchedulerTest, SilentNodeIsMarkedDownAndItsReserveReplaced) {
  auto d1 = add(NodeRole::kDecode, 1, 2 << 20);
  auto d2 = add(NodeRole::kDecode, 3, 1 << 20);
  add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(8);
  ASSERT_EQ(d1->count<control::Reserve>(), 1u);
  EXPECT_TRUE(s_->health().ready);
  // d1 stops heartbeating; d2 and the prefill node keep going.
  for (int i = 0; i < 5; ++i) {
    advance(100ms);
    beat(3, 1 << 20);
    beat(2, 0);
  }
  // 500 ms without a heartbeat is still within node_deadline.
  EXPECT_TRUE(s_->membership().find(NodeId(1))->live());
  EXPECT_EQ(d2->count<control::Reserve>(), 0u);
  advance(100ms);
  EXPECT_FALSE(s_->membership().find(NodeId(1))->live());
  EXPECT_TRUE(d1->closed);  // its connection is closed so it registers again
  ASSERT_EQ(d2->count<control::Reserve>(), 1u);
  from(3, grant(8, 1));
  EXPECT_EQ(sink->started(), 1);
  EXPECT_EQ(sink->terminal(), 0);
}

TEST_F(SchedulerTest, PrefillNodeDownBeforeTokensReplacesOnAnother) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto p1 = add(NodeRole::kPrefill, 2, 0);
  auto p2 = add(NodeRole::kPrefill, 4, 500);
  auto sink = submit(9);
  from(1, grant(9, 1));
  ASSERT_EQ(p1->count<control::PrefillJob>(), 1u);  // fewer queued tokens
  s_->node_closed(NodeId(2), p1.get(), unavailable("eof"), now_);
  ASSERT_EQ(d->count<control::Cancel>(), 1u);  // the attempt's lease is freed
  ASSERT_EQ(d->count<control::Reserve>(), 2u);
  from(1, grant(9, 2));
  ASSERT_EQ(p2->count<control::PrefillJob>(), 1u);
  EXPECT_EQ(p2->all<control::PrefillJob>()[0].lease_id, LeaseId(2));
  EXPECT_EQ(sink->started(), 1);  // once
  EXPECT_EQ(sink->terminal(), 0);
}

TEST_F(SchedulerTest, DecodeNodeDownAfterTokensFailsClearly) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto p = add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(9);
  from(1, grant(9, 1));
  from(1, control::Commit{RequestId(9), LeaseId(1), 100, 0.3});
  from(1, control::TokenChunk{RequestId(9), 0, {1}, "x", control::FinishReason::kNone, {}});
  s_->node_closed(NodeId(1), d.get(), unavailable("connection reset"), now_);
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kUnavailable);
  EXPECT_NE(sink->error()->message().find("cannot be resumed"), std::string::npos);
  EXPECT_NE(sink->error()->message().find("connection reset"), std::string::npos);
  EXPECT_EQ(sink->text(), "x");
  // The prefill node's part was done (committed): nothing to cancel there.
  EXPECT_EQ(p->count<control::Cancel>(), 0u);
  EXPECT_FALSE(s_->health().ready);
}

TEST_F(SchedulerTest, PrefillErrorReplacesUpToMaxAttemptsThenFails) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto p = add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(3);
  from(1, grant(3, 1));
  from(2, control::Error{RequestId(3), StatusCode::kDataLoss, "bad checksum"});
  EXPECT_EQ(d->count<control::Cancel>(), 1u);
  EXPECT_EQ(p->count<control::Cancel>(), 1u);
  ASSERT_EQ(d->count<control::Reserve>(), 2u);
  EXPECT_EQ(sink->terminal(), 0);
  from(1, grant(3, 2));
  ASSERT_EQ(p->count<control::PrefillJob>(), 2u);
  from(2, control::Error{RequestId(3), StatusCode::kDataLoss, "bad checksum again"});
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kDataLoss);
  EXPECT_NE(sink->error()->message().find("2 placement attempts"), std::string::npos);
  EXPECT_NE(sink->error()->message().find("bad checksum again"), std::string::npos);
  EXPECT_EQ(d->count<control::Cancel>(), 2u);
  EXPECT_EQ(d->count<control::Reserve>(), 2u);  // no third attempt
  EXPECT_EQ(s_->active_requests(), 0u);
}

TEST_F(SchedulerTest, PrefillQueueFullTriesTheNextPrefillNodeOnTheSameLease) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto p1 = add(NodeRole::kPrefill, 2, 0);
  auto p2 = add(NodeRole::kPrefill, 4, 10);
  auto sink = submit(3);
  from(1, grant(3, 1));
  ASSERT_EQ(p1->count<control::PrefillJob>(), 1u);
  from(2, control::Error{RequestId(3), StatusCode::kResourceExhausted, "queue full"});
  ASSERT_EQ(p2->count<control::PrefillJob>(), 1u);
  EXPECT_EQ(p2->all<control::PrefillJob>()[0].lease_id, LeaseId(1));
  EXPECT_EQ(d->count<control::Cancel>(), 0u);
  // Both full: the lease is released and the client gets 429.
  from(4, control::Error{RequestId(3), StatusCode::kResourceExhausted, "queue full"});
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(d->count<control::Cancel>(), 1u);
}

TEST_F(SchedulerTest, ExpiredLeaseIsReplaced) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto p = add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(3);
  from(1, grant(3, 1));
  from(1, control::Release{RequestId(3), LeaseId(1), "expired"});
  EXPECT_EQ(p->count<control::Cancel>(), 1u);
  EXPECT_EQ(d->count<control::Reserve>(), 2u);
  EXPECT_EQ(sink->terminal(), 0);
}

TEST_F(SchedulerTest, CancelSendsCancelToBothNodes) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto p = add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(3);
  from(1, grant(3, 1));
  s_->cancel(RequestId(3), now_);
  ASSERT_EQ(d->count<control::Cancel>(), 1u);
  ASSERT_EQ(p->count<control::Cancel>(), 1u);
  EXPECT_EQ(d->all<control::Cancel>()[0].request_id, RequestId(3));
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kCancelled);
  // Late messages about it are ignored.
  from(1, control::TokenChunk{RequestId(3), 0, {1}, "x", control::FinishReason::kStop, {}});
  EXPECT_EQ(sink->terminal(), 1);
  EXPECT_EQ(sink->text(), "");
  // Unknown ids are ignored.
  s_->cancel(RequestId(12345), now_);
}

TEST_F(SchedulerTest, CancelWhileReservingDropsTheLateGrant) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto p = add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(3);
  s_->cancel(RequestId(3), now_);
  EXPECT_EQ(d->count<control::Cancel>(), 1u);
  EXPECT_EQ(p->count<control::Cancel>(), 0u);
  from(1, grant(3, 1));  // answered before the Cancel arrived; the Cancel frees it
  EXPECT_EQ(p->count<control::PrefillJob>(), 0u);
  EXPECT_EQ(d->count<control::Release>(), 0u);
  // A grant nobody asked for is released at once.
  from(1, grant(77, 5));
  ASSERT_EQ(d->count<control::Release>(), 1u);
  EXPECT_EQ(d->all<control::Release>()[0].lease_id, LeaseId(5));
}

TEST_F(SchedulerTest, OutOfOrderTokensFailClosed) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(3);
  from(1, grant(3, 1));
  from(1, control::Commit{RequestId(3), LeaseId(1), 100, 0.3});
  from(1, control::TokenChunk{RequestId(3), 4, {1}, "x", control::FinishReason::kNone, {}});
  EXPECT_EQ(sink->text(), "");
  EXPECT_EQ(d->count<control::Cancel>(), 1u);   // nothing was shown: re-placed
  EXPECT_EQ(d->count<control::Reserve>(), 2u);
}

TEST_F(SchedulerTest, RequestTimeout) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(3);
  from(1, grant(3, 1));
  now_ += 60001ms;
  beat(1, 1 << 20);
  beat(2, 0);
  s_->tick(now_);
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(d->count<control::Cancel>(), 1u);
}

TEST_F(SchedulerTest, SubmitChecksAndQueueBound) {
  max_queued_ = 1;
  make_scheduler();
  auto sink = std::make_shared<RecordingSink>();
  auto r = request(1);
  r.model = "other";
  EXPECT_EQ(s_->submit(r, sink, now_).code(), StatusCode::kNotFound);
  r = request(1, 4000, 200);
  EXPECT_EQ(s_->submit(r, sink, now_).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(s_->submit(request(1), sink, now_).ok());  // no nodes: waits
  EXPECT_EQ(s_->submit(request(1), std::make_shared<RecordingSink>(), now_).code(),
            StatusCode::kInvalidArgument);  // the same id twice
  EXPECT_EQ(s_->submit(request(2), std::make_shared<RecordingSink>(), now_).code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(sink->terminal(), 0);  // submit never calls the sink
  s_->shutdown();
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kCancelled);
  EXPECT_EQ(s_->submit(request(3), sink, now_).code(), StatusCode::kUnavailable);
}

TEST_F(SchedulerTest, HelloChecksAndHealth) {
  EXPECT_FALSE(s_->health().ready);
  EXPECT_NE(s_->health().reason.find("no live prefill node"), std::string::npos);
  control::Hello h;
  h.role = NodeRole::kDecode;
  h.node_id = NodeId(1);
  h.model_name = "m";
  auto ack = s_->check_hello(h);
  ASSERT_TRUE(ack.ok());
  EXPECT_EQ(ack->node_id, NodeId(99));
  EXPECT_EQ(ack->heartbeat_interval, 100ms);
  h.model_name = "other";
  EXPECT_EQ(s_->check_hello(h).status().code(), StatusCode::kInvalidArgument);
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  h.model_name = "m";
  EXPECT_EQ(s_->check_hello(h).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(s_->health().ready);
  EXPECT_NE(s_->health().reason.find("prefill"), std::string::npos);
  auto p = add(NodeRole::kPrefill, 2, 0);
  EXPECT_TRUE(s_->health().ready);
  s_->node_closed(NodeId(2), p.get(), unavailable("eof"), now_);
  EXPECT_FALSE(s_->health().ready);
  // Messages on a link that is not the node's registration are ignored.
  auto stranger = std::make_shared<FakeLink>();
  control::Heartbeat hb;
  hb.pool_free_bytes = 5;
  s_->node_message(NodeId(1), stranger.get(), hb, now_);
  EXPECT_EQ(s_->membership().find(NodeId(1))->last.pool_free_bytes, uint64_t{1} << 20);
}

TEST_F(SchedulerTest, WaitsForAPrefillNodeBeforeReserving) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  auto sink = submit(3);
  EXPECT_EQ(d->count<control::Reserve>(), 0u);  // no bytes held for a job nobody can run
  advance(200ms);
  beat(1, 1 << 20);
  auto p = add(NodeRole::kPrefill, 2, 0);
  EXPECT_EQ(d->count<control::Reserve>(), 1u);
}

TEST_F(SchedulerTest, MetricsCountNodesPlacementsFootprintAndFailures) {
  auto d = add(NodeRole::kDecode, 1, 1 << 20);
  add(NodeRole::kPrefill, 2, 0);
  auto sink = submit(3);
  from(1, grant(3, 1));
  from(1, control::Commit{RequestId(3), LeaseId(1), 4096, 0.5});
  from(2, control::Error{RequestId(3), StatusCode::kInternal, "late"});  // after Commit: ignored
  from(1, control::Error{RequestId(3), StatusCode::kDataLoss, "crc"});  // re-placed
  from(1, grant(3, 2));
  from(1, control::Release{RequestId(3), LeaseId(2), "expired"});  // 2nd attempt: fails
  ASSERT_TRUE(sink->error());
  const std::string text = metrics_text();
  auto has = [&](const std::string& line) {
    EXPECT_NE(text.find(line), std::string::npos) << line << "\n" << text;
  };
  has("kvgate_coordinator_nodes{role=\"decode\",state=\"live\"} 1");
  has("kvgate_coordinator_nodes{role=\"prefill\",state=\"live\"} 1");
  has("kvgate_coordinator_placements_total 2");
  has("kvgate_coordinator_replacements_total{cause=\"decode_error\"} 1");
  has("kvgate_coordinator_request_failures_total{cause=\"lease_expired\"} 1");
  has("kvgate_coordinator_committed_footprint_bytes_sum 4096");
  has("kvgate_coordinator_predicted_footprint_bytes_count 2");
  has("kvgate_coordinator_keep_rate_ratio_sum 0.5");
  has("kvgate_coordinator_kv_shipped_bytes_total 4096");
  has("kvgate_coordinator_kv_dense_bytes_total " +
      std::to_string(s_->predictor().predict(20, 10)->dense_prompt_bytes));
  has("kvgate_coordinator_active_requests 0");
  has("kvgate_coordinator_footprint_prediction_ratio_count 1");
}

}  // namespace
}  // namespace kvgate::coordinator
