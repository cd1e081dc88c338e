#include "kvstore/attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "engine/cpu/isa.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::kvstore {
namespace {

using engine::fp16_to_fp32;
using engine::fp32_to_fp16;
using engine::cpu::Isa;
using testing::Entry;
using testing::History;
using testing::make_layout;
using testing::random_block_map;
using testing::rule_table_set;

// Tolerance: the reference reads the very same fp16 K/V values and the same
// fp16-rounded query, computes in double, and rounds each normalized
// probability to fp16 before it meets V, as attend() and the dense engine
// do. What differs is fp32 arithmetic in the kernel (~6e-8 relative per
// step) — and, rarely, a probability within that distance of an fp16
// rounding midpoint that rounds the other way: one such flip moves an output
// by one fp16 ulp of p times |v| <= 2^-11 * p (values in [-1, 1]). 5e-4
// allows a flip of any p <= 1 while a wrong key or value (errors ~1e-2)
// still fails by 20x. Bit-exactness against the dense engine itself is
// checked in tests/unit/engine/compressed_forward_test.cpp.
constexpr double kTol = 5e-4;

// softmax(q·k / sqrt(d)) · v over `set`, in double, queries rounded to fp16
// first. Entries for which is_distant(pos) are scored with q_base (the base
// layer's query: PoD score sharing), the others with q.
template <typename DistantFn>
std::vector<double> reference(const std::vector<Entry>& set, const float* q, const float* q_base,
                              int64_t d, DistantFn is_distant) {
  std::vector<double> qd(d), qbd(d);
  for (int64_t e = 0; e < d; ++e) qd[e] = fp16_to_fp32(fp32_to_fp16(q[e]));
  for (int64_t e = 0; e < d; ++e) qbd[e] = fp16_to_fp32(fp32_to_fp16(q_base[e]));
  std::vector<double> scores;
  double m = -INFINITY;
  for (const auto& [pos, k, v] : set) {
    const std::vector<double>& qq = is_distant(pos) ? qbd : qd;
    double s = 0;
    for (int64_t e = 0; e < d; ++e) s += qq[e] * fp16_to_fp32(k[e]);
    s /= std::sqrt(static_cast<double>(d));
    scores.push_back(s);
    m = std::max(m, s);
  }
  std::vector<double> out(d, 0.0);
  double sum = 0;
  for (size_t j = 0; j < set.size(); ++j) sum += std::exp(scores[j] - m);
  for (size_t j = 0; j < set.size(); ++j) {
    const double p = fp16_to_fp32(fp32_to_fp16(static_cast<float>(std::exp(scores[j] - m) / sum)));
    const auto& v = std::get<2>(set[j]);
    for (int64_t e = 0; e < d; ++e) out[e] += p * fp16_to_fp32(v[e]);
  }
  return out;
}

std::vector<double> reference(const std::vector<Entry>& set, const float* q, int64_t d) {
  return reference(set, q, q, d, [](int64_t) { return false; });
}

std::vector<Isa> isas() {
  std::vector<Isa> out = {Isa::kScalar};
  if (engine::cpu::best_isa() != Isa::kScalar) out.push_back(engine::cpu::best_isa());
  return out;
}

// Compares attend() with the reference over rule_table_set() for every
// layer and query head at length t.
void expect_matches_rule_table(const CompressedKvCache& cache, const History& hist, int64_t t,
                               int64_t n_q_heads, std::mt19937& rng) {
  const KvLayout& layout = cache.layout();
  const int64_t d = layout.head_dim;
  const int64_t group = n_q_heads / layout.n_kv_heads();
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);  // wide enough for peaked softmax
  std::vector<float> q(d), q_base(d), out(d);
  const auto is_distant = [&](int64_t j) {
    return !(j < layout.n_sink_tokens || j >= t - layout.n_window_tokens);
  };
  for (Isa isa : isas()) {
    for (int64_t l = 0; l < layout.n_layers(); ++l) {
      for (int64_t qh = 0; qh < n_q_heads; ++qh) {
        for (auto& x : q) x = u(rng);
        for (auto& x : q_base) x = u(rng);
        ASSERT_TRUE(attend(cache, l, qh, n_q_heads, q.data(), q_base.data(), out.data(), isa).ok());
        const auto ref = reference(rule_table_set(layout, hist, t, l, qh / group), q.data(),
                                   q_base.data(), d, is_distant);
        for (int64_t e = 0; e < d; ++e) {
          ASSERT_NEAR(out[e], ref[e], kTol) << "t=" << t << " l=" << l << " qh=" << qh << " e=" << e
                                            << " isa=" << engine::cpu::isa_name(isa);
        }
      }
    }
  }
}

// The dense set: every token's own-layer K and V.
std::vector<Entry> dense_set(const History& hist, int64_t t, int64_t l, int64_t h) {
  const int64_t d = hist.head_dim;
  std::vector<Entry> out;
  for (int64_t j = 0; j < t; ++j) {
    out.emplace_back(j, std::vector<fp16_t>(hist.k_row(j, l, h), hist.k_row(j, l, h) + d),
                     std::vector<fp16_t>(hist.v_row(j, l, h), hist.v_row(j, l, h) + d));
  }
  return out;
}

void expect_dense(const CompressedKvCache& cache, const History& hist, int64_t t, int64_t n_q_heads,
                  std::mt19937& rng) {
  const KvLayout& layout = cache.layout();
  const int64_t d = layout.head_dim;
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> q(n_q_heads * d), out(n_q_heads * d);
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    for (auto& x : q) x = u(rng);
    // With one-layer blocks the base query is the layer's own.
    ASSERT_TRUE(attend_layer(cache, l, n_q_heads, q.data(), q.data(), out.data(),
                             engine::cpu::best_isa())
                    .ok());
    for (int64_t qh = 0; qh < n_q_heads; ++qh) {
      const int64_t h = qh / (n_q_heads / layout.n_kv_heads());
      const auto ref = reference(dense_set(hist, t, l, h), q.data() + qh * d, d);
      for (int64_t e = 0; e < d; ++e) {
        ASSERT_NEAR(out[qh * d + e], ref[e], kTol) << "t=" << t << " l=" << l << " qh=" << qh;
      }
    }
  }
}

std::unique_ptr<PagePool> make_pool(int64_t page_bytes) {
  return std::move(PagePool::create(page_bytes, int64_t{1} << 26)).value();
}

// (a) No distant tokens yet: whatever the blocks and flags, it is dense.
TEST(CompressedAttention, ShortSequenceIsDense) {
  std::mt19937 rng(21);
  KvLayout layout = make_layout(random_block_map(30, 3, rng), 64, 4, 64);  // SmolLM2 shape
  History hist(layout, 68, 0.3, rng);
  auto pool = make_pool(16 * 128);
  auto cache = CompressedKvCache::create(layout, pool.get());
  ASSERT_TRUE(cache.ok());
  for (int64_t t = 1; t <= 68; ++t) {
    ASSERT_TRUE(cache->append(t - 1, hist.token(t - 1), hist.token_flags(t - 1)).ok());
    if (t == 1 || t == 5 || t == 33 || t == 68) expect_dense(*cache, hist, t, 9, rng);
  }
}

// (b) Blocks of one layer and every flag 1: dense at every length.
TEST(CompressedAttention, DenseMapAllFlagsIsDense) {
  std::mt19937 rng(22);
  KvLayout layout = make_layout(*BlockMap::dense(4, 3), 64, 4, 16);
  History hist(layout, 300, 1.0, rng);
  auto pool = make_pool(16 * 128);
  auto cache = CompressedKvCache::build_from_dense(layout, pool.get(), 250, hist.dense(),
                                                   hist.prefix_flags(250));
  ASSERT_TRUE(cache.ok());
  expect_dense(*cache, hist, 250, 9, rng);
  for (int64_t t = 250; t < 300; ++t) {
    ASSERT_TRUE(cache->append(t, hist.token(t), hist.token_flags(t)).ok());
  }
  expect_dense(*cache, hist, 300, 9, rng);
}

// Random flags, ragged blocks: equals the reference over the set built from
// the full history by DESIGN.md §4's table.
TEST(CompressedAttention, RandomRaggedMatchesRuleTable) {
  std::mt19937 rng(23);
  struct Case {
    int64_t n_layers, n_heads, n_q_heads, head_dim, n_sink, n_window, page_tokens, n_tokens;
    double keep;
  };
  const Case cases[] = {
      {6, 3, 9, 64, 4, 16, 8, 200, 0.5},
      {5, 2, 2, 32, 0, 3, 4, 120, 0.2},
      {4, 1, 4, 16, 2, 1, 1, 60, 0.8},
      {30, 3, 9, 64, 4, 64, 16, 700, 0.3},
  };
  for (const Case& c : cases) {
    KvLayout layout =
        make_layout(random_block_map(c.n_layers, c.n_heads, rng), c.head_dim, c.n_sink, c.n_window);
    History hist(layout, c.n_tokens, c.keep, rng);
    auto pool =
        make_pool(c.page_tokens * 2 * c.head_dim < 64 ? 64 : c.page_tokens * 2 * c.head_dim);
    const int64_t prompt = c.n_tokens * 2 / 3;
    auto cache = CompressedKvCache::build_from_dense(layout, pool.get(), prompt, hist.dense(),
                                                     hist.prefix_flags(prompt));
    ASSERT_TRUE(cache.ok()) << cache.status().to_string();
    expect_matches_rule_table(*cache, hist, prompt, c.n_q_heads, rng);
    for (int64_t t = prompt; t < c.n_tokens; ++t) {
      ASSERT_TRUE(cache->append(t, hist.token(t), hist.token_flags(t)).ok());
    }
    expect_matches_rule_table(*cache, hist, c.n_tokens, c.n_q_heads, rng);
  }
}

// The kernels alone: two partials merged equal one partial over all rows,
// with either side empty too.
TEST(CompressedAttention, PartialsMergeByLogSumExp) {
  std::mt19937 rng(24);
  const int64_t d = 32, n = 150, stride = 40;  // row stride wider than d
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  std::vector<fp16_t> k(n * stride), v(n * stride);
  for (auto& x : k) x = fp32_to_fp16(u(rng));
  for (auto& x : v) x = fp32_to_fp16(u(rng));
  std::vector<float> q(d);
  for (auto& x : q) x = fp16_to_fp32(fp32_to_fp16(u(rng)));
  const float scale = 1.0f / std::sqrt(float(d));
  const Isa isa = engine::cpu::best_isa();

  std::vector<float> all(d), out_all(d);
  PartialAttention whole =
      partial_attention(k.data(), v.data(), n, stride, q.data(), d, scale, all.data(), isa);
  finish_partial(whole, all.data(), out_all.data(), d);
  for (int64_t split : {int64_t{0}, int64_t{1}, int64_t{64}, int64_t{77}, n}) {
    std::vector<float> a(d), b(d), out(d);
    PartialAttention pa =
        partial_attention(k.data(), v.data(), split, stride, q.data(), d, scale, a.data(), isa);
    PartialAttention pb = partial_attention(k.data() + split * stride, v.data() + split * stride,
                                            n - split, stride, q.data(), d, scale, b.data(), isa);
    merge_partial(pa, a.data(), pb, b.data(), d);
    finish_partial(pa, a.data(), out.data(), d);
    for (int64_t e = 0; e < d; ++e) EXPECT_NEAR(out[e], out_all[e], 1e-5) << split;
  }
  std::vector<float> none(d);
  PartialAttention empty =
      partial_attention(k.data(), v.data(), 0, stride, q.data(), d, scale, none.data(), isa);
  EXPECT_EQ(empty.sum_exp, 0.0f);
  EXPECT_TRUE(std::isinf(empty.max_score) && empty.max_score < 0);
}

TEST(CompressedAttention, BadInputsAreErrors) {
  std::mt19937 rng(25);
  KvLayout layout = make_layout(*BlockMap::uniform(4, 3, 2), 16, 2, 4);
  History hist(layout, 10, 0.5, rng);
  auto pool = make_pool(64);
  auto cache = CompressedKvCache::create(layout, pool.get());
  ASSERT_TRUE(cache.ok());
  std::vector<float> q(16, 0.5f), out(16);
  const Isa isa = Isa::kScalar;
  EXPECT_EQ(attend(*cache, 0, 0, 9, q.data(), q.data(), out.data(), isa).code(),
            StatusCode::kFailedPrecondition);  // empty cache
  ASSERT_TRUE(cache->append(0, hist.token(0), hist.token_flags(0)).ok());
  EXPECT_TRUE(attend(*cache, 0, 0, 9, q.data(), q.data(), out.data(), isa).ok());
  EXPECT_EQ(attend(*cache, 4, 0, 9, q.data(), q.data(), out.data(), isa).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(attend(*cache, -1, 0, 9, q.data(), q.data(), out.data(), isa).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(attend(*cache, 0, 9, 9, q.data(), q.data(), out.data(), isa).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(attend(*cache, 0, 0, 8, q.data(), q.data(), out.data(), isa).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(attend(*cache, 0, 0, 0, q.data(), q.data(), out.data(), isa).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::kvstore
