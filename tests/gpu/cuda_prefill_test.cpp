// The compressed prefill on the GPU (engine/cuda/cuda_prefill.h) against
// the CPU's (CpuForward + GatePrefill + build_from_dense) on the real
// model: the same caches — every slot retains the same distant tokens,
// except where the CPU's gate logit lies within kFlipLogit of the slot's
// threshold (the GPU's hidden states differ by cuBLAS's fp16 products, so
// its logits differ by a little: a flip there is a near-tie, counted and
// reported) — and the last token's logits within cuda_forward_test's
// bound. Policies: window and pod (flags by rule: identical structure),
// gate and gate+pod (window-context gate). Skips without a GPU or model.
#include "engine/cuda/cuda_prefill.h"

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "engine/gate_runtime.h"
#include "engine/kv_policy.h"
#include "engine/policy_cache.h"
#include "kvstore/page_pool.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/unit/engine/gate_test_util.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::engine::cuda {
namespace {

constexpr double kMaxLogitDelta = 1.5;  // cuda_forward_test's prefill bound
constexpr float kFlipLogit = 0.05f;

constexpr const char* kText =
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way. The secret number is 4172. In short, the "
    "period was so far like the present period, that some of its noisiest authorities insisted on "
    "its being received, for good or for evil, in the superlative degree of comparison only.";

struct Fixture {
  const engine::testing::TestModel* t = nullptr;
  std::shared_ptr<const GateModel> gate;  // window context
  std::vector<int32_t> prompt;
};

const Fixture* fixture() {
  static Fixture* f = [] {
    auto* out = new Fixture;
    out->t = engine::testing::test_model();
    if (!out->t->model) return out;
    auto g = calibrated_or_random_gate(*out->t->model, KVGATE_TEST_MODEL);
    if (!g) return out;
    GateModel w = *g;
    w.context = GateContext::kWindow;  // the GPU gate's context
    out->gate = std::make_shared<const GateModel>(std::move(w));
    out->prompt = out->t->tokenizer->encode(kText, true, false);
    return out;
  }();
  return f;
}

std::shared_ptr<const PolicyPlan> plan_of(KvPolicy policy, const Fixture& f) {
  KvPolicyConfig p;
  p.policy = policy;
  p.gate = f.gate;
  p.n_sink_tokens = 4;
  p.n_window_tokens = 32;  // most of the prompt is distant
  auto plan = plan_kv_policy(f.t->model->config(), p);
  EXPECT_TRUE(plan.ok()) << plan.status().to_string();
  return plan.ok() ? *plan : nullptr;
}

TEST(CudaPrefill, CompressedCachesMatchTheCpu) {
  KVGATE_REQUIRE_GPU();
  const Fixture* f = fixture();
  if (!f->t->model || !f->gate) GTEST_SKIP() << "model not found at " KVGATE_TEST_MODEL;
  const LlamaModel& model = *f->t->model;
  const int64_t vocab = model.config().n_vocab;
  const auto T = static_cast<int64_t>(f->prompt.size());
  ASSERT_GT(T, 100);
  CudaForwardOptions o;
  o.max_context_tokens = 512;
  o.max_prefill_tokens = 128;  // several chunks: the observer sees each
  auto gpu = CudaForward::create(HostWeights::of(model), o);
  ASSERT_TRUE(gpu.ok()) << gpu.status().to_string();
  int flips = 0, decided = 0;
  for (KvPolicy policy : {KvPolicy::kWindow, KvPolicy::kPod, KvPolicy::kGate, KvPolicy::kGatePod}) {
    SCOPED_TRACE(kv_policy_name(policy));
    const auto plan = plan_of(policy, *f);
    ASSERT_NE(plan, nullptr);
    auto pool_bytes = compressed_pool_bytes(plan->layout, T, 4096);
    ASSERT_TRUE(pool_bytes.ok());
    auto cpu_pool = std::move(kvstore::PagePool::create(4096, *pool_bytes)).value();
    auto gpu_pool = std::move(kvstore::PagePool::create(4096, *pool_bytes)).value();
    // CPU: the reference cache, and the gate's logits for the flip rule.
    CpuForward cpu(model, ForwardOptions{});
    std::vector<float> cpu_logits(static_cast<size_t>(vocab)), gpu_logits(cpu_logits.size());
    std::unique_ptr<GatePrefill> gp;
    if (policy_uses_gate(plan->config)) {
      gp = std::make_unique<GatePrefill>(*f->gate, plan->layout, T, cpu::best_isa());
    }
    auto ref = prefill_compressed(cpu, plan, f->prompt, cpu_pool.get(), cpu_logits);
    ASSERT_TRUE(ref.ok()) << ref.status().to_string();
    std::vector<uint8_t> cpu_flags;
    std::vector<fp16_t> rows;
    if (gp) {
      CpuForward again(model, ForwardOptions{});
      LayerObserverScope scope(again, gp.get());
      std::vector<float> scratch(static_cast<size_t>(vocab));
      KvCache dense(model.config(), T);
      ASSERT_TRUE(again.prefill(dense, f->prompt, scratch.data()).ok());
      ASSERT_TRUE(gp->finish(plan->config.effective_gate_decision(), cpu_flags, rows).ok());
    }
    auto got = prefill_compressed_cuda(**gpu, plan, f->prompt, gpu_pool.get(), gpu_logits);
    ASSERT_TRUE(got.ok()) << got.status().to_string();
    double delta = 0;
    for (int64_t i = 0; i < vocab; ++i) delta = std::max(delta, double(std::fabs(gpu_logits[i] - cpu_logits[i])));
    EXPECT_LE(delta, kMaxLogitDelta);
    const kvstore::CompressedKvCache& a = ref->cache;
    const kvstore::CompressedKvCache& b = got->cache;
    ASSERT_EQ(a.n_tokens(), b.n_tokens());
    const kvstore::KvLayout& lay = plan->layout;
    for (int64_t s = 0; s < lay.blocks.n_slots(); ++s) {
      if (!gp) {
        ASSERT_EQ(a.retained_tokens(s), b.retained_tokens(s)) << "slot " << s;
        continue;
      }
      // Retained sets: a token in one and not the other is a flip; allowed
      // only at a near-tie of the CPU logit.
      std::vector<uint8_t> in_a(static_cast<size_t>(T), 0), in_b(static_cast<size_t>(T), 0);
      for (int64_t i = 0; i < a.retained_tokens(s); ++i) in_a[a.retained_position(s, i)] = 1;
      for (int64_t i = 0; i < b.retained_tokens(s); ++i) in_b[b.retained_position(s, i)] = 1;
      const float thr = f->gate->slots[static_cast<size_t>(
                            f->gate->blocks.slot_of_layer(lay.blocks.slot_block(s).first_layer,
                                                          lay.blocks.slot_head(s)))]
                            .threshold +
                        static_cast<float>(plan->config.effective_gate_decision().threshold_offset);
      for (int64_t t = 0; t < T; ++t) {
        if (in_a[t] == in_b[t]) {
          ++decided;
          continue;
        }
        ++flips;
        const float logit = gp->logits()[static_cast<size_t>(s * T + t)];
        EXPECT_LE(std::fabs(logit - thr), kFlipLogit)
            << "slot " << s << " token " << t << ": CPU logit " << logit << " threshold " << thr;
      }
    }
  }
  ::testing::Test::RecordProperty("gate_flag_flips", flips);
  ::testing::Test::RecordProperty("gate_flags_equal", decided);
  std::printf("gate flags: %d equal, %d flipped at near-ties\n", decided, flips);
}

TEST(CudaPrefill, RefusesWhatTheGpuDoesNotRun) {
  KVGATE_REQUIRE_GPU();
  const Fixture* f = fixture();
  if (!f->t->model || !f->gate) GTEST_SKIP() << "model not found at " KVGATE_TEST_MODEL;
  CudaForwardOptions o;
  o.max_context_tokens = 64;
  o.max_prefill_tokens = 64;
  auto gpu = CudaForward::create(HostWeights::of(*f->t->model), o);
  ASSERT_TRUE(gpu.ok());
  std::vector<float> logits(static_cast<size_t>(f->t->model->config().n_vocab));
  auto pool = std::move(kvstore::PagePool::create(4096, 1 << 24)).value();
  const auto h2o = plan_of(KvPolicy::kH2o, *f);
  auto r1 = prefill_compressed_cuda(**gpu, h2o, f->prompt, pool.get(), logits);
  EXPECT_EQ(r1.status().code(), StatusCode::kInvalidArgument);  // longer than 64 tokens
  const std::vector<int32_t> short_prompt(f->prompt.begin(), f->prompt.begin() + 40);
  auto r2 = prefill_compressed_cuda(**gpu, h2o, short_prompt, pool.get(), logits);
  EXPECT_EQ(r2.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(r2.status().message().find("CPU backend"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::engine::cuda
