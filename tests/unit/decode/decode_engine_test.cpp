// The decode engine with the real model and the loopback transport, driven
// by a fake coordinator and a fake prefill node: the engine's message
// handlers are reached through DecodeEngine::post() with FakeConnections
// (what the node's control plane does with real TCP connections), and the
// KV is built in-process as the prefill node builds it and shipped through
// a sender loopback Transport into the engine's pool.
#include <gtest/gtest.h>

#include <prometheus/registry.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <thread>

#include "decode/decode_engine.h"
#include "engine/gate_file.h"
#include "tests/unit/engine/gate_test_util.h"
#include "engine/generate.h"
#include "engine/kv_policy_spec.h"
#include "tests/unit/decode/decode_test_util.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::decode::testing {
namespace {

using control::FinishReason;

constexpr int64_t kPageTokens = 16;

engine::KvPolicyConfig dense_policy() {
  engine::KvPolicyConfig p;
  p.policy = engine::KvPolicy::kDense;
  return p;
}

// Most prompt tokens distant: eviction by rank, tokens past the prompt kept.
engine::KvPolicyConfig h2o_policy() {
  engine::KvPolicyConfig p;
  p.policy = engine::KvPolicy::kH2o;
  p.n_sink_tokens = 2;
  p.n_window_tokens = 8;
  p.keep_rate = 0.5;
  return p;
}

FinishReason finish_of(const std::string& reason) {
  return reason == "stop" ? FinishReason::kStop : FinishReason::kLength;
}

// Waits for a condition on the engine's published state (it publishes after
// every loop iteration), with a deadline.
bool wait_until(const std::function<bool()>& done, std::chrono::milliseconds limit = 60000ms) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(1ms);  // polling a condition, not timing
  }
  return true;
}

class DecodeEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    L_ = engine::testing::test_model();
    if (!L_->model) GTEST_SKIP() << "model not found at " KVGATE_TEST_MODEL;
    forward_ = std::make_unique<engine::CpuForward>(*L_->model, engine::ForwardOptions{});
    start_engine();
  }
  void TearDown() override {
    sender_.reset();
    engine_.reset();
  }

  void start_engine(int64_t pool_bytes = int64_t{32} << 20, transport::TestHooks hooks = {},
                    int64_t max_batch = 8,
                    std::shared_ptr<const engine::GateModel> gate = nullptr) {
    sender_.reset();
    engine_.reset();
    DecodeEngineOptions o;
    o.decode.pool_bytes = pool_bytes;
    o.decode.page_tokens = kPageTokens;
    o.decode.max_batch_requests = max_batch;
    o.decode.lease_ttl = 30000ms;
    o.transport.kind = TransportKind::kLoopback;
    o.cluster_token = "token";
    o.transport_hooks = std::move(hooks);
    o.node_name = "decode-test";
    if (device_mode_) {
      // A stand-in device: a second host pool (same page size, as many
      // pages) and the CPU's BatchDecoder over it — the engine's device
      // path (move at admission, pages charged to the lease, the device
      // stepper) with arithmetic the test can compare exactly.
      const int64_t pb = kPageTokens * L_->model->config().head_dim * 2;
      device_pool_ = std::move(kvstore::PagePool::create(pb, pool_bytes)).value();
      // Its own forward: the engine thread steps it while the test thread
      // uses forward_ for references.
      device_forward_ = std::make_unique<engine::CpuForward>(*L_->model, engine::ForwardOptions{});
      device_batch_ = std::make_unique<engine::BatchDecoder>(*device_forward_);
      auto dev = std::make_shared<DecodeDevice>();
      dev->pool = device_pool_.get();
      dev->step = [b = device_batch_.get()](std::span<const engine::DecodeItem> items,
                                            std::span<float> logits, std::span<Status> st) {
        return b->step(items, logits, st);
      };
      dev->after_move = [this] {
        ++moves_;
        return Status();
      };
      dev->name = "test";
      o.device = dev;
    }
    registry_ = std::make_shared<prometheus::Registry>();
    metrics_ = std::make_unique<DecodeMetrics>(registry_);
    auto e = DecodeEngine::start(*L_->model, *L_->tokenizer, std::move(gate), std::move(o),
                                 metrics_.get());
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    engine_ = std::move(*e);
    transport::TransportOptions so;
    so.cluster_token = "token";
    TransportConfig loopback;
    loopback.kind = TransportKind::kLoopback;
    auto s = transport::create_transport(loopback, so);
    ASSERT_TRUE(s.ok()) << s.status().to_string();
    sender_ = std::move(*s);
    auto peer = sender_->connect(engine_->transport_address());
    ASSERT_TRUE(peer.ok()) << peer.status().to_string();
    peer_ = *peer;
  }

  int64_t page_bytes() const { return engine_->page_bytes(); }
  std::vector<int32_t> tokens(const std::string& text) const {
    return L_->tokenizer->encode(text, false, false);
  }
  std::unique_ptr<Prefilled> prefill_of(const engine::KvPolicyConfig& policy,
                                        const std::vector<int32_t>& prompt) {
    return prefill(*forward_, policy, prompt, page_bytes());
  }
  // What one process produces for the prompt: engine::generate, greedy.
  engine::GenerateResult reference(const engine::KvPolicyConfig& policy,
                                   const std::vector<int32_t>& prompt, int32_t max_new) {
    engine::GenerateOptions go;
    go.max_tokens = max_new;
    go.kv_policy = policy;
    auto r = engine::generate(*forward_, *L_->tokenizer, prompt, go);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return r.ok() ? *r : engine::GenerateResult{};
  }
  // The coordinator's reservation for prompt + max_new (whole pages).
  uint64_t reservation_for(const Prefilled& p, int64_t max_new) const {
    auto b = engine::compressed_pool_bytes(p.plan->layout, p.prompt_tokens + max_new, page_bytes());
    EXPECT_TRUE(b.ok());
    return static_cast<uint64_t>(*b);
  }

  // Reserve -> ReserveGrant (or nullopt with the deny in *deny).
  std::optional<control::ReserveGrant> reserve(RequestId id, uint64_t bytes,
                                               std::chrono::milliseconds ttl = 30000ms,
                                               control::ReserveDeny* deny = nullptr) {
    engine_->post(coordinator_, control::Reserve{id, bytes, ttl});
    std::optional<control::ReserveGrant> grant;
    EXPECT_TRUE(coordinator_->wait([&](const Messages& ms) {
      for (const auto& m : ms) {
        if (const auto* g = std::get_if<control::ReserveGrant>(&m); g && g->request_id == id) {
          grant = *g;
          return true;
        }
        if (const auto* d = std::get_if<control::ReserveDeny>(&m); d && d->request_id == id) {
          if (deny != nullptr) *deny = *d;
          return true;
        }
      }
      return false;
    }));
    return grant;
  }

  // Reserve, ship, manifest: the request is then decoding.
  void start_request(RequestId id, Prefilled& p, uint32_t max_new, uint64_t reserve_bytes = 0) {
    auto grant = reserve(id, reserve_bytes != 0 ? reserve_bytes : reservation_for(p, max_new));
    ASSERT_TRUE(grant.has_value());
    const Status shipped = ship(*sender_, peer_, grant->pool_descriptor, p);
    ASSERT_TRUE(shipped.ok()) << shipped.to_string();
    engine_->post(prefill_conn_, manifest_for(p, id, grant->lease_id, max_new));
  }

  bool pool_all_free() const {
    const DecodeStats s = engine_->stats();
    return s.leases.free_bytes == s.leases.capacity_bytes && s.leases.taken_pages == 0 &&
           s.active_sequences == 0;
  }

  // Three leases take the whole pool: request id0 (dense) with room to
  // grow, id0 + 1 with exactly its image, id0 + 2 every byte left (never
  // shipped). id0 + 1 fails "KV pool full" when it must grow; id0 finishes
  // as generate() does. The engine must be started (8 MiB pool).
  void pool_full_mid_decode(uint64_t id0);

  const engine::testing::TestModel* L_ = nullptr;
  std::unique_ptr<engine::CpuForward> forward_;
  // Device mode (start_engine reads it): declared before engine_, so the
  // engine (and every cache on the device pool) is destroyed first.
  bool device_mode_ = false;
  std::unique_ptr<kvstore::PagePool> device_pool_;
  std::unique_ptr<engine::CpuForward> device_forward_;
  std::unique_ptr<engine::BatchDecoder> device_batch_;
  std::atomic<int> moves_{0};
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<DecodeMetrics> metrics_;
  std::unique_ptr<DecodeEngine> engine_;
  std::unique_ptr<transport::Transport> sender_;
  transport::PeerId peer_;
  std::shared_ptr<FakeConnection> coordinator_ = std::make_shared<FakeConnection>();
  std::shared_ptr<FakeConnection> prefill_conn_ = std::make_shared<FakeConnection>();
};

const char* const kPrompt1 =
    "The quick brown fox jumps over the lazy dog. In the beginning there was a small village by "
    "the sea, where";
const char* const kPrompt2 = "Question: what is the capital of France? Answer: The capital of France is";
const char* const kPrompt3 = "Once upon a time, in a land far away, there lived a";

// Dense (single-layer layout, every flag 1) and h2o (eviction; decode flags
// from the prompt length): the streamed tokens and text equal engine::
// generate() of the same prompt and policy, greedy.
TEST_F(DecodeEngineTest, StreamsWhatGenerateProducesForDenseAndH2o) {
  const auto prompt = tokens(kPrompt1);
  constexpr int32_t kMaxNew = 12;
  uint64_t next_id = 1;
  for (const auto& policy : {dense_policy(), h2o_policy()}) {
    SCOPED_TRACE(engine::kv_policy_name(policy.policy));
    const RequestId id(next_id++);
    auto p = prefill_of(policy, prompt);
    ASSERT_NE(p, nullptr);
    const auto ref = reference(policy, prompt, kMaxNew);
    ASSERT_FALSE(ref.tokens.empty());
    ASSERT_EQ(ref.tokens[0], p->first_token) << "the prefill's first token is generate()'s";
    start_request(id, *p, kMaxNew);
    ASSERT_TRUE(coordinator_->wait_finished(id));

    const auto result = prefill_conn_->wait_for<control::TransferResult>(id);
    ASSERT_TRUE(result.has_value());
    EXPECT_EQ(result->code, StatusCode::kOk) << result->message;
    const auto commit = coordinator_->wait_for<control::Commit>(id);
    ASSERT_TRUE(commit.has_value());
    EXPECT_EQ(commit->committed_bytes, static_cast<uint64_t>(p->cache->bytes()));

    const Streamed s = streamed(*coordinator_, id);
    EXPECT_EQ(s.tokens, ref.tokens);
    EXPECT_EQ(s.text, ref.text);
    EXPECT_EQ(s.finish, finish_of(ref.finish_reason));
    EXPECT_TRUE(s.indexes_consistent);
    EXPECT_EQ(s.usage.prompt_tokens, prompt.size());
    EXPECT_EQ(s.usage.completion_tokens, ref.tokens.size());
    // One chunk per token: the first from the prefill, then one per step.
    EXPECT_EQ(s.chunks, ref.tokens.size() + (ref.finish_reason == "stop" ? 1 : 0));
    const auto first = coordinator_->all<control::TokenChunk>(id).front();
    EXPECT_EQ(first.first_token_index, 0u);
    ASSERT_FALSE(first.token_ids.empty());
    EXPECT_EQ(first.token_ids[0], p->first_token);
    EXPECT_TRUE(wait_until([&] { return pool_all_free(); })) << "the lease is released at the end";
  }
}

// Three requests of two policies decode in one batch (two forward groups)
// and each gets exactly the tokens it gets alone.
TEST_F(DecodeEngineTest, BatchedRequestsEqualEachAlone) {
  constexpr int32_t kMaxNew = 16;
  struct Case {
    engine::KvPolicyConfig policy;
    std::vector<int32_t> prompt;
  };
  const std::vector<Case> cases = {{dense_policy(), tokens(kPrompt1)},
                                   {h2o_policy(), tokens(kPrompt2)},
                                   {h2o_policy(), tokens(kPrompt3)}};
  std::vector<std::unique_ptr<Prefilled>> ps;
  std::vector<engine::GenerateResult> refs;
  std::vector<control::ReserveGrant> grants;
  uint64_t serial_steps = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    ps.push_back(prefill_of(cases[i].policy, cases[i].prompt));
    ASSERT_NE(ps.back(), nullptr);
    refs.push_back(reference(cases[i].policy, cases[i].prompt, kMaxNew));
    serial_steps += refs.back().tokens.size() - 1;
    auto g = reserve(RequestId(10 + i), reservation_for(*ps.back(), kMaxNew));
    ASSERT_TRUE(g.has_value());
    grants.push_back(*g);
    const Status shipped = ship(*sender_, peer_, g->pool_descriptor, *ps.back());
    ASSERT_TRUE(shipped.ok()) << shipped.to_string();
  }
  const uint64_t steps_before = engine_->stats().steps;
  // All KV has landed: the manifests admit the three together.
  for (size_t i = 0; i < cases.size(); ++i) {
    engine_->post(prefill_conn_, manifest_for(*ps[i], RequestId(10 + i), grants[i].lease_id, kMaxNew));
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    ASSERT_TRUE(coordinator_->wait_finished(RequestId(10 + i)));
    const Streamed s = streamed(*coordinator_, RequestId(10 + i));
    EXPECT_EQ(s.tokens, refs[i].tokens) << "request " << i;
    EXPECT_EQ(s.text, refs[i].text) << "request " << i;
  }
  // Stepped together: fewer steps than one after the other.
  const uint64_t steps = engine_->stats().steps - steps_before;
  EXPECT_LT(steps, serial_steps);
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
}

// gate+pod (deferred flags from a GateDecoder bound to the group's caches)
// batched with dense: each equals generate() alone. Needs the calibrated
// gate side file next to the model (made by scripts/setup.sh).
TEST_F(DecodeEngineTest, GatePolicyBatchedWithDenseEqualsGenerate) {
  auto gate = engine::calibrated_or_random_gate(*L_->model, KVGATE_TEST_MODEL);
  ASSERT_NE(gate, nullptr);
  start_engine(int64_t{32} << 20, {}, 8, gate);
  engine::KvPolicyConfig gp;
  gp.policy = engine::KvPolicy::kGatePod;
  gp.gate = gate;
  gp.n_sink_tokens = 2;
  gp.n_window_tokens = 8;  // tokens leave the window during the prompt and the decode
  constexpr int32_t kMaxNew = 14;
  const std::vector<std::pair<engine::KvPolicyConfig, std::vector<int32_t>>> cases = {
      {gp, tokens(kPrompt1)}, {gp, tokens(kPrompt3)}, {dense_policy(), tokens(kPrompt2)}};
  std::vector<std::unique_ptr<Prefilled>> ps;
  std::vector<control::ReserveGrant> grants;
  std::vector<engine::GenerateResult> refs;
  for (size_t i = 0; i < cases.size(); ++i) {
    ps.push_back(prefill_of(cases[i].first, cases[i].second));
    ASSERT_NE(ps.back(), nullptr);
    refs.push_back(reference(cases[i].first, cases[i].second, kMaxNew));
    auto gr = reserve(RequestId(80 + i), reservation_for(*ps.back(), kMaxNew));
    ASSERT_TRUE(gr.has_value());
    grants.push_back(*gr);
    ASSERT_TRUE(ship(*sender_, peer_, gr->pool_descriptor, *ps.back()).ok());
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    engine_->post(prefill_conn_, manifest_for(*ps[i], RequestId(80 + i), grants[i].lease_id, kMaxNew));
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    ASSERT_TRUE(coordinator_->wait_finished(RequestId(80 + i)));
    EXPECT_EQ(streamed(*coordinator_, RequestId(80 + i)).tokens, refs[i].tokens) << "request " << i;
  }
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
}

// A segment corrupted in flight: the receive fails its CRC, nothing is
// admitted, the coordinator gets Error{kDataLoss}, the lease's bytes are
// free again, and a late manifest is answered, not crashed on.
TEST_F(DecodeEngineTest, CorruptedTransferIsDataLossAndFreesTheLease) {
  transport::TestHooks hooks;
  hooks.before_verify = [](transport::TransferId, uint32_t segment, std::span<std::byte> landed) {
    if (segment == 0 && !landed.empty()) landed[0] ^= std::byte{0x5a};
  };
  start_engine(int64_t{32} << 20, hooks);
  auto p = prefill_of(dense_policy(), tokens(kPrompt2));
  ASSERT_NE(p, nullptr);
  const RequestId id(7);
  auto grant = reserve(id, reservation_for(*p, 8));
  ASSERT_TRUE(grant.has_value());
  EXPECT_TRUE(wait_until([&] {
    const auto s = engine_->stats().leases;
    return s.free_bytes == s.capacity_bytes - static_cast<int64_t>(grant->granted_bytes);
  }));
  const Status shipped = ship(*sender_, peer_, grant->pool_descriptor, *p);
  EXPECT_EQ(shipped.code(), StatusCode::kDataLoss) << shipped.to_string();
  const auto error = coordinator_->wait_for<control::Error>(id);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, StatusCode::kDataLoss) << error->message;
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
  EXPECT_TRUE(coordinator_->all<control::TokenChunk>(id).empty()) << "no tokens from bad KV";

  engine_->post(prefill_conn_, manifest_for(*p, id, grant->lease_id, 8));
  const auto result = prefill_conn_->wait_for<control::TransferResult>(id);
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(result->code, StatusCode::kNotFound) << result->message;
}

// No KV within the lease's ttl: Release{reason "expired"} and the bytes free.
TEST_F(DecodeEngineTest, LeaseExpiryReleases) {
  const RequestId id(21);
  auto grant = reserve(id, 1 << 20, 50ms);
  ASSERT_TRUE(grant.has_value());
  EXPECT_EQ(grant->expires_in, 50ms);
  const auto release = coordinator_->wait_for<control::Release>(id, 30000ms);
  ASSERT_TRUE(release.has_value());
  EXPECT_EQ(release->reason, "expired");
  EXPECT_EQ(release->lease_id, grant->lease_id);
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
}

// Cancel while decoding: a final TokenChunk{kCancelled}, nothing after it,
// and every page of the request free.
TEST_F(DecodeEngineTest, CancelMidDecodeFreesPages) {
  auto p = prefill_of(h2o_policy(), tokens(kPrompt3));
  ASSERT_NE(p, nullptr);
  const RequestId id(31);
  constexpr uint32_t kMaxNew = 400;
  start_request(id, *p, kMaxNew);
  ASSERT_TRUE(coordinator_->wait([&](const Messages& ms) { return count_of<control::TokenChunk>(ms, id) >= 3; }));
  engine_->post(coordinator_, control::Cancel{id, "client went away"});
  ASSERT_TRUE(coordinator_->wait_finished(id));
  const auto chunks = coordinator_->all<control::TokenChunk>(id);
  EXPECT_EQ(chunks.back().finish_reason, FinishReason::kCancelled);
  EXPECT_LT(streamed(*coordinator_, id).tokens.size(), kMaxNew);
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
  // Nothing more arrives for it (the engine keeps looping).
  const uint64_t it = engine_->stats().iterations;
  ASSERT_TRUE(wait_until([&] { return engine_->stats().iterations > it + 3; }));
  EXPECT_EQ(coordinator_->all<control::TokenChunk>(id).size(), chunks.size());
}

// Reserve beyond the pool: ReserveDeny{kResourceExhausted} with what the
// node could grant; exactly that is granted; one byte more is not.
TEST_F(DecodeEngineTest, ReserveBeyondThePoolIsDeniedWithAvailableBytes) {
  start_engine(int64_t{4} << 20);
  const int64_t capacity = engine_->stats().leases.capacity_bytes;
  control::ReserveDeny deny;
  EXPECT_FALSE(reserve(RequestId(41), static_cast<uint64_t>(capacity) + 1, 30000ms, &deny));
  EXPECT_EQ(deny.code, StatusCode::kResourceExhausted);
  EXPECT_EQ(deny.available_bytes, static_cast<uint64_t>(capacity));
  auto all = reserve(RequestId(42), static_cast<uint64_t>(capacity));
  ASSERT_TRUE(all.has_value());
  EXPECT_EQ(all->granted_bytes, static_cast<uint64_t>(capacity));
  control::ReserveDeny none;
  EXPECT_FALSE(reserve(RequestId(43), 1, 30000ms, &none));
  EXPECT_EQ(none.code, StatusCode::kResourceExhausted);
  EXPECT_EQ(none.available_bytes, 0u);
}

// A manifest whose descriptor is damaged, or names an unknown policy: a
// clear error to both peers, the lease freed, and the node keeps serving.
TEST_F(DecodeEngineTest, MalformedManifestIsAClearErrorAndTheNodeKeepsServing) {
  const auto prompt = tokens(kPrompt2);
  auto p = prefill_of(dense_policy(), prompt);
  ASSERT_NE(p, nullptr);
  {
    const RequestId id(51);
    auto grant = reserve(id, reservation_for(*p, 4));
    ASSERT_TRUE(grant.has_value());
    ASSERT_TRUE(ship(*sender_, peer_, grant->pool_descriptor, *p).ok());
    auto m = manifest_for(*p, id, grant->lease_id, 4);
    ASSERT_GT(m.layout_descriptor.size(), 16u);
    m.layout_descriptor[m.layout_descriptor.size() / 2] ^= std::byte{0xff};
    engine_->post(prefill_conn_, m);
    const auto result = prefill_conn_->wait_for<control::TransferResult>(id);
    ASSERT_TRUE(result.has_value());
    EXPECT_EQ(result->code, StatusCode::kDataLoss) << result->message;
    EXPECT_NE(result->message.find("wire image"), std::string::npos) << result->message;
    const auto error = coordinator_->wait_for<control::Error>(id);
    ASSERT_TRUE(error.has_value());
    EXPECT_EQ(error->code, StatusCode::kDataLoss);
    EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
  }
  {
    const RequestId id(52);
    auto grant = reserve(id, reservation_for(*p, 4));
    ASSERT_TRUE(grant.has_value());
    ASSERT_TRUE(ship(*sender_, peer_, grant->pool_descriptor, *p).ok());
    auto m = manifest_for(*p, id, grant->lease_id, 4);
    m.kv_policy.name = "bogus";
    engine_->post(prefill_conn_, m);
    const auto result = prefill_conn_->wait_for<control::TransferResult>(id);
    ASSERT_TRUE(result.has_value());
    EXPECT_EQ(result->code, StatusCode::kInvalidArgument) << result->message;
    EXPECT_NE(result->message.find("kv_policy"), std::string::npos) << result->message;
    EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
  }
  // A message the decode node does not take: answered with an Error.
  auto stray = std::make_shared<FakeConnection>();
  engine_->post(stray, control::PrefillJob{});
  ASSERT_TRUE(stray->wait([](const Messages& ms) { return !ms.empty(); }));
  const Messages got = stray->messages();
  const auto* err = std::get_if<control::Error>(&got[0]);
  ASSERT_NE(err, nullptr);
  EXPECT_EQ(err->code, StatusCode::kInvalidArgument);
  // Still serving: a good request decodes as generate() does.
  const RequestId id(53);
  const auto ref = reference(dense_policy(), prompt, 4);
  start_request(id, *p, 4);
  ASSERT_TRUE(coordinator_->wait_finished(id));
  EXPECT_EQ(streamed(*coordinator_, id).tokens, ref.tokens);
}

// The prefill needs more than was granted, before it sent anything: Extend
// grows the lease and the receive (same transfer id, the lease's); the KV
// then lands and decodes.
TEST_F(DecodeEngineTest, ExtendBeforeTheSendGrowsTheLeaseAndTheReceive) {
  const auto prompt = tokens(kPrompt1);
  auto p = prefill_of(h2o_policy(), prompt);
  ASSERT_NE(p, nullptr);
  const RequestId id(61);
  auto grant = reserve(id, 1);
  ASSERT_TRUE(grant.has_value());
  EXPECT_EQ(grant->granted_bytes, static_cast<uint64_t>(page_bytes()));
  const uint64_t need = reservation_for(*p, 6);
  engine_->post(prefill_conn_, control::Extend{id, grant->lease_id, need});
  const auto ext = prefill_conn_->wait_for<control::ExtendResult>(id);
  ASSERT_TRUE(ext.has_value());
  ASSERT_EQ(ext->code, StatusCode::kOk) << ext->message;
  EXPECT_GE(ext->granted_bytes, need);
  auto g = transport::wire::decode_grant(ext->pool_descriptor);
  ASSERT_TRUE(g.ok()) << g.status().to_string();
  EXPECT_EQ(g->transfer_id, grant->lease_id.value()) << "the prefill node sends as the lease id";
  EXPECT_EQ(g->total_bytes(), ext->granted_bytes);
  const Status shipped = ship(*sender_, peer_, ext->pool_descriptor, *p);
  ASSERT_TRUE(shipped.ok()) << shipped.to_string();
  engine_->post(prefill_conn_, manifest_for(*p, id, grant->lease_id, 6));
  ASSERT_TRUE(coordinator_->wait_finished(id));
  EXPECT_EQ(streamed(*coordinator_, id).tokens, reference(h2o_policy(), prompt, 6).tokens);
  // An Extend for a lease that is gone is refused, not crashed on.
  engine_->post(prefill_conn_, control::Extend{id, grant->lease_id, 4096});
  ASSERT_TRUE(prefill_conn_->wait(
      [&](const Messages& ms) { return count_of<control::ExtendResult>(ms, id) == 2; }));
  EXPECT_EQ(prefill_conn_->all<control::ExtendResult>(id).back().code, StatusCode::kNotFound);
}

// The image's pages in wire order in one buffer, as the prefill node stages
// them (logical offset i * page_bytes is page i of the image).
std::vector<std::byte> stage(const Prefilled& p) {
  const auto pb = static_cast<size_t>(p.image.page_bytes);
  std::vector<std::byte> out(p.image.pages.size() * pb);
  for (size_t i = 0; i < p.image.pages.size(); ++i)
    std::memcpy(out.data() + i * pb, p.pool->data(p.image.pages[i]), pb);
  return out;
}

// Progresses `sender` until its event for `id`; returns its status.
Status wait_send(transport::Transport& sender, transport::TransferId id) {
  std::vector<transport::TransferEvent> events;
  const auto end = transport::Clock::now() + 60s;
  while (transport::Clock::now() < end) {
    sender.progress(events);
    for (const auto& e : events) {
      if (e.side == transport::TransferSide::kSend && e.id == id) return e.status;
    }
    std::this_thread::yield();  // the engine thread does the copy
  }
  return Status(StatusCode::kDeadlineExceeded, "test: no send event");
}

// Counts the segments of one transfer the engine's transport checksummed,
// i.e. that landed in its pages (before_verify runs as each one landed).
// Shared with the hook, which may outlive the test body.
struct LandedCounter {
  struct Counts {
    std::atomic<uint64_t> transfer{0};
    std::atomic<int> segments{0};
  };
  std::shared_ptr<Counts> counts = std::make_shared<Counts>();
  transport::TestHooks hooks() const {
    transport::TestHooks h;
    h.before_verify = [c = counts](transport::TransferId id, uint32_t, std::span<std::byte>) {
      if (id.value() == c->transfer.load()) ++c->segments;
    };
    return h;
  }
  void watch(transport::TransferId id) const { counts->transfer = id.value(); }
  int segments() const { return counts->segments.load(); }
};

// Overlap: the prefill node ships its first layer blocks into a grant too
// small for the image, learns the size at the end, and sends Extend. The
// lease and the live receive grow in place (another lease was granted in
// between, so the new pages lie elsewhere in the pool); the remaining
// blocks land in the new pages, and the request decodes exactly as the same
// request shipped into a large enough grant (and as generate()).
TEST_F(DecodeEngineTest, ExtendAfterSegmentsLandedGrowsTheReceiveInPlace) {
  LandedCounter landed;
  start_engine(int64_t{32} << 20, landed.hooks());
  const auto prompt = tokens(kPrompt1);
  constexpr uint32_t kMaxNew = 8;
  auto p = prefill_of(h2o_policy(), prompt);
  ASSERT_NE(p, nullptr);
  const auto ref = reference(h2o_policy(), prompt, kMaxNew);

  // Without an extension first.
  start_request(RequestId(90), *p, kMaxNew);
  ASSERT_TRUE(coordinator_->wait_finished(RequestId(90)));
  const Streamed plain = streamed(*coordinator_, RequestId(90));
  EXPECT_EQ(plain.tokens, ref.tokens);
  ASSERT_TRUE(wait_until([&] { return pool_all_free(); }));

  // The image split in two: the first half of its layer blocks (or of its
  // pages, for a one-block image) ships before the Extend.
  const int64_t pb = page_bytes();
  const auto n_pages = static_cast<int64_t>(p->image.pages.size());
  std::vector<std::pair<uint64_t, uint64_t>> parts;  // (offset, length) in bytes
  int64_t before_pages = 0;
  size_t before_parts = 0;
  const auto& segs = p->image.segments;
  if (segs.size() >= 2) {
    for (size_t i = 0; i < segs.size(); ++i) {
      parts.emplace_back(segs[i].first_page * pb, segs[i].n_pages * pb);
      if (i < segs.size() / 2) before_pages += segs[i].n_pages, ++before_parts;
    }
  } else {
    before_pages = n_pages / 2;
    before_parts = 1;
    parts = {{0, before_pages * pb}, {before_pages * pb, (n_pages - before_pages) * pb}};
  }
  SCOPED_TRACE("image of " + std::to_string(n_pages) + " pages in " + std::to_string(segs.size()) +
               " blocks; " + std::to_string(before_pages) + " pages before the Extend");
  ASSERT_GE(before_pages, 1);
  ASSERT_LT(before_pages, n_pages);

  const RequestId id(91);
  auto grant = reserve(id, static_cast<uint64_t>(before_pages * pb));
  ASSERT_TRUE(grant.has_value());
  ASSERT_EQ(grant->granted_bytes, static_cast<uint64_t>(before_pages * pb));
  auto blocker = reserve(RequestId(92), static_cast<uint64_t>(3 * pb));
  ASSERT_TRUE(blocker.has_value());
  const transport::TransferId tid(grant->lease_id.value());
  landed.watch(tid);
  const std::vector<std::byte> staging = stage(*p);
  ASSERT_TRUE(sender_->begin_send(peer_, tid, grant->pool_descriptor, transport::Clock::now() + 60s).ok());
  for (size_t i = 0; i < before_parts; ++i) {
    ASSERT_TRUE(sender_->send_segment(peer_, tid, static_cast<uint32_t>(i), staging.data() + parts[i].first,
                                      parts[i].second, parts[i].first)
                    .ok());
  }
  std::vector<transport::TransferEvent> none;
  ASSERT_TRUE(wait_until([&] {
    sender_->progress(none);  // the handshake, then the segments
    return landed.segments() == static_cast<int>(before_parts);
  }));

  const uint64_t need = reservation_for(*p, kMaxNew);
  engine_->post(prefill_conn_, control::Extend{id, grant->lease_id, need - grant->granted_bytes});
  const auto ext = prefill_conn_->wait_for<control::ExtendResult>(id);
  ASSERT_TRUE(ext.has_value());
  ASSERT_EQ(ext->code, StatusCode::kOk) << ext->message;
  EXPECT_GE(ext->granted_bytes, need);
  auto old_g = transport::wire::decode_grant(grant->pool_descriptor);
  auto new_g = transport::wire::decode_grant(ext->pool_descriptor);
  ASSERT_TRUE(old_g.ok() && new_g.ok());
  EXPECT_EQ(new_g->transfer_id, tid.value());
  EXPECT_EQ(new_g->total_bytes(), ext->granted_bytes);
  ASSERT_GT(new_g->ranges.size(), old_g->ranges.size());
  EXPECT_TRUE(std::equal(old_g->ranges.begin(), old_g->ranges.end(), new_g->ranges.begin()))
      << "the old pages keep their logical offsets";

  ASSERT_TRUE(sender_->extend_send(peer_, tid, ext->pool_descriptor).ok());
  for (size_t i = before_parts; i < parts.size(); ++i) {
    ASSERT_TRUE(sender_->send_segment(peer_, tid, static_cast<uint32_t>(i), staging.data() + parts[i].first,
                                      parts[i].second, parts[i].first)
                    .ok());
  }
  ASSERT_TRUE(sender_->finish(peer_, tid).ok());
  const Status sent = wait_send(*sender_, tid);
  ASSERT_TRUE(sent.ok()) << sent.to_string();
  EXPECT_EQ(landed.segments(), static_cast<int>(parts.size()));
  engine_->post(prefill_conn_, manifest_for(*p, id, grant->lease_id, kMaxNew));
  ASSERT_TRUE(coordinator_->wait_finished(id));
  const auto result = prefill_conn_->wait_for<control::TransferResult>(id);
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(result->code, StatusCode::kOk) << result->message;
  const Streamed s = streamed(*coordinator_, id);
  EXPECT_EQ(s.tokens, plain.tokens);
  EXPECT_EQ(s.text, plain.text);
  EXPECT_EQ(s.tokens, ref.tokens);
  EXPECT_EQ(s.text, ref.text);
  EXPECT_EQ(s.finish, plain.finish);
  engine_->post(coordinator_, control::Release{RequestId(92), blocker->lease_id, "test"});
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
}

// Once the manifest arrived (before its KV: either order is allowed) or
// the sequence decodes, the sender is done: Extend is FAILED_PRECONDITION
// and the request goes on unharmed.
TEST_F(DecodeEngineTest, ExtendAfterTheManifestIsRefused) {
  const auto prompt = tokens(kPrompt3);
  auto p = prefill_of(h2o_policy(), prompt);
  ASSERT_NE(p, nullptr);
  const RequestId id(94);
  constexpr uint32_t kMaxNew = 400;
  auto grant = reserve(id, reservation_for(*p, kMaxNew));
  ASSERT_TRUE(grant.has_value());
  engine_->post(prefill_conn_, manifest_for(*p, id, grant->lease_id, kMaxNew));
  engine_->post(prefill_conn_, control::Extend{id, grant->lease_id, 4096});
  ASSERT_TRUE(prefill_conn_->wait([&](const Messages& ms) { return count_of<control::ExtendResult>(ms, id) == 1; }));
  const auto refused = prefill_conn_->all<control::ExtendResult>(id).back();
  EXPECT_EQ(refused.code, StatusCode::kFailedPrecondition) << refused.message;
  EXPECT_NE(refused.message.find("manifest"), std::string::npos) << refused.message;
  EXPECT_EQ(engine_->stats().leases.reserved_bytes, static_cast<int64_t>(grant->granted_bytes));

  ASSERT_TRUE(ship(*sender_, peer_, grant->pool_descriptor, *p).ok());
  ASSERT_TRUE(coordinator_->wait([&](const Messages& ms) { return count_of<control::TokenChunk>(ms, id) >= 2; }));
  engine_->post(prefill_conn_, control::Extend{id, grant->lease_id, 4096});
  ASSERT_TRUE(prefill_conn_->wait([&](const Messages& ms) { return count_of<control::ExtendResult>(ms, id) == 2; }));
  const auto decoding = prefill_conn_->all<control::ExtendResult>(id).back();
  EXPECT_EQ(decoding.code, StatusCode::kFailedPrecondition) << decoding.message;
  engine_->post(coordinator_, control::Cancel{id, "test done"});
  ASSERT_TRUE(coordinator_->wait_finished(id));
  const Streamed s = streamed(*coordinator_, id);
  const auto ref = reference(h2o_policy(), prompt, static_cast<int32_t>(s.tokens.size()));
  EXPECT_EQ(s.tokens, ref.tokens) << "decoded as without the refused Extends";
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
}

// The transport refuses to grow the receive (it already failed: a segment
// past the grant, its report held until the sender confirms it stopped):
// the answer says why, the new pages go back to the lease, and the failure
// then ends the request as any failed transfer does.
TEST_F(DecodeEngineTest, ExtendOfAFailedReceiveIsRefusedAndReturnsThePages) {
  LandedCounter landed;
  start_engine(int64_t{32} << 20, landed.hooks());
  const RequestId id(95);
  const int64_t pb = page_bytes();
  auto grant = reserve(id, static_cast<uint64_t>(2 * pb));
  ASSERT_TRUE(grant.has_value());
  const transport::TransferId tid(grant->lease_id.value());
  landed.watch(tid);
  std::vector<std::byte> src(static_cast<size_t>(3 * pb), std::byte{1});
  ASSERT_TRUE(sender_->begin_send(peer_, tid, grant->pool_descriptor, transport::Clock::now() + 60s).ok());
  ASSERT_TRUE(sender_->send_segment(peer_, tid, 0, src.data(), static_cast<size_t>(pb), 0).ok());
  std::vector<transport::TransferEvent> none;
  ASSERT_TRUE(wait_until([&] {
    sender_->progress(none);
    return landed.segments() == 1;
  }));
  // The connection is up: this segment goes out now; the sender is not
  // progressed again until the Extend was answered, so it cannot confirm.
  transport::TestHooks skip;
  skip.skip_sender_range_check = true;
  sender_->set_test_hooks(skip);
  ASSERT_TRUE(sender_->send_segment(peer_, tid, 1, src.data(), static_cast<size_t>(2 * pb), static_cast<uint64_t>(pb)).ok());
  const uint64_t it = engine_->stats().iterations;
  ASSERT_TRUE(wait_until([&] { return engine_->stats().iterations >= it + 3; }));  // refused it
  const DecodeStats before = engine_->stats();
  engine_->post(prefill_conn_, control::Extend{id, grant->lease_id, static_cast<uint64_t>(2 * pb)});
  const auto ext = prefill_conn_->wait_for<control::ExtendResult>(id);
  ASSERT_TRUE(ext.has_value());
  EXPECT_EQ(ext->code, StatusCode::kFailedPrecondition) << ext->message;
  EXPECT_NE(ext->message.find("cannot grow the receive"), std::string::npos) << ext->message;
  EXPECT_TRUE(ext->pool_descriptor.empty());
  ASSERT_TRUE(wait_until([&] { return engine_->stats().iterations > before.iterations + 1; }));
  const DecodeStats after = engine_->stats();
  EXPECT_EQ(after.leases.taken_pages, before.leases.taken_pages) << "the new pages went back";
  EXPECT_EQ(after.leases.reserved_bytes, before.leases.reserved_bytes + 2 * pb);

  EXPECT_EQ(wait_send(*sender_, tid).code(), StatusCode::kOutOfRange);
  const auto error = coordinator_->wait_for<control::Error>(id);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, StatusCode::kOutOfRange) << error->message;
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
}

// A sequence whose lease cannot grow (the pool is full) finishes with a
// clear error; the other sequence decoding beside it is unaffected.
void DecodeEngineTest::pool_full_mid_decode(uint64_t id0) {
  const auto prompt_ok = tokens(kPrompt3);
  const auto prompt_tight = tokens(kPrompt1);
  constexpr uint32_t kMaxNew = 24;
  auto ok = prefill_of(dense_policy(), prompt_ok);
  auto tight = prefill_of(dense_policy(), prompt_tight);
  ASSERT_NE(ok, nullptr);
  ASSERT_NE(tight, nullptr);
  const auto ref = reference(dense_policy(), prompt_ok, kMaxNew);

  // The healthy request reserves room to grow; the tight one exactly its
  // image; a third lease takes every byte left, so nothing can grow.
  auto g_ok = reserve(RequestId(id0), reservation_for(*ok, kMaxNew + 2 * kPageTokens));
  ASSERT_TRUE(g_ok.has_value());
  auto g_tight = reserve(RequestId(id0 + 1), static_cast<uint64_t>(tight->image.total_bytes()));
  ASSERT_TRUE(g_tight.has_value());
  const int64_t held = static_cast<int64_t>(g_ok->granted_bytes + g_tight->granted_bytes);
  ASSERT_TRUE(wait_until([&] {
    const auto s = engine_->stats().leases;
    return s.free_bytes == s.capacity_bytes - held;
  }));
  const auto left = static_cast<uint64_t>(engine_->stats().leases.free_bytes);
  ASSERT_GT(left, 0u);
  ASSERT_TRUE(reserve(RequestId(id0 + 2), left).has_value());
  ASSERT_TRUE(ship(*sender_, peer_, g_ok->pool_descriptor, *ok).ok());
  ASSERT_TRUE(ship(*sender_, peer_, g_tight->pool_descriptor, *tight).ok());
  engine_->post(prefill_conn_, manifest_for(*ok, RequestId(id0), g_ok->lease_id, kMaxNew));
  engine_->post(prefill_conn_, manifest_for(*tight, RequestId(id0 + 1), g_tight->lease_id, kMaxNew));

  ASSERT_TRUE(coordinator_->wait_finished(RequestId(id0 + 1)));
  const Streamed t = streamed(*coordinator_, RequestId(id0 + 1));
  EXPECT_EQ(t.finish, FinishReason::kError);
  EXPECT_LT(t.tokens.size(), kMaxNew);
  const auto error = coordinator_->wait_for<control::Error>(RequestId(id0 + 1));
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, StatusCode::kResourceExhausted);
  EXPECT_NE(error->message.find("KV pool full"), std::string::npos) << error->message;

  ASSERT_TRUE(coordinator_->wait_finished(RequestId(id0)));
  const Streamed s = streamed(*coordinator_, RequestId(id0));
  EXPECT_EQ(s.tokens, ref.tokens);
  EXPECT_EQ(s.finish, finish_of(ref.finish_reason));
}

TEST_F(DecodeEngineTest, PoolFullMidDecodeFailsOnlyThatSequence) {
  start_engine(int64_t{8} << 20);
  ASSERT_NO_FATAL_FAILURE(pool_full_mid_decode(71));
}

// The device path (DecodeDevice: engine.backend cuda's structure, with a
// host pool standing in for device memory): each admitted cache moves to
// the device pool with its pages charged to the same lease; gate+pod and
// dense requests batched there stream exactly what generate() produces,
// the device pool holds pages while they decode, and afterwards both pools
// and every lease are empty.
TEST_F(DecodeEngineTest, DevicePathStreamsWhatGenerateProducesAndFreesBothPools) {
  device_mode_ = true;
  auto gate = engine::calibrated_or_random_gate(*L_->model, KVGATE_TEST_MODEL);
  ASSERT_NE(gate, nullptr);
  start_engine(int64_t{32} << 20, {}, 8, gate);
  engine::KvPolicyConfig gp;
  gp.policy = engine::KvPolicy::kGatePod;
  gp.gate = gate;
  gp.n_sink_tokens = 2;
  gp.n_window_tokens = 8;
  constexpr int32_t kMaxNew = 14;
  const std::vector<std::pair<engine::KvPolicyConfig, std::vector<int32_t>>> cases = {
      {gp, tokens(kPrompt1)}, {dense_policy(), tokens(kPrompt2)}, {h2o_policy(), tokens(kPrompt3)}};
  for (size_t i = 0; i < cases.size(); ++i) {
    auto p = prefill_of(cases[i].first, cases[i].second);
    ASSERT_NE(p, nullptr);
    const auto ref = reference(cases[i].first, cases[i].second, kMaxNew);
    start_request(RequestId(90 + i), *p, kMaxNew);
    ASSERT_TRUE(coordinator_->wait_finished(RequestId(90 + i)));
    EXPECT_EQ(streamed(*coordinator_, RequestId(90 + i)).tokens, ref.tokens) << "request " << i;
  }
  EXPECT_EQ(moves_.load(), 3);
  EXPECT_TRUE(wait_until([&] { return pool_all_free(); }));
  EXPECT_EQ(device_pool_->used_pages(), 0);
}

// Device path, lease accounting: pages the device cache takes as it grows
// are charged to the lease, so a lease that cannot grow fails only its own
// sequence ("KV pool full") and the other finishes as generate() does.
TEST_F(DecodeEngineTest, DevicePathChargesGrowthToTheLease) {
  device_mode_ = true;
  start_engine(int64_t{8} << 20);
  ASSERT_NO_FATAL_FAILURE(pool_full_mid_decode(171));
  // Only the third lease (never shipped) still holds bytes; no device page
  // outlives its sequence (the engine frees a request just after its last
  // chunk: wait for the published state; the device pool is idle then).
  ASSERT_TRUE(wait_until([&] { return engine_->stats().active_sequences == 0; }));
  EXPECT_EQ(device_pool_->used_pages(), 0);
}

// A device pool smaller than the host pool is refused at start, naming the
// key: a lease could then allow what the device cannot hold.
TEST_F(DecodeEngineTest, DevicePoolSmallerThanTheHostPoolIsRefused) {
  engine_.reset();
  sender_.reset();
  const int64_t pb = kPageTokens * L_->model->config().head_dim * 2;
  auto small = std::move(kvstore::PagePool::create(pb, int64_t{4} << 20)).value();
  engine::BatchDecoder batch(*forward_);
  DecodeEngineOptions o;
  o.decode.pool_bytes = int64_t{8} << 20;
  o.decode.page_tokens = kPageTokens;
  o.decode.max_batch_requests = 4;
  o.decode.lease_ttl = 30000ms;
  o.transport.kind = TransportKind::kLoopback;
  o.cluster_token = "token";
  auto dev = std::make_shared<DecodeDevice>();
  dev->pool = small.get();
  dev->step = [&batch](std::span<const engine::DecodeItem> i, std::span<float> l,
                       std::span<Status> s) { return batch.step(i, l, s); };
  o.device = dev;
  auto registry = std::make_shared<prometheus::Registry>();
  DecodeMetrics metrics(registry);
  auto e = DecodeEngine::start(*L_->model, *L_->tokenizer, nullptr, std::move(o), &metrics);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("decode.pool_bytes"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::decode::testing
