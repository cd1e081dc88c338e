// Decode over the compressed layout (DESIGN.md §4) against dense decode.
#include <gtest/gtest.h>

#include "tests/unit/engine/test_model.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <filesystem>

#include "engine/generate.h"
#include "engine/kv_policy.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "kvstore/footprint.h"
#include "kvstore/page_pool.h"

namespace kvgate::engine {
namespace {

using Loaded = testing::TestModel;
#define REQUIRE_MODEL() KVGATE_REQUIRE_MODEL()

// How far two next-token distributions are: KL divergence, and whether the
// greedy choice differs where it is decided (top-2 margin of the dense
// logits at least kTieMargin).
//
// Why not a max-difference bound: with Q8-quantized activations this model
// is chaotic at the last bit. Dense decode and decode over the compressed
// layout are bit-identical until their attention kernels first differ in
// float summation order (both within 2e-7 of a float64 reference,
// tests/unit/kvstore), and from then on single logits move by up to ~2
// (partly a shift of all logits, which softmax ignores) while the
// distribution stays close: KL below 0.15 nats.
constexpr float kTieMargin = 0.5f;

// KL(softmax(a) || softmax(b)) in nats, in double.
double kl_divergence(const std::vector<float>& a, const std::vector<float>& b) {
  auto log_softmax = [](const std::vector<float>& x) {
    const double m = *std::max_element(x.begin(), x.end());
    double s = 0;
    for (float v : x) s += std::exp(v - m);
    std::vector<double> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] - m - std::log(s);
    return out;
  };
  const auto la = log_softmax(a), lb = log_softmax(b);
  double kl = 0;
  for (size_t i = 0; i < la.size(); ++i) kl += std::exp(la[i]) * (la[i] - lb[i]);
  return kl;
}

struct Gap {
  double kl = 0;  // largest per-step KL(dense || policy), nats
  int decided_disagreements = 0;
  bool identical = true;  // every logit of every step bit-equal
};

// Teacher-forced decode of `cont` after `prompt`, dense vs the given policy.
Gap logit_gap(const Loaded* L, const KvPolicyConfig& policy, const std::vector<int32_t>& prompt,
              const std::vector<int32_t>& cont) {
  const auto& c = L->model->config();
  CpuForward fwd(*L->model, ForwardOptions{});
  const int64_t total = static_cast<int64_t>(prompt.size() + cont.size());
  KvCache dense(c, total);
  KvCache pre(c, total);
  std::vector<float> a(c.n_vocab), b(c.n_vocab);
  EXPECT_TRUE(fwd.prefill(dense, prompt, a.data()).ok());
  EXPECT_TRUE(fwd.prefill(pre, prompt, b.data()).ok());

  auto layout = make_kv_layout(c, policy);
  EXPECT_TRUE(layout.ok()) << layout.status().to_string();
  auto pool = kvstore::PagePool::create(16 * c.head_dim * 2, 64 << 20);
  EXPECT_TRUE(pool.ok());
  std::vector<uint8_t> flags;
  EXPECT_TRUE(policy_flags(policy, *layout, 0, prompt.size(), flags).ok());
  const int64_t plane = c.n_kv_heads * pre.capacity() * c.head_dim;
  kvstore::DenseKv kv{pre.k(0, 0), pre.k(0, 0) + plane, c.head_dim, 2 * plane,
                      pre.capacity() * c.head_dim};
  auto cc = kvstore::CompressedKvCache::build_from_dense(*layout, pool->get(), prompt.size(), kv, flags);
  EXPECT_TRUE(cc.ok()) << cc.status().to_string();
  Gap gap;
  for (int32_t tok : cont) {
    BatchItem d{&dense, std::span<const int32_t>(&tok, 1), true};
    EXPECT_TRUE(fwd.forward(std::span<const BatchItem>(&d, 1), a.data()).ok());
    EXPECT_TRUE(policy_flags(policy, *layout, cc->n_tokens(), 1, flags).ok());
    CompressedItem ci{&*cc, tok, flags, true};
    auto s = fwd.forward_compressed(std::span<const CompressedItem>(&ci, 1), b.data());
    EXPECT_TRUE(s.ok()) << s.to_string();
    gap.kl = std::max(gap.kl, kl_divergence(a, b));
    gap.identical = gap.identical && a == b;
    std::vector<float> sorted(a);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    if (sorted[0] - sorted[1] >= kTieMargin) gap.decided_disagreements += argmax(a) != argmax(b);
  }
  EXPECT_EQ(cc->n_tokens(), total);
  // The cache holds exactly the DESIGN.md §4 formula.
  std::vector<int64_t> retained(layout->blocks.n_slots());
  for (int64_t s = 0; s < layout->blocks.n_slots(); ++s) retained[s] = cc->retained_tokens(s);
  auto fp = kvstore::footprint(*layout, total, retained);
  EXPECT_TRUE(fp.ok());
  EXPECT_EQ(cc->bytes(), fp->total_bytes());
  return gap;
}

std::vector<int32_t> continuation(const Loaded* L) {
  return L->tokenizer->encode(" It was the best of times, it was the worst of times, it was the age", false,
                              false);
}

// dense through the compressed layout (blocks of 1, every flag 1) is dense
// attention, bit for bit: attend() visits the held tokens in position order
// with the dense engine's steps (kvstore/attention.h), so a `dense` request
// served through the wire image reproduces the single-process output.
TEST(CompressedForward, DensePolicyEqualsDenseDecode) {
  REQUIRE_MODEL();
  const auto prompt = L->tokenizer->encode("A tale of two cities begins:", false, false);
  KvPolicyConfig p;
  p.policy = KvPolicy::kDense;
  p.n_sink_tokens = 2;
  p.n_window_tokens = 4;  // most tokens are distant: the distant path is exercised
  const Gap gap = logit_gap(L, p, prompt, continuation(L));
  EXPECT_TRUE(gap.identical) << "KL " << gap.kl << " nats";
  EXPECT_EQ(gap.decided_disagreements, 0);
}

// A window that covers the whole sequence drops nothing: dense again.
TEST(CompressedForward, WindowCoveringEverythingEqualsDense) {
  REQUIRE_MODEL();
  const auto prompt = L->tokenizer->encode("A tale of two cities begins:", false, false);
  KvPolicyConfig p;
  p.policy = KvPolicy::kWindow;
  p.n_sink_tokens = 4;
  p.n_window_tokens = 256;
  const Gap gap = logit_gap(L, p, prompt, continuation(L));
  EXPECT_TRUE(gap.identical) << "KL " << gap.kl << " nats";
  EXPECT_EQ(gap.decided_disagreements, 0);
}

// A short window really changes the model's inputs (the test can fail), and
// pod shares keys; both keep the formula exact (checked inside).
TEST(CompressedForward, WindowAndPodCompressAndStayClose) {
  REQUIRE_MODEL();
  const auto prompt = L->tokenizer->encode(
      "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
      "must be in want of a wife.", false, false);
  KvPolicyConfig w;
  w.policy = KvPolicy::kWindow;
  w.n_sink_tokens = 2;
  w.n_window_tokens = 4;
  // Dropping all but 6 tokens changes the model's view: far beyond noise.
  EXPECT_GT(logit_gap(L, w, prompt, continuation(L)).kl, 0.3);
  KvPolicyConfig pod;
  pod.policy = KvPolicy::kPod;
  pod.n_sink_tokens = 2;
  pod.n_window_tokens = 4;
  pod.pod_group_layers = 2;
  const Gap pod_gap = logit_gap(L, pod, prompt, continuation(L));
  std::printf("KL(dense || pod, uniform blocks of 2, uncalibrated) %.3f nats\n", pod_gap.kl);
}

// Every query's attention sums to 1, so the attention a layer's keys
// receive sums to (queries x query heads per KV head); chunked prefill
// records the same statistics as one pass.
// The calibration extras: attention from distant queries (sum and max) and
// raw score capture, checked against the totals they must respect.
TEST(AttentionStats, DistantSumMaxAndCapturedScoresAreConsistent) {
  REQUIRE_MODEL();
  const auto& c = L->model->config();
  const auto prompt = L->tokenizer->encode(
      "It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, "
      "his chin nuzzled into his breast in an effort to escape the vile wind, slipped quickly.",
      false, false);
  const int64_t t = static_cast<int64_t>(prompt.size());
  const int64_t group = c.n_heads / c.n_kv_heads;
  const int64_t w = 8;
  CpuForward fwd(*L->model, ForwardOptions{});
  KvCache cache(c, t);
  AttentionStats st;
  st.reset(c.n_layers, c.n_kv_heads, t, t);
  st.enable_distant(w);
  st.enable_capture(c.n_heads, t - 3);
  std::vector<float> logits(c.n_vocab);
  ASSERT_TRUE(fwd.prefill(cache, prompt, logits.data(), &st).ok());
  for (int64_t l = 0; l < c.n_layers; ++l) {
    for (int64_t h = 0; h < c.n_kv_heads; ++h) {
      const float* sum = st.received_distant_row(l, h);
      const float* mx = st.received_distant_max.data() + (l * c.n_kv_heads + h) * t;
      for (int64_t j = 0; j < t; ++j) {
        // Queries at positions >= j + w count: t - j - w of them.
        const int64_t n_queries = t - j - w;
        if (n_queries <= 0) {
          EXPECT_EQ(sum[j], 0.0f) << l << " " << h << " " << j;
          EXPECT_EQ(mx[j], 0.0f);
          continue;
        }
        // max <= sum <= (query rows: n_queries x group heads) * max, and a
        // probability is at most 1.
        EXPECT_GT(sum[j], 0.0f);
        EXPECT_LE(mx[j], sum[j] * (1 + 1e-6f));
        EXPECT_LE(sum[j], static_cast<float>(n_queries * group) * mx[j] * (1 + 1e-5f));
        EXPECT_LE(mx[j], 1.0f);
      }
    }
  }
  // Captured rows are raw scores (not probabilities): finite over the
  // causal keys, zero past the query, and not a distribution (a softmax
  // output would sum to 1).
  for (int64_t qi = 0; qi < st.n_captured(); ++qi) {
    const int64_t pos = st.capture_from + qi;
    const float* row = st.captured_row(c.n_layers - 1, 0, qi);
    double total = 0;
    for (int64_t j = 0; j <= pos; ++j) {
      EXPECT_TRUE(std::isfinite(row[j]));
      total += row[j];
    }
    EXPECT_GT(std::fabs(total - 1.0), 1e-2);
    for (int64_t j = pos + 1; j < t; ++j) EXPECT_EQ(row[j], 0.0f);
  }
}

TEST(AttentionStats, SumToQueriesTimesGroupAndSurviveChunking) {
  REQUIRE_MODEL();
  const auto& c = L->model->config();
  const auto prompt = L->tokenizer->encode(
      "The quick brown fox jumps over the lazy dog while the cat watches from the window.", false, false);
  const int64_t t = static_cast<int64_t>(prompt.size());
  const int64_t group = c.n_heads / c.n_kv_heads;
  auto record = [&](int64_t chunk) {
    ForwardOptions fo;
    fo.max_batch_tokens = chunk;
    CpuForward fwd(*L->model, fo);
    KvCache cache(c, t);
    AttentionStats st;
    st.reset(c.n_layers, c.n_kv_heads, t, t - 5);
    std::vector<float> logits(c.n_vocab);
    EXPECT_TRUE(fwd.prefill(cache, prompt, logits.data(), &st).ok());
    return st;
  };
  const AttentionStats whole = record(512);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    for (int64_t h = 0; h < c.n_kv_heads; ++h) {
      double recv = 0, obs = 0;
      for (int64_t j = 0; j < t; ++j) {
        recv += whole.received_row(l, h)[j];
        obs += whole.observed_row(l, h)[j];
      }
      EXPECT_NEAR(recv, static_cast<double>(t * group), 1e-3 * t * group);
      EXPECT_NEAR(obs, static_cast<double>(5 * group), 1e-3 * 5 * group);
    }
  }
  // The first key receives attention from every query; the last only from itself.
  EXPECT_GT(whole.received_row(0, 0)[0], whole.received_row(0, 0)[t - 1]);
  const AttentionStats chunked = record(4);
  double worst = 0;
  for (size_t i = 0; i < whole.received.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(whole.received[i] - chunked.received[i])));
  }
  // Different kernels (decode vs prefill matmul) feed the two runs: the
  // probabilities agree to the same noise as the logits, far below the
  // O(1) values being compared.
  EXPECT_LT(worst, 0.5);
}

// Ranking policies keep exactly ceil(keep_rate x distant) prompt tokens per
// slot, the highest-scoring ones; sinks, the final window and generated
// tokens are kept.
TEST(KvPolicy, H2oKeepsTheHeaviestDistantTokens) {
  LlamaConfig c;
  c.n_layers = 2;
  c.n_kv_heads = 1;
  c.head_dim = 64;
  KvPolicyConfig p;
  p.policy = KvPolicy::kH2o;
  p.n_sink_tokens = 2;
  p.n_window_tokens = 3;
  p.keep_rate = 0.4;
  auto layout = make_kv_layout(c, p);
  ASSERT_TRUE(layout.ok()) << layout.status().to_string();
  AttentionStats st;
  st.reset(2, 1, 12, 9);
  // Distant tokens are 2..8 (7 of them): keep ceil(0.4 * 7) = 3.
  const float layer0[12] = {9, 9, 0.1f, 5, 0.2f, 4, 0.3f, 6, 0.4f, 0, 0, 0};
  const float layer1[12] = {9, 9, 7, 0.1f, 0.2f, 0.3f, 3, 0.4f, 8, 0, 0, 0};
  std::copy(layer0, layer0 + 12, st.received_row(0, 0));
  std::copy(layer1, layer1 + 12, st.received_row(1, 0));
  std::vector<uint8_t> flags;
  ASSERT_TRUE(policy_flags(p, *layout, 0, 12, flags, &st).ok());
  const std::vector<uint8_t> want0 = {1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1};
  const std::vector<uint8_t> want1 = {1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 1};
  EXPECT_EQ(std::vector<uint8_t>(flags.begin(), flags.begin() + 12), want0);
  EXPECT_EQ(std::vector<uint8_t>(flags.begin() + 12, flags.end()), want1);
  // A generated token (position 12) is kept in every slot.
  ASSERT_TRUE(policy_flags(p, *layout, 12, 1, flags, &st).ok());
  EXPECT_EQ(flags, (std::vector<uint8_t>{1, 1}));
  // Without statistics the prompt cannot be ranked: a clear error.
  EXPECT_EQ(policy_flags(p, *layout, 0, 12, flags, nullptr).code(), StatusCode::kFailedPrecondition);
}

TEST(CompressedForward, GenerateReportsCompressedBytes) {
  REQUIRE_MODEL();
  CpuForward fwd(*L->model, ForwardOptions{});
  const auto prompt = L->tokenizer->encode("The capital of France is", false, false);
  GenerateOptions o;
  o.max_tokens = 20;
  o.ignore_eos = true;
  o.kv_policy.policy = KvPolicy::kWindow;
  o.kv_policy.n_sink_tokens = 4;
  o.kv_policy.n_window_tokens = 8;
  auto r = generate(fwd, *L->tokenizer, prompt, o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const int64_t cached = static_cast<int64_t>(prompt.size()) + 20 - 1;
  EXPECT_EQ(r->kv_dense_bytes, L->model->kv_bytes_per_token() * cached);
  // window: sinks + window rows per (layer, head), K and V, fp16, nothing distant.
  const auto& c = L->model->config();
  EXPECT_EQ(r->kv_bytes, 2 * c.n_layers * c.n_kv_heads * 12 * c.head_dim * 2);
  EXPECT_DOUBLE_EQ(r->keep_rate, 0.0);
  // gate+pod without a calibrated gate: a clear error that says how to get one.
  o.kv_policy.policy = KvPolicy::kGatePod;
  auto bad = generate(fwd, *L->tokenizer, prompt, o);
  EXPECT_EQ(bad.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(bad.status().message().find("gate+pod"), std::string::npos) << bad.status().message();
  EXPECT_NE(bad.status().message().find("--gate"), std::string::npos) << bad.status().message();
  EXPECT_NE(bad.status().message().find("kvgate calibrate"), std::string::npos);
}

// Budget mode: the top `budget` distant prompt tokens by score, then later
// tokens only while the slot's budget lasts, so a slot never retains more
// than the budget (the footprint is known before prefill).
TEST(KvPolicy, H2oBudgetKeepsAtMostTheBudget) {
  LlamaConfig c;
  c.n_layers = 1;
  c.n_kv_heads = 1;
  c.head_dim = 64;
  KvPolicyConfig p;
  p.policy = KvPolicy::kH2o;
  p.n_sink_tokens = 2;
  p.n_window_tokens = 3;
  AttentionStats st;
  st.reset(1, 1, 12, 9);
  // Distant at the end of the prompt: tokens 2..8 (7); final window 9..11.
  const float recv[12] = {9, 9, 0.1f, 5, 0.2f, 4, 0.3f, 6, 0.4f, 0, 0, 0};
  std::copy(recv, recv + 12, st.received_row(0, 0));
  auto layout = make_kv_layout(c, p);
  ASSERT_TRUE(layout.ok()) << layout.status().to_string();
  std::vector<uint8_t> flags;

  p.budget_tokens = 2;  // the two heaviest (7 and 3); nothing later
  ASSERT_TRUE(policy_flags(p, *layout, 0, 12, flags, &st).ok());
  EXPECT_EQ(flags, (std::vector<uint8_t>{1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0}));
  ASSERT_TRUE(policy_flags(p, *layout, 12, 1, flags, &st).ok());
  EXPECT_EQ(flags, (std::vector<uint8_t>{0}));

  p.budget_tokens = 9;  // all 7 candidates, then 2 of the later tokens (9 and 10)
  ASSERT_TRUE(policy_flags(p, *layout, 0, 12, flags, &st).ok());
  EXPECT_EQ(flags, (std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0}));
  ASSERT_TRUE(policy_flags(p, *layout, 12, 2, flags, &st).ok());
  EXPECT_EQ(flags, (std::vector<uint8_t>{0, 0}));
}

TEST(KvPolicy, GatePoliciesNeedAGateAndTakeNoPolicyFlags) {
  LlamaConfig c;
  c.n_layers = 4;
  c.n_kv_heads = 2;
  c.head_dim = 64;
  for (KvPolicy kind : {KvPolicy::kGate, KvPolicy::kGatePod}) {
    KvPolicyConfig p;
    p.policy = kind;
    auto layout = make_kv_layout(c, p);
    EXPECT_EQ(layout.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(layout.status().message().find(kv_policy_name(kind)), std::string::npos);
  }
  KvPolicyConfig dense;
  auto layout = make_kv_layout(c, dense);
  ASSERT_TRUE(layout.ok());
  KvPolicyConfig gate;
  gate.policy = KvPolicy::kGate;
  std::vector<uint8_t> flags;
  EXPECT_EQ(policy_flags(gate, *layout, 0, 4, flags).code(), StatusCode::kFailedPrecondition);
  // Unset sinks and window take the defaults without a gate; set ones win.
  EXPECT_EQ(layout->n_sink_tokens, kDefaultSinkTokens);
  EXPECT_EQ(layout->n_window_tokens, kDefaultWindowTokens);
  KvPolicyConfig pod;
  pod.policy = KvPolicy::kPod;
  EXPECT_EQ(kv_policy_blocks(pod), "uniform-2");
  pod.gate_decision.retained_budget_tokens = 5;  // the budget is budget_tokens
  EXPECT_EQ(pod.validate().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::engine
