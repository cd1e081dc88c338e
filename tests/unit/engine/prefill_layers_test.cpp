// CpuForward::prefill_layers: the layer-major, multi-sequence prefill of the
// prefill node. Every sequence of a batch must come out bit-identical to
// prefilling it alone with prefill() (logits, K/V, attention statistics,
// what a layer observer sees), and layer_done(l) must run exactly when
// layer l is final for every token and nothing of layer l + 1 exists yet.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "engine/model.h"
#include "test_model.h"

namespace kvgate::engine {
namespace {

std::vector<int32_t> random_tokens(int64_t n, uint32_t seed, int32_t vocab) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& t : out) t = d(rng);
  return out;
}

bool same_layer(const KvCache& a, const KvCache& b, const LlamaConfig& c, int64_t layer,
                int64_t n_tokens) {
  for (int64_t h = 0; h < c.n_kv_heads; ++h) {
    const size_t bytes = static_cast<size_t>(n_tokens * c.head_dim) * sizeof(fp16_t);
    if (std::memcmp(a.k(layer, h), b.k(layer, h), bytes) != 0) return false;
    if (std::memcmp(a.v(layer, h), b.v(layer, h), bytes) != 0) return false;
  }
  return true;
}

bool layer_untouched(const KvCache& a, const LlamaConfig& c, int64_t layer, int64_t n_tokens) {
  for (int64_t h = 0; h < c.n_kv_heads; ++h) {
    for (int64_t e = 0; e < n_tokens * c.head_dim; ++e) {
      if (a.k(layer, h)[e] != 0 || a.v(layer, h)[e] != 0) return false;
    }
  }
  return true;
}

// Records, per (layer, position), a checksum of the normalized input row.
class RowRecorder final : public LayerInputObserver {
 public:
  explicit RowRecorder(int64_t n_embd) : n_embd_(n_embd) {}
  void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                      std::span<const int64_t> row_pos, std::span<const int32_t> row_item) override {
    for (int64_t r = 0; r < n_rows; ++r) {
      if (row_item[r] != 0) ++foreign_rows;
      uint64_t h = 1469598103934665603ull;
      const auto* bytes = reinterpret_cast<const unsigned char*>(xn + r * n_embd_);
      for (size_t i = 0; i < static_cast<size_t>(n_embd_) * sizeof(float); ++i) {
        h = (h ^ bytes[i]) * 1099511628211ull;
      }
      const auto key = std::make_pair(layer, row_pos[r]);
      if (rows.count(key) != 0) ++duplicates;
      rows[key] = h;
      if (layer < last_layer) ++out_of_order;
      last_layer = layer;
    }
  }
  std::map<std::pair<int64_t, int64_t>, uint64_t> rows;
  int foreign_rows = 0, duplicates = 0, out_of_order = 0;
  int64_t last_layer = 0;

 private:
  int64_t n_embd_;
};

TEST(PrefillLayers, BatchOfThreeEqualsEachAloneBitForBit) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  ForwardOptions opt;
  opt.n_threads = 2;
  opt.max_batch_tokens = 96;  // steps mix sequences and cut them mid-prompt
  CpuForward forward(*L->model, opt);
  const std::vector<std::vector<int32_t>> prompts = {
      random_tokens(211, 1, static_cast<int32_t>(c.n_vocab)),
      random_tokens(37, 2, static_cast<int32_t>(c.n_vocab)),
      random_tokens(130, 3, static_cast<int32_t>(c.n_vocab))};

  std::vector<std::unique_ptr<KvCache>> alone, batched;
  std::vector<std::vector<float>> alone_logits, batched_logits;
  std::vector<std::unique_ptr<RowRecorder>> alone_rows, batched_rows;
  for (const auto& p : prompts) {
    const auto n = static_cast<int64_t>(p.size());
    alone.push_back(std::make_unique<KvCache>(c, n));
    alone_logits.emplace_back(static_cast<size_t>(c.n_vocab));
    alone_rows.push_back(std::make_unique<RowRecorder>(c.n_embd));
    LayerObserverScope scope(forward, alone_rows.back().get());
    ASSERT_TRUE(forward.prefill(*alone.back(), p, alone_logits.back().data()).ok());
  }

  std::vector<PrefillSequence> seqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    batched.push_back(std::make_unique<KvCache>(c, static_cast<int64_t>(prompts[i].size())));
    batched_logits.emplace_back(static_cast<size_t>(c.n_vocab), -1.0f);
    batched_rows.push_back(std::make_unique<RowRecorder>(c.n_embd));
    // The middle sequence asks for no logits.
    seqs.push_back(PrefillSequence{batched.back().get(), prompts[i], batched_rows.back().get(),
                                   nullptr, i == 1 ? nullptr : batched_logits.back().data()});
  }
  std::vector<int64_t> done;
  auto on_layer = [&](int64_t layer) -> Status {
    // Layer `layer` is final in every cache, the next one not started.
    for (size_t i = 0; i < prompts.size(); ++i) {
      const auto n = static_cast<int64_t>(prompts[i].size());
      EXPECT_TRUE(same_layer(*batched[i], *alone[i], c, layer, n)) << "seq " << i << " layer " << layer;
      if (layer + 1 < c.n_layers) {
        EXPECT_TRUE(layer_untouched(*batched[i], c, layer + 1, n)) << "seq " << i << " layer " << layer + 1;
      }
    }
    done.push_back(layer);
    return Status();
  };
  ASSERT_TRUE(forward.prefill_layers(seqs, on_layer).ok());

  ASSERT_EQ(done.size(), static_cast<size_t>(c.n_layers));
  for (int64_t l = 0; l < c.n_layers; ++l) EXPECT_EQ(done[l], l);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto n = static_cast<int64_t>(prompts[i].size());
    EXPECT_EQ(batched[i]->n_tokens(), n);
    for (int64_t l = 0; l < c.n_layers; ++l) {
      EXPECT_TRUE(same_layer(*batched[i], *alone[i], c, l, n)) << "seq " << i << " layer " << l;
    }
    if (i != 1) {
      EXPECT_EQ(std::memcmp(batched_logits[i].data(), alone_logits[i].data(),
                            alone_logits[i].size() * sizeof(float)),
                0)
          << "logits of seq " << i;
    } else {
      EXPECT_EQ(batched_logits[i][0], -1.0f) << "logits written for a sequence that asked for none";
    }
    // The sequence's observer saw exactly its own rows, layer by layer,
    // each once, with the same inputs as alone.
    EXPECT_EQ(batched_rows[i]->foreign_rows, 0);
    EXPECT_EQ(batched_rows[i]->duplicates, 0);
    EXPECT_EQ(batched_rows[i]->out_of_order, 0);
    EXPECT_EQ(batched_rows[i]->rows.size(), static_cast<size_t>(n * c.n_layers));
    EXPECT_TRUE(batched_rows[i]->rows == alone_rows[i]->rows) << "observer rows of seq " << i;
  }
}

// Tails of at most cpu::matmul_small_batch_tokens() tokens run on another
// matmul kernel in a prefill alone; the batch must give them that kernel
// too (and every other token the large one), or bits differ. Short
// prompts, tails of 1-4 tokens and a last step that would be tiny.
TEST(PrefillLayers, ShortPromptsAndTinyTailsEqualEachAlone) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  ForwardOptions opt;
  opt.n_threads = 2;
  opt.max_batch_tokens = 64;
  CpuForward forward(*L->model, opt);
  const std::vector<int64_t> lengths = {130, 33, 70, 3, 66, 2, 61, 1, 129};
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::unique_ptr<KvCache>> caches;
  std::vector<std::vector<float>> logits;
  std::vector<PrefillSequence> seqs;
  for (size_t i = 0; i < lengths.size(); ++i) {
    prompts.push_back(random_tokens(lengths[i], 40 + static_cast<uint32_t>(i), static_cast<int32_t>(c.n_vocab)));
  }
  for (size_t i = 0; i < lengths.size(); ++i) {
    caches.push_back(std::make_unique<KvCache>(c, lengths[i]));
    logits.emplace_back(static_cast<size_t>(c.n_vocab));
    seqs.push_back({caches.back().get(), prompts[i], nullptr, nullptr, logits.back().data()});
  }
  ASSERT_TRUE(forward.prefill_layers(seqs).ok());
  for (size_t i = 0; i < lengths.size(); ++i) {
    KvCache alone(c, lengths[i]);
    std::vector<float> alone_logits(static_cast<size_t>(c.n_vocab));
    ASSERT_TRUE(forward.prefill(alone, prompts[i], alone_logits.data()).ok());
    for (int64_t l = 0; l < c.n_layers; ++l) {
      ASSERT_TRUE(same_layer(alone, *caches[i], c, l, lengths[i])) << "seq " << i << " layer " << l;
    }
    EXPECT_EQ(alone_logits, logits[i]) << "seq " << i;
  }
}

TEST(PrefillLayers, StatisticsOfOneSequenceEqualPrefill) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  ForwardOptions opt;
  opt.n_threads = 2;
  opt.max_batch_tokens = 64;
  CpuForward forward(*L->model, opt);
  const auto p = random_tokens(150, 9, static_cast<int32_t>(c.n_vocab));
  const auto n = static_cast<int64_t>(p.size());
  auto make_stats = [&] {
    AttentionStats s;
    s.reset(c.n_layers, c.n_kv_heads, n, n - 16);
    s.enable_distant(32);
    return s;
  };
  AttentionStats a = make_stats(), b = make_stats();
  KvCache ca(c, n), cb(c, n);
  std::vector<float> la(static_cast<size_t>(c.n_vocab)), lb(static_cast<size_t>(c.n_vocab));
  ASSERT_TRUE(forward.prefill(ca, p, la.data(), &a).ok());
  PrefillSequence seq{&cb, p, nullptr, &b, lb.data()};
  ASSERT_TRUE(forward.prefill_layers(std::span(&seq, 1)).ok());
  EXPECT_EQ(la, lb);
  EXPECT_EQ(a.received, b.received);
  EXPECT_EQ(a.observed, b.observed);
  EXPECT_EQ(a.received_distant, b.received_distant);
  EXPECT_EQ(a.received_distant_max, b.received_distant_max);
  // And the statistics are real: prompt tokens received attention.
  double sum = 0.0;
  for (float v : b.received) sum += v;
  EXPECT_NEAR(sum, static_cast<double>(n * c.n_heads * c.n_layers), 1e-2 * sum);
}

TEST(PrefillLayers, LayerDoneErrorStopsThePrefill) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  ForwardOptions opt;
  opt.n_threads = 2;
  CpuForward forward(*L->model, opt);
  const auto p = random_tokens(20, 4, static_cast<int32_t>(c.n_vocab));
  KvCache cache(c, 20);
  PrefillSequence seq{&cache, p, nullptr, nullptr, nullptr};
  int calls = 0;
  Status s = forward.prefill_layers(std::span(&seq, 1), [&](int64_t layer) -> Status {
    ++calls;
    if (layer == 2) return Status(StatusCode::kCancelled, "stop at 2");
    return Status();
  });
  EXPECT_EQ(s.code(), StatusCode::kCancelled);
  EXPECT_EQ(s.message(), "stop at 2");
  EXPECT_EQ(calls, 3);
  EXPECT_TRUE(layer_untouched(cache, c, 3, 20));
}

TEST(PrefillLayers, RejectsBadSequences) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  ForwardOptions opt;
  opt.n_threads = 1;
  CpuForward forward(*L->model, opt);
  const std::vector<int32_t> ok_tokens = {1, 2, 3};
  const std::vector<int32_t> bad_tokens = {1, static_cast<int32_t>(c.n_vocab), 3};
  KvCache small(c, 2), big(c, 8), other(c, 8);
  EXPECT_EQ(forward.prefill_layers({}).code(), StatusCode::kInvalidArgument);
  {
    PrefillSequence s{&big, {}, nullptr, nullptr, nullptr};
    Status st = forward.prefill_layers(std::span(&s, 1));
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("empty"), std::string::npos) << st.message();
  }
  {
    PrefillSequence s{&big, bad_tokens, nullptr, nullptr, nullptr};
    Status st = forward.prefill_layers(std::span(&s, 1));
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("vocabulary"), std::string::npos) << st.message();
  }
  {
    PrefillSequence s{&small, ok_tokens, nullptr, nullptr, nullptr};
    EXPECT_EQ(forward.prefill_layers(std::span(&s, 1)).code(), StatusCode::kOutOfRange);
  }
  {
    PrefillSequence s{nullptr, ok_tokens, nullptr, nullptr, nullptr};
    EXPECT_EQ(forward.prefill_layers(std::span(&s, 1)).code(), StatusCode::kInvalidArgument);
  }
  {
    AttentionStats st;
    st.reset(c.n_layers, c.n_kv_heads, 3, 0);
    std::vector<PrefillSequence> two = {{&big, ok_tokens, nullptr, &st, nullptr},
                                        {&other, ok_tokens, nullptr, nullptr, nullptr}};
    Status s = forward.prefill_layers(two);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("one sequence"), std::string::npos) << s.message();
  }
  EXPECT_EQ(big.n_tokens(), 0);  // nothing ran
}

}  // namespace
}  // namespace kvgate::engine
