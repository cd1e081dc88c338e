// Running Attention-Gates (engine/gate_runtime.h): the gate layouts, prompt
// flags against token-by-token decode, runtime logits against the training
// arithmetic (engine/calibrate.h), the linear kind by hand and budget mode.
// Everything but the layout tests runs random gates on the real model and
// skips when it is absent.
#include "engine/gate_runtime.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/calibrate.h"
#include "engine/gate.h"
#include "engine/model.h"
#include "kvstore/page_pool.h"
#include "tests/unit/engine/gate_test_util.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::engine {
namespace {

using kvstore::BlockMap;
using kvstore::CompressedKvCache;
using kvstore::KvLayout;
using kvstore::LayerBlock;

// ------------------------------------------------------------ helpers

// Forwards every layer input to several observers, in order.
class TeeObserver final : public LayerInputObserver {
 public:
  explicit TeeObserver(std::vector<LayerInputObserver*> to) : to_(std::move(to)) {}
  void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                      std::span<const int64_t> row_pos, std::span<const int32_t> row_item) override {
    for (LayerInputObserver* o : to_) o->on_layer_input(layer, xn, n_rows, row_pos, row_item);
  }

 private:
  std::vector<LayerInputObserver*> to_;
};

// Copies every layer's normalized input, [layer][position][n_embd].
class InputCapture final : public LayerInputObserver {
 public:
  InputCapture(int64_t n_layers, int64_t n_tokens, int64_t n_embd)
      : n_tokens_(n_tokens), n_embd_(n_embd),
        x_(static_cast<size_t>(n_layers), std::vector<float>(static_cast<size_t>(n_tokens * n_embd))) {}
  void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                      std::span<const int64_t> row_pos, std::span<const int32_t>) override {
    for (int64_t r = 0; r < n_rows; ++r) {
      ASSERT_LT(row_pos[r], n_tokens_);
      std::copy(xn + r * n_embd_, xn + (r + 1) * n_embd_, x_[layer].data() + row_pos[r] * n_embd_);
    }
  }
  const float* layer(int64_t l) const { return x_[l].data(); }

 private:
  int64_t n_tokens_, n_embd_;
  std::vector<std::vector<float>> x_;
};

// The gate slot driving layout slot s (the gate runtime's mapping).
int64_t gate_slot_of(const GateModel& gate, const KvLayout& layout, int64_t s) {
  return gate.blocks.slot_of_layer(layout.blocks.slot_block(s).first_layer, layout.blocks.slot_head(s));
}

// A view of a dense KvCache's K/V for build_from_dense.
kvstore::DenseKv dense_view(KvCache& cache, const LlamaConfig& c) {
  const int64_t plane = c.n_kv_heads * cache.capacity() * c.head_dim;
  return {cache.k(0, 0), cache.k(0, 0) + plane, c.head_dim, 2 * plane, cache.capacity() * c.head_dim};
}

// The first sentences of A Tale of Two Cities: the prompt of every test.
constexpr const char* kText =
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way - in short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. There were a king with a "
    "large jaw and a queen with a plain face, on the throne of England; there were a king with a "
    "large jaw and a queen with a fair face, on the throne of France.";

constexpr int64_t kPromptTokens = 120;
constexpr int64_t kSink = 4;
constexpr int64_t kWindow = 16;

std::vector<int32_t> prompt_tokens(const testing::TestModel* L) {
  auto t = L->tokenizer->encode(kText, false, false);
  EXPECT_GE(static_cast<int64_t>(t.size()), kPromptTokens);
  t.resize(static_cast<size_t>(kPromptTokens));
  return t;
}

ForwardOptions two_threads() {
  ForwardOptions o;
  o.n_threads = 2;
  return o;
}

// Dense prefill of `tokens` observed by `observer`.
void prefill_observed(CpuForward& fwd, std::span<const int32_t> tokens, LayerInputObserver* observer,
                      KvCache& cache) {
  std::vector<float> logits(static_cast<size_t>(fwd.model().config().n_vocab));
  fwd.set_layer_observer(observer);
  const Status st = fwd.prefill(cache, tokens, logits.data());
  fwd.set_layer_observer(nullptr);
  ASSERT_TRUE(st.ok()) << st.to_string();
}

// Sets each gate slot's threshold between the two middle logits of the
// prompt's non-sink tokens (from a full prefill with the current
// thresholds): about half the tokens keep, and no logit sits on the
// threshold. Layout must be make_gate_layout(.., share_keys = true, ..).
void set_median_thresholds(GateModel& gate, const KvLayout& layout, CpuForward& fwd,
                           std::span<const int32_t> tokens) {
  const auto n = static_cast<int64_t>(tokens.size());
  GatePrefill pf(gate, layout, n, fwd.options().isa);
  KvCache cache(fwd.model().config(), n);
  prefill_observed(fwd, tokens, &pf, cache);
  std::vector<uint8_t> flags;
  std::vector<fp16_t> rows;
  ASSERT_TRUE(pf.finish(GateDecision{}, flags, rows).ok());
  for (int64_t s = 0; s < layout.blocks.n_slots(); ++s) {
    std::vector<float> v(pf.logits().begin() + s * n + kSink, pf.logits().begin() + (s + 1) * n);
    std::sort(v.begin(), v.end());
    const size_t mid = v.size() / 2;
    gate.slots[s].threshold = 0.5f * (v[mid - 1] + v[mid]);
  }
}

// ------------------------------------------------------------ make_gate_layout

ModelFingerprint small_fingerprint() {
  ModelFingerprint m;
  m.architecture = "llama";
  m.n_layers = 6;
  m.n_embd = 32;
  m.n_heads = 6;
  m.n_kv_heads = 3;
  m.head_dim = 8;
  m.n_vocab = 100;
  return m;
}

LlamaConfig config_of(const ModelFingerprint& m) {
  LlamaConfig c;
  c.architecture = m.architecture;
  c.n_layers = m.n_layers;
  c.n_embd = m.n_embd;
  c.n_heads = m.n_heads;
  c.n_kv_heads = m.n_kv_heads;
  c.head_dim = m.head_dim;
  c.n_vocab = m.n_vocab;
  return c;
}

TEST(MakeGateLayout, SharedKeysUseTheGateBlockMapAndItsStateBytes) {
  const GateModel gate = random_gate(small_fingerprint(), GateKind::kAttention, 1);
  ASSERT_EQ(gate.blocks.to_string(), "h0: 0-2,3-5\nh1: 0-1,2-3,4-5\nh2: 0-1,2-3,4-5\n");
  auto layout = make_gate_layout(config_of(small_fingerprint()), gate, true, 4, 64);
  ASSERT_TRUE(layout.ok()) << layout.status().to_string();
  EXPECT_EQ(layout->blocks, gate.blocks);
  EXPECT_EQ(layout->head_dim, 8);
  EXPECT_EQ(layout->n_sink_tokens, 4);
  EXPECT_EQ(layout->n_window_tokens, 64);
  EXPECT_EQ(layout->gate_state_bytes_per_token, 2 * 8 * 2);  // fp16 K and V, D = 2 x 4
  EXPECT_EQ(layout->gate_row_elems(), 16);
  EXPECT_TRUE(layout->gate_state_retained);  // random_gate: context kCache
}

// A window-context gate keeps no gate rows for retained tokens, with or
// without shared keys; its proximal gate rows stay.
TEST(MakeGateLayout, WindowContextKeepsNoRetainedGateState) {
  GateModel gate = random_gate(small_fingerprint(), GateKind::kAttention, 1);
  gate.context = GateContext::kWindow;
  for (bool share : {true, false}) {
    auto layout = make_gate_layout(config_of(small_fingerprint()), gate, share, 4, 64);
    ASSERT_TRUE(layout.ok()) << layout.status().to_string();
    EXPECT_EQ(layout->gate_state_bytes_per_token, 32);
    EXPECT_FALSE(layout->gate_state_retained);
    EXPECT_EQ(layout->retained_gate_bytes_per_token(), 0);
  }
}

TEST(MakeGateLayout, WithoutSharedKeysEveryBlockHasOneLayer) {
  const GateModel gate = random_gate(small_fingerprint(), GateKind::kAttention, 1);
  auto layout = make_gate_layout(config_of(small_fingerprint()), gate, false, 2, 8);
  ASSERT_TRUE(layout.ok()) << layout.status().to_string();
  EXPECT_EQ(layout->blocks, *BlockMap::dense(6, 3));
  EXPECT_EQ(layout->blocks.n_slots(), 18);
  EXPECT_EQ(layout->gate_state_bytes_per_token, 32);
  EXPECT_EQ(layout->n_sink_tokens, 2);
  EXPECT_EQ(layout->n_window_tokens, 8);
}

TEST(MakeGateLayout, LinearGateHasNoState) {
  const GateModel gate = random_gate(small_fingerprint(), GateKind::kLinear, 1);
  auto layout = make_gate_layout(config_of(small_fingerprint()), gate, true, 4, 16);
  ASSERT_TRUE(layout.ok()) << layout.status().to_string();
  EXPECT_EQ(layout->gate_state_bytes_per_token, 0);
  EXPECT_FALSE(layout->has_gate_state());
  EXPECT_EQ(layout->blocks, gate.blocks);
}

TEST(MakeGateLayout, MismatchedShapesAreRefused) {
  const GateModel gate = random_gate(small_fingerprint(), GateKind::kAttention, 1);
  for (auto change : {+[](LlamaConfig& c) { c.n_layers = 8; }, +[](LlamaConfig& c) { c.n_kv_heads = 2; },
                      +[](LlamaConfig& c) { c.n_embd = 64; }}) {
    LlamaConfig c = config_of(small_fingerprint());
    change(c);
    auto layout = make_gate_layout(c, gate, true, 4, 16);
    ASSERT_FALSE(layout.ok());
    EXPECT_EQ(layout.status().code(), StatusCode::kFailedPrecondition) << layout.status().to_string();
  }
  // An invalid gate is refused before anything else.
  GateModel broken = gate;
  broken.slots.pop_back();
  auto layout = make_gate_layout(config_of(small_fingerprint()), broken, true, 4, 16);
  ASSERT_FALSE(layout.ok());
  EXPECT_EQ(layout.status().code(), StatusCode::kInvalidArgument);
  // So is a window the layout cannot have.
  EXPECT_FALSE(make_gate_layout(config_of(small_fingerprint()), gate, true, 4, 0).ok());
}

// ------------------------------------------------------------ prefill == decode

struct EquivalenceCase {
  const char* name;
  GateKind kind;
  bool share_keys;
  GateContext context = GateContext::kCache;
};

// Path A: dense prefill of the first P tokens, their flags and gate rows
// from a GatePrefill into build_from_dense, then compressed decode of the
// rest, token by token, with a GateDecoder. Path B': a GatePrefill over the
// whole sequence fed the very same layer inputs (the prefill's rows, then
// each decode step's row). The gate runtime claims B' flags = A's decisions;
// compared through what the cache retained and its gate rows.
//
// Path B (a dense prefill of the whole sequence) sees the same inputs only
// at layer 0: beyond it the hidden states of compressed decode differ (the
// model attends over fewer tokens). For slots based at layer 0 B must agree
// with A exactly too; for the others the disagreement is printed.
void check_prefill_equals_decode(const EquivalenceCase& tc) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  const auto tokens = prompt_tokens(L);
  constexpr int64_t kPrefix = 60;
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  GateModel gate = random_gate(*fp, tc.kind, 7);
  gate.context = tc.context;
  const bool window_context = tc.kind == GateKind::kAttention && tc.context == GateContext::kWindow;
  CpuForward fwd(*L->model, two_threads());
  {
    auto pod = make_gate_layout(c, gate, true, kSink, kWindow);
    ASSERT_TRUE(pod.ok());
    set_median_thresholds(gate, *pod, fwd, tokens);
  }
  auto layout = make_gate_layout(c, gate, tc.share_keys, kSink, kWindow);
  ASSERT_TRUE(layout.ok()) << layout.status().to_string();
  const int64_t n_slots = layout->blocks.n_slots();
  const bool attention = tc.kind == GateKind::kAttention;
  const int64_t row = attention ? 2 * gate.gate_dim() : 0;
  const cpu::Isa isa = fwd.options().isa;
  const GateDecision decision;

  // Path A's prefill, observed by B' as well (and its layer inputs
  // captured, for the training logits of a window-context gate).
  GatePrefill prefix(gate, *layout, kPrefix, isa);
  GatePrefill whole(gate, *layout, kPromptTokens, isa);  // B'
  KvCache dense(c, kPromptTokens);
  InputCapture inputs(c.n_layers, kPromptTokens, c.n_embd);
  TeeObserver tee_prefill({&prefix, &whole, &inputs});
  prefill_observed(fwd, std::span(tokens).first(kPrefix), &tee_prefill, dense);
  std::vector<uint8_t> flags_a;
  std::vector<fp16_t> rows_a;
  ASSERT_TRUE(prefix.finish(decision, flags_a, rows_a).ok());
  auto pool = kvstore::PagePool::create(16 * c.head_dim * 2, 64 << 20);
  ASSERT_TRUE(pool.ok());
  auto cache = CompressedKvCache::build_from_dense(*layout, pool->get(), kPrefix, dense_view(dense, c),
                                                   flags_a, prefix.dense_gate(rows_a));
  ASSERT_TRUE(cache.ok()) << cache.status().to_string();

  // Path A's decode.
  GateDecoder decoder(gate, *layout, isa);
  TeeObserver tee_decode({&decoder, &whole, &inputs});
  fwd.set_layer_observer(&tee_decode);
  for (int64_t t = kPrefix; t < kPromptTokens; ++t) {
    CompressedKvCache* caches[] = {&*cache};
    decoder.bind(caches, decision);
    const CompressedItem item{&*cache, tokens[t], {}, false};
    const Status st = fwd.forward_compressed(std::span(&item, 1), nullptr);
    ASSERT_TRUE(st.ok()) << st.to_string();
    ASSERT_TRUE(decoder.status().ok()) << decoder.status().to_string();
  }
  fwd.set_layer_observer(nullptr);
  ASSERT_EQ(cache->n_tokens(), kPromptTokens);

  std::vector<uint8_t> flags_b;
  std::vector<fp16_t> rows_b;
  ASSERT_TRUE(whole.finish(decision, flags_b, rows_b).ok());

  // Tokens [kSink, kPromptTokens - kWindow) have left the window: their
  // flags are visible as what each slot retained.
  const int64_t left_end = kPromptTokens - kWindow;
  int64_t kept = 0, slots_differing = 0;
  for (int64_t s = 0; s < n_slots; ++s) {
    std::vector<int32_t> retained_a, expected;
    for (int64_t i = 0; i < cache->retained_tokens(s); ++i) retained_a.push_back(cache->retained_position(s, i));
    for (int64_t t = kSink; t < left_end; ++t) {
      if (flags_b[s * kPromptTokens + t]) expected.push_back(static_cast<int32_t>(t));
    }
    kept += static_cast<int64_t>(expected.size());
    slots_differing += retained_a != expected;
    EXPECT_EQ(retained_a, expected) << tc.name << " slot " << s;
  }
  EXPECT_EQ(slots_differing, 0);
  // Not vacuous: the gates keep some tokens and drop others.
  const double keep_share = static_cast<double>(kept) / static_cast<double>(n_slots * (left_end - kSink));
  std::printf("%s: %lld slots, kept share of distant tokens %.3f\n", tc.name,
              static_cast<long long>(n_slots), keep_share);
  EXPECT_GT(keep_share, 0.15);
  EXPECT_LT(keep_share, 0.85);

  // Gate rows in the cache (retained and proximal) are bit-identical to B'.
  if (attention) {
    int64_t rows_differing = 0;
    auto same_row = [&](const fp16_t* got, int64_t pos, int64_t s) {
      return std::memcmp(got, rows_b.data() + (pos * n_slots + s) * row, static_cast<size_t>(row) * sizeof(fp16_t)) == 0;
    };
    for (int64_t s = 0; s < n_slots; ++s) {
      auto far = cache->gate_distant(s);
      auto near = cache->gate_proximal(s);
      ASSERT_TRUE(far.ok() && near.ok());
      // A window-context gate's cache drops the gate rows of retained tokens.
      ASSERT_EQ(far->n_rows(), window_context ? 0 : cache->retained_tokens(s));
      ASSERT_EQ(near->n_rows(), kSink + kWindow);
      for (int64_t i = 0; i < far->n_rows(); ++i) {
        rows_differing += !same_row(far->row(i), cache->retained_position(s, i), s);
      }
      for (int64_t r = 0; r < near->n_rows(); ++r) {
        rows_differing += !same_row(near->row(r), cache->proximal_row_position(r), s);
      }
    }
    EXPECT_EQ(rows_differing, 0) << tc.name;
  }

  // A window-context gate decides, in prefill and decode alike, what its
  // training logits say: each token that left the window is retained iff
  // its training logit (band context, over the very layer inputs the
  // runtime saw) reaches the threshold. Logits within fp16-rounding
  // tolerance of the threshold are not judged.
  if (window_context) {
    int64_t judged = 0, disagree = 0;
    const std::vector<uint8_t> all(static_cast<size_t>(kPromptTokens), 1);
    for (int64_t s = 0; s < n_slots; ++s) {
      const int64_t g = gate_slot_of(gate, *layout, s);
      const auto z = gate_training_logits(gate, gate_flat_params(gate, g),
                                          inputs.layer(gate.blocks.slot_block(g).first_layer),
                                          kPromptTokens, all);
      std::vector<uint8_t> retained(static_cast<size_t>(kPromptTokens), 0);
      for (int64_t i = 0; i < cache->retained_tokens(s); ++i) {
        retained[cache->retained_position(s, i)] = 1;
      }
      const float threshold = gate.slots[g].threshold;
      for (int64_t t = kSink; t < left_end; ++t) {
        if (std::abs(z[t] - threshold) <= 1e-4 * std::max(1.0f, std::abs(z[t]))) continue;
        ++judged;
        const bool want = z[t] >= threshold;
        disagree += want != (retained[t] != 0);
        EXPECT_EQ(want, retained[t] != 0) << tc.name << " slot " << s << " token " << t << ": "
                                          << (t < kPrefix ? "prefill" : "decode") << " logit "
                                          << z[t] << " threshold " << threshold;
      }
    }
    EXPECT_EQ(disagree, 0);
    EXPECT_GT(judged, n_slots * (left_end - kSink) * 9 / 10);
  }

  // Path B: a dense prefill of the whole sequence.
  GatePrefill full(gate, *layout, kPromptTokens, isa);
  KvCache dense_b(c, kPromptTokens);
  prefill_observed(fwd, tokens, &full, dense_b);
  std::vector<uint8_t> flags_full;
  std::vector<fp16_t> rows_full;
  ASSERT_TRUE(full.finish(decision, flags_full, rows_full).ok());
  int64_t layer0_slots = 0, other_flag_diffs = 0, other_flags = 0;
  for (int64_t s = 0; s < n_slots; ++s) {
    const bool layer0 = gate.blocks.slot_block(gate_slot_of(gate, *layout, s)).first_layer == 0;
    for (int64_t t = 0; t < kPromptTokens; ++t) {
      const size_t i = static_cast<size_t>(s * kPromptTokens + t);
      if (layer0) {
        ASSERT_EQ(flags_full[i], flags_b[i]) << tc.name << " slot " << s << " token " << t;
        if (attention) {
          ASSERT_EQ(0, std::memcmp(rows_full.data() + (t * n_slots + s) * row,
                                   rows_b.data() + (t * n_slots + s) * row,
                                   static_cast<size_t>(row) * sizeof(fp16_t)))
              << tc.name << " slot " << s << " token " << t;
        }
      } else if (t >= kPrefix) {
        ++other_flags;
        other_flag_diffs += flags_full[i] != flags_b[i];
      }
    }
    layer0_slots += layer0;
  }
  EXPECT_GE(layer0_slots, c.n_kv_heads);
  std::printf("%s: dense prefill of everything vs decode: slots based at layer 0 identical (%lld); "
              "other slots differ in %lld of %lld decoded-token flags\n",
              tc.name, static_cast<long long>(layer0_slots), static_cast<long long>(other_flag_diffs),
              static_cast<long long>(other_flags));
}

TEST(GateRuntime, PrefillFlagsEqualTokenByTokenDecodeAttentionSharedKeys) {
  check_prefill_equals_decode({"attention gate+pod", GateKind::kAttention, true});
}

TEST(GateRuntime, PrefillFlagsEqualTokenByTokenDecodeAttentionOwnKeys) {
  check_prefill_equals_decode({"attention gate", GateKind::kAttention, false});
}

TEST(GateRuntime, PrefillFlagsEqualTokenByTokenDecodeLinear) {
  check_prefill_equals_decode({"linear gate+pod", GateKind::kLinear, true});
}

TEST(GateRuntime, PrefillFlagsEqualTokenByTokenDecodeWindowContextSharedKeys) {
  check_prefill_equals_decode(
      {"attention gate+pod, window context", GateKind::kAttention, true, GateContext::kWindow});
}

TEST(GateRuntime, PrefillFlagsEqualTokenByTokenDecodeWindowContextOwnKeys) {
  check_prefill_equals_decode(
      {"attention gate, window context", GateKind::kAttention, false, GateContext::kWindow});
}

// ------------------------------------------------------------ runtime == training

// With a window covering the whole prompt nothing is evicted, so the
// runtime's context is the full causal context of training: the logits
// agree (both round K/V to fp16; only summation order differs).
void check_runtime_equals_training(GateKind kind) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  const auto tokens = prompt_tokens(L);
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  const GateModel gate = random_gate(*fp, kind, 3);
  auto layout = make_gate_layout(c, gate, true, kSink, 128);
  ASSERT_TRUE(layout.ok());
  CpuForward fwd(*L->model, two_threads());
  GatePrefill pf(gate, *layout, kPromptTokens, fwd.options().isa);
  InputCapture capture(c.n_layers, kPromptTokens, c.n_embd);
  TeeObserver tee({&pf, &capture});
  KvCache cache(c, kPromptTokens);
  prefill_observed(fwd, tokens, &tee, cache);
  std::vector<uint8_t> flags;
  std::vector<fp16_t> rows;
  ASSERT_TRUE(pf.finish(GateDecision{}, flags, rows).ok());

  const std::vector<uint8_t> all(static_cast<size_t>(kPromptTokens), 1);
  double worst = 0.0, spread = 0.0;
  for (int64_t s = 0; s < layout->blocks.n_slots(); ++s) {
    const float* x = capture.layer(gate.blocks.slot_block(s).first_layer);
    const auto z = gate_training_logits(gate, gate_flat_params(gate, s), x, kPromptTokens, all);
    ASSERT_EQ(static_cast<int64_t>(z.size()), kPromptTokens);
    for (int64_t t = 0; t < kPromptTokens; ++t) {
      const double got = pf.logits()[s * kPromptTokens + t];
      const double err = std::abs(got - z[t]) / std::max(1.0, std::abs(static_cast<double>(z[t])));
      worst = std::max(worst, err);
      spread = std::max(spread, std::abs(static_cast<double>(z[t]) - pf.logits()[s * kPromptTokens]));
      ASSERT_LE(err, 1e-4) << "slot " << s << " token " << t << ": runtime " << got << ", training " << z[t];
    }
  }
  std::printf("%s: largest runtime/training logit difference %.3g (relative, floor 1); logit spread %.3g\n",
              gate_kind_name(kind), worst, spread);
  EXPECT_GT(spread, 1e-2) << "logits barely depend on the token: the comparison would prove little";
}

TEST(GateRuntime, RuntimeLogitsEqualTrainingLogitsAttention) {
  check_runtime_equals_training(GateKind::kAttention);
}

TEST(GateRuntime, RuntimeLogitsEqualTrainingLogitsLinear) {
  check_runtime_equals_training(GateKind::kLinear);
}

// A window-context gate: with a short window (tokens evicted, flags 0 and
// 1 both), under any threshold offset and in budget mode, the runtime's
// logit of every token of every layout slot equals the training logit
// (band mask), with shared keys and without. The same gate in the cache
// context does not have that property once tokens are evicted (its
// runtime context depends on the flags), which shows the comparison can
// fail.
TEST(GateRuntime, WindowContextRuntimeLogitsEqualTrainingLogitsWithEvictions) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  const auto tokens = prompt_tokens(L);
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  GateModel gate = random_gate(*fp, GateKind::kAttention, 3);
  gate.context = GateContext::kWindow;
  ASSERT_EQ(gate.n_sink_tokens, kSink);  // training's band = the layout's proximal set
  ASSERT_EQ(gate.n_window_tokens, kWindow);
  CpuForward fwd(*L->model, two_threads());
  {
    auto pod = make_gate_layout(c, gate, true, kSink, kWindow);
    ASSERT_TRUE(pod.ok());
    set_median_thresholds(gate, *pod, fwd, tokens);
  }
  InputCapture capture(c.n_layers, kPromptTokens, c.n_embd);
  {
    KvCache cache(c, kPromptTokens);
    prefill_observed(fwd, tokens, &capture, cache);
  }
  const std::vector<uint8_t> all(static_cast<size_t>(kPromptTokens), 1);
  std::vector<std::vector<float>> training(gate.slots.size());
  for (size_t g = 0; g < gate.slots.size(); ++g) {
    training[g] = gate_training_logits(gate, gate_flat_params(gate, static_cast<int64_t>(g)),
                                       capture.layer(gate.blocks.slot_block(g).first_layer),
                                       kPromptTokens, all);
  }

  GateDecision budget;
  budget.retained_budget_tokens = 20;
  GateDecision low, high;
  low.threshold_offset = -0.5;
  high.threshold_offset = 0.5;
  double worst = 0.0;
  for (bool share : {true, false}) {
    auto layout = make_gate_layout(c, gate, share, kSink, kWindow);
    ASSERT_TRUE(layout.ok());
    ASSERT_FALSE(layout->gate_state_retained);
    const int64_t n_slots = layout->blocks.n_slots();
    for (const GateDecision& decision : {GateDecision{}, low, high, budget}) {
      GatePrefill pf(gate, *layout, kPromptTokens, fwd.options().isa);
      KvCache cache(c, kPromptTokens);
      prefill_observed(fwd, tokens, &pf, cache);
      std::vector<uint8_t> flags;
      std::vector<fp16_t> rows;
      ASSERT_TRUE(pf.finish(decision, flags, rows).ok());
      int64_t kept = 0, dropped = 0;
      for (int64_t s = 0; s < n_slots; ++s) {
        const auto& z = training[gate_slot_of(gate, *layout, s)];
        for (int64_t t = 0; t < kPromptTokens; ++t) {
          const double got = pf.logits()[s * kPromptTokens + t];
          const double err = std::abs(got - z[t]) / std::max(1.0, std::abs(static_cast<double>(z[t])));
          worst = std::max(worst, err);
          ASSERT_LE(err, 1e-4) << "shared keys " << share << " offset " << decision.threshold_offset
                               << " budget " << decision.retained_budget_tokens << " slot " << s
                               << " token " << t << ": runtime " << got << ", training " << z[t];
          if (t >= kSink && t < kPromptTokens - kWindow) {
            (flags[s * kPromptTokens + t] ? kept : dropped) += 1;
          }
        }
      }
      // Evictions happen: tokens both kept and dropped.
      EXPECT_GT(kept, 0);
      EXPECT_GT(dropped, 0);
    }
  }
  std::printf("window context: largest runtime/training logit difference %.3g (relative, floor 1)\n",
              worst);

  // The cache context on the same gate and evictions: its runtime logits
  // leave the full-causal training logits (and the band's) somewhere.
  GateModel cache_gate = gate;
  cache_gate.context = GateContext::kCache;
  auto layout = make_gate_layout(c, cache_gate, true, kSink, kWindow);
  ASSERT_TRUE(layout.ok());
  GatePrefill pf(cache_gate, *layout, kPromptTokens, fwd.options().isa);
  KvCache cache(c, kPromptTokens);
  prefill_observed(fwd, tokens, &pf, cache);
  std::vector<uint8_t> flags;
  std::vector<fp16_t> rows;
  ASSERT_TRUE(pf.finish(GateDecision{}, flags, rows).ok());
  double cache_worst = 0.0, band_gap = 0.0;
  for (int64_t s = 0; s < layout->blocks.n_slots(); ++s) {
    const auto full = gate_training_logits(cache_gate, gate_flat_params(cache_gate, s),
                                           capture.layer(cache_gate.blocks.slot_block(s).first_layer),
                                           kPromptTokens, all);
    for (int64_t t = 0; t < kPromptTokens; ++t) {
      cache_worst = std::max(cache_worst, static_cast<double>(std::abs(pf.logits()[s * kPromptTokens + t] - full[t])));
      band_gap = std::max(band_gap, static_cast<double>(std::abs(full[t] - training[s][t])));
    }
  }
  std::printf("cache context with evictions: largest runtime/training logit difference %.3g; "
              "band vs full causal training logits differ by up to %.3g\n",
              cache_worst, band_gap);
  EXPECT_GT(cache_worst, 1e-2);
  EXPECT_GT(band_gap, 1e-2);
}

// ------------------------------------------------------------ linear by hand

TEST(GateRuntime, LinearFlagsAreTheThresholdedDotProduct) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  const auto tokens = prompt_tokens(L);
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  GateModel gate = random_gate(*fp, GateKind::kLinear, 5);
  CpuForward fwd(*L->model, two_threads());
  auto layout = make_gate_layout(c, gate, true, kSink, kWindow);
  ASSERT_TRUE(layout.ok());
  set_median_thresholds(gate, *layout, fwd, tokens);
  for (size_t s = 0; s < gate.slots.size(); ++s) gate.slots[s].bias = 0.05f * static_cast<float>(s % 3);

  GatePrefill pf(gate, *layout, kPromptTokens, fwd.options().isa);
  InputCapture capture(c.n_layers, kPromptTokens, c.n_embd);
  TeeObserver tee({&pf, &capture});
  KvCache cache(c, kPromptTokens);
  prefill_observed(fwd, tokens, &tee, cache);
  std::vector<uint8_t> flags;
  std::vector<fp16_t> rows;
  ASSERT_TRUE(pf.finish(GateDecision{}, flags, rows).ok());
  EXPECT_TRUE(rows.empty());

  int64_t checked = 0, kept = 0;
  for (int64_t s = 0; s < layout->blocks.n_slots(); ++s) {
    const GateSlot& w = gate.slots[s];
    const float* x = capture.layer(gate.blocks.slot_block(s).first_layer);
    for (int64_t t = 0; t < kPromptTokens; ++t) {
      double logit = w.bias;
      for (int64_t e = 0; e < c.n_embd; ++e) logit += static_cast<double>(w.wo[e]) * x[t * c.n_embd + e];
      EXPECT_NEAR(pf.logits()[s * kPromptTokens + t], logit, 1e-4 * std::max(1.0, std::abs(logit)));
      const uint8_t flag = flags[s * kPromptTokens + t];
      if (t < kSink) {
        EXPECT_EQ(flag, 1) << "sinks are flagged 1";
        continue;
      }
      if (std::abs(logit - w.threshold) < 1e-5) continue;  // a tie at float precision
      EXPECT_EQ(flag, logit >= w.threshold ? 1 : 0) << "slot " << s << " token " << t;
      ++checked;
      kept += flag;
    }
  }
  EXPECT_GT(checked, layout->blocks.n_slots() * (kPromptTokens - kSink) * 9 / 10);
  EXPECT_GT(kept, checked / 5);
  EXPECT_LT(kept, checked * 4 / 5);

  // A threshold offset moves every slot's threshold (the logits stay).
  GateDecision raised;
  raised.threshold_offset = 0.25;
  std::vector<float> logits = pf.logits();
  ASSERT_TRUE(pf.finish(raised, flags, rows).ok());
  EXPECT_EQ(pf.logits(), logits);
  int64_t kept_raised = 0;
  for (int64_t s = 0; s < layout->blocks.n_slots(); ++s) {
    const float threshold = gate.slots[s].threshold + 0.25f;
    for (int64_t t = kSink; t < kPromptTokens; ++t) {
      const float z = logits[s * kPromptTokens + t];
      EXPECT_EQ(flags[s * kPromptTokens + t], z >= threshold ? 1 : 0) << "slot " << s << " token " << t;
      kept_raised += flags[s * kPromptTokens + t];
    }
  }
  EXPECT_LT(kept_raised, kept);
}

// ------------------------------------------------------------ budget mode

// Budget k: the prompt's k highest-logit non-sink tokens of each slot are
// flagged (tokens still in the window included: they are retained as they
// leave), and tokens generated later are not retained. After the prefill
// the cache holds the flagged tokens that already left the window; once the
// rest have left, exactly min(k, non-sink prompt tokens) per slot.
TEST(GateRuntime, BudgetKeepsTheHighestLogitPromptTokens) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  const auto tokens = prompt_tokens(L);
  constexpr int64_t kPrefix = 60, kBudget = 10;
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  GateModel gate = random_gate(*fp, GateKind::kAttention, 9);
  CpuForward fwd(*L->model, two_threads());
  auto layout = make_gate_layout(c, gate, true, kSink, kWindow);
  ASSERT_TRUE(layout.ok());
  // Thresholds low enough that, in threshold mode, decode would retain most
  // later tokens: budget mode must not.
  for (GateSlot& s : gate.slots) s.threshold = -1e3f;
  const int64_t n_slots = layout->blocks.n_slots();
  const cpu::Isa isa = fwd.options().isa;
  GateDecision decision;
  decision.retained_budget_tokens = kBudget;

  GatePrefill pf(gate, *layout, kPrefix, isa);
  KvCache dense(c, kPrefix);
  prefill_observed(fwd, std::span(tokens).first(kPrefix), &pf, dense);
  std::vector<uint8_t> flags;
  std::vector<fp16_t> rows;
  ASSERT_TRUE(pf.finish(decision, flags, rows).ok());
  std::vector<std::vector<int32_t>> chosen(static_cast<size_t>(n_slots));
  for (int64_t s = 0; s < n_slots; ++s) {
    const float* z = pf.logits().data() + s * kPrefix;
    std::vector<int32_t> order;
    for (int64_t t = kSink; t < kPrefix; ++t) order.push_back(static_cast<int32_t>(t));
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return z[a] > z[b]; });
    ASSERT_GT(z[order[kBudget - 1]], z[order[kBudget]]) << "a tie at the budget boundary, slot " << s;
    std::vector<int32_t> top(order.begin(), order.begin() + kBudget);
    std::sort(top.begin(), top.end());
    std::vector<int32_t> flagged;
    for (int64_t t = kSink; t < kPrefix; ++t) {
      if (flags[s * kPrefix + t]) flagged.push_back(static_cast<int32_t>(t));
    }
    EXPECT_EQ(flagged, top) << "slot " << s;
    chosen[s] = top;
  }

  auto pool = kvstore::PagePool::create(16 * c.head_dim * 2, 64 << 20);
  ASSERT_TRUE(pool.ok());
  auto cache = CompressedKvCache::build_from_dense(*layout, pool->get(), kPrefix, dense_view(dense, c),
                                                   flags, pf.dense_gate(rows));
  ASSERT_TRUE(cache.ok()) << cache.status().to_string();
  for (int64_t s = 0; s < n_slots; ++s) {
    const auto left = std::count_if(chosen[s].begin(), chosen[s].end(),
                                    [&](int32_t t) { return t < kPrefix - kWindow; });
    EXPECT_EQ(cache->retained_tokens(s), left) << "slot " << s;
  }

  // Decode past the window: the rest of the chosen tokens arrive, nothing
  // generated joins them.
  GateDecoder decoder(gate, *layout, isa);
  fwd.set_layer_observer(&decoder);
  for (int64_t t = kPrefix; t < kPrefix + kWindow + 4; ++t) {
    CompressedKvCache* caches[] = {&*cache};
    decoder.bind(caches, decision);
    const CompressedItem item{&*cache, tokens[t], {}, false};
    ASSERT_TRUE(fwd.forward_compressed(std::span(&item, 1), nullptr).ok());
    ASSERT_TRUE(decoder.status().ok()) << decoder.status().to_string();
  }
  fwd.set_layer_observer(nullptr);
  for (int64_t s = 0; s < n_slots; ++s) {
    ASSERT_EQ(cache->retained_tokens(s), kBudget) << "slot " << s;
    std::vector<int32_t> got;
    for (int64_t i = 0; i < kBudget; ++i) got.push_back(cache->retained_position(s, i));
    EXPECT_EQ(got, chosen[s]) << "slot " << s;
  }
}

// A budget larger than the prompt flags every non-sink prompt token.
TEST(GateRuntime, BudgetLargerThanThePromptFlagsEveryToken) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  const auto tokens = prompt_tokens(L);
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  GateModel gate = random_gate(*fp, GateKind::kLinear, 2);
  for (GateSlot& s : gate.slots) s.threshold = 1e3f;  // threshold mode would keep nothing
  auto layout = make_gate_layout(c, gate, true, kSink, kWindow);
  ASSERT_TRUE(layout.ok());
  CpuForward fwd(*L->model, two_threads());
  constexpr int64_t n = 40;
  GatePrefill pf(gate, *layout, n, fwd.options().isa);
  KvCache dense(c, n);
  prefill_observed(fwd, std::span(tokens).first(n), &pf, dense);
  std::vector<uint8_t> flags;
  std::vector<fp16_t> rows;
  GateDecision decision;
  decision.retained_budget_tokens = 1000;
  ASSERT_TRUE(pf.finish(decision, flags, rows).ok());
  EXPECT_EQ(std::count(flags.begin(), flags.end(), 1), static_cast<long>(flags.size()));
  ASSERT_TRUE(pf.finish(GateDecision{}, flags, rows).ok());
  EXPECT_EQ(std::count(flags.begin(), flags.end(), 1), layout->blocks.n_slots() * kSink);
}

}  // namespace
}  // namespace kvgate::engine
