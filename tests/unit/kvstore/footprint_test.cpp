#include "kvstore/footprint.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kvstore/compressed_cache.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::kvstore {
namespace {

using testing::make_layout;

KvLayout smollm_layout(BlockMap map) {
  return make_layout(std::move(map), 64, 4, 64);
}

TEST(Footprint, DenseBytesIsTwoLHdbt) {
  EXPECT_EQ(dense_bytes(30, 3, 64, 2, 1000), 2 * 30 * 3 * 64 * 2 * 1000);
  KvLayout layout = smollm_layout(*BlockMap::dense(30, 3));
  EXPECT_EQ(dense_bytes(layout, 7), 2 * 30 * 3 * 64 * 2 * 7);
  EXPECT_EQ(dense_bytes(layout, 0), 0);
}

TEST(Footprint, FormulaByHand) {
  // 4 layers, 2 heads; head 0 blocks {0-1, 2-3}, head 1 {0, 1-3}; d = 8.
  auto map = BlockMap::create(4, {{{0, 2}, {2, 2}}, {{0, 1}, {1, 3}}});
  ASSERT_TRUE(map.ok());
  KvLayout layout = make_layout(*map, 8, 2, 3);
  // t = 10: P = 5, distant = 5. R per slot: 1, 2, 0, 5.
  std::vector<int64_t> r = {1, 2, 0, 5};
  auto f = footprint(layout, 10, r);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  // Σ 2gP = 2·5·(2+2+1+3) = 80; Σ (g+1)R = 3·1 + 3·2 + 2·0 + 4·5 = 29.
  EXPECT_EQ(f->kv_bytes, 2 * 8 * (80 + 29));
  EXPECT_EQ(f->position_bytes, 4 * 8);
  EXPECT_EQ(f->gate_bytes, 0);
  EXPECT_EQ(f->total_bytes(), 2 * 8 * 109 + 32);

  layout.gate_state_bytes_per_token = 6;
  f = footprint(layout, 10, r);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->gate_bytes, 6 * (4 * 5 + 8));  // Σ (P + R) over 4 slots
  EXPECT_EQ(layout.gate_row_elems(), 3);
  EXPECT_EQ(layout.retained_gate_bytes_per_token(), 6);
  // Gate context `window`: retained tokens keep no gate row, only Σ P.
  layout.gate_state_retained = false;
  f = footprint(layout, 10, r);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->gate_bytes, 6 * (4 * 5));
  EXPECT_EQ(f->kv_bytes, 2 * 8 * (80 + 29));  // K/V and positions unchanged
  EXPECT_EQ(f->position_bytes, 4 * 8);
  EXPECT_EQ(layout.retained_gate_bytes_per_token(), 0);
  layout.gate_state_retained = true;

  // Gate rows are fp16: an odd byte count is not a row.
  layout.gate_state_bytes_per_token = 3;
  f = footprint(layout, 10, r);
  EXPECT_EQ(f.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(f.status().message().find("gate_state_bytes_per_token"), std::string::npos);
}

TEST(Footprint, RejectsBadCounts) {
  KvLayout layout = make_layout(*BlockMap::uniform(4, 2, 2), 8, 2, 3);  // 4 slots
  EXPECT_EQ(footprint(layout, 10, std::vector<int64_t>(3, 0)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_FALSE(footprint(layout, 10, std::vector<int64_t>{0, 0, 0, 6}).ok());  // > 5 distant
  EXPECT_FALSE(footprint(layout, 10, std::vector<int64_t>{0, -1, 0, 0}).ok());
  EXPECT_FALSE(footprint(layout, -1, std::vector<int64_t>(4, 0)).ok());
  EXPECT_TRUE(footprint(layout, 3, std::vector<int64_t>(4, 0)).ok());
}

TEST(Footprint, KeepRateRoundsUpButNotBinaryNoise) {
  EXPECT_EQ(retained_for_keep_rate(0.3, 10), 3);
  EXPECT_EQ(retained_for_keep_rate(0.31, 10), 4);
  EXPECT_EQ(retained_for_keep_rate(0.0, 10), 0);
  EXPECT_EQ(retained_for_keep_rate(1.0, 12345), 12345);
  EXPECT_EQ(retained_for_keep_rate(0.5, 0), 0);
  EXPECT_EQ(retained_for_keep_rate(0.001, 1), 1);
}

TEST(Footprint, PredictorKeepRateOneDenseMapIsDenseBytesPlusPositions) {
  KvLayout layout = smollm_layout(*BlockMap::dense(30, 3));
  for (int64_t prompt : {0, 1, 4, 60, 68, 69, 500, 4000}) {
    for (int64_t gen : {0, 1, 100}) {
      const int64_t t = prompt + gen;
      auto f = predict_footprint(layout, prompt, gen, 1.0);
      ASSERT_TRUE(f.ok());
      // K and V of every token: exactly dense. Retained tokens also carry
      // their position (4 bytes per token per slot), which dense does not.
      EXPECT_EQ(f->kv_bytes, dense_bytes(layout, t)) << t;
      EXPECT_EQ(f->position_bytes, 4 * 90 * layout.distant_tokens(t));
      if (t <= 68) {
        EXPECT_EQ(*predict_bytes(layout, prompt, gen, 1.0), dense_bytes(layout, t));
      }
    }
  }
}

TEST(Footprint, PredictorKeepRateUsesFinalLength) {
  KvLayout layout = smollm_layout(*BlockMap::uniform(30, 3, 5));  // 18 slots of g = 5
  auto f = predict_footprint(layout, 900, 100, 0.25);
  ASSERT_TRUE(f.ok());
  const int64_t p = 68, r = 233;  // ceil(0.25 · 932)
  EXPECT_EQ(f->kv_bytes, 2 * 64 * 18 * (2 * 5 * p + 6 * r));
  EXPECT_EQ(f->position_bytes, 4 * 18 * r);
  EXPECT_FALSE(predict_bytes(layout, 10, 10, 1.5).ok());
  EXPECT_FALSE(predict_bytes(layout, 10, 10, -0.1).ok());
  EXPECT_FALSE(predict_bytes(layout, 10, 10, std::nan("")).ok());
  EXPECT_FALSE(predict_bytes(layout, -1, 10, 0.5).ok());
}

TEST(Footprint, PredictorBudgetEqualsCacheWithExactlyThatManyRetained) {
  std::mt19937 rng(11);
  auto map = testing::random_block_map(6, 2, rng);
  KvLayout layout = make_layout(map, 16, 3, 5);
  auto pool = PagePool::create(128, 1 << 22);  // 4 tokens per page
  ASSERT_TRUE(pool.ok());
  const int64_t prompt = 40, gen = 9, t = prompt + gen;
  const int64_t distant = layout.distant_tokens(t);  // 41
  const int64_t n_slots = map.n_slots();
  std::vector<int64_t> budget(n_slots);
  for (int64_t s = 0; s < n_slots; ++s) budget[s] = (s * 7) % (distant + 1);
  budget[0] = distant + 10;  // more than exist: clamps to the distant count

  // Flags with exactly min(budget, distant) ones among the distant tokens.
  testing::History hist(layout, t, 0.0, rng);
  for (int64_t s = 0; s < n_slots; ++s) {
    std::vector<int64_t> js;
    for (int64_t j = layout.n_sink_tokens; j < t - layout.n_window_tokens; ++j) js.push_back(j);
    std::shuffle(js.begin(), js.end(), rng);
    for (int64_t i = 0; i < std::min(budget[s], distant); ++i) hist.flags[s * t + js[i]] = 1;
  }
  auto cache = CompressedKvCache::build_from_dense(layout, pool->get(), t, hist.dense(),
                                                   hist.prefix_flags(t));
  ASSERT_TRUE(cache.ok()) << cache.status().to_string();
  for (int64_t s = 0; s < n_slots; ++s) {
    EXPECT_EQ(cache->retained_tokens(s), std::min(budget[s], distant));
  }
  auto predicted = predict_bytes(layout, prompt, gen, budget);
  ASSERT_TRUE(predicted.ok()) << predicted.status().to_string();
  EXPECT_EQ(*predicted, cache->bytes());

  std::vector<int64_t> negative = budget;
  negative[1] = -1;
  EXPECT_FALSE(predict_bytes(layout, prompt, gen, negative).ok());
  EXPECT_FALSE(predict_bytes(layout, prompt, gen, std::vector<int64_t>(n_slots + 1, 0)).ok());
}

TEST(Footprint, PageGeometryAndCapacityByHand) {
  // 4 layers, 2 heads; head 0 blocks {0-1, 2-3}, head 1 {0, 1-3}; d = 8,
  // 2 sinks, window 3, gate rows of 16 bytes; pages of 64 bytes: 4 K/V
  // rows, 16 positions, 4 gate rows.
  auto map = BlockMap::create(4, {{{0, 2}, {2, 2}}, {{0, 1}, {1, 3}}});
  ASSERT_TRUE(map.ok());
  const KvLayout layout = make_layout(*map, 8, 2, 3, 16);
  auto geo = page_geometry(layout, 64);
  ASSERT_TRUE(geo.ok()) << geo.status().to_string();
  EXPECT_EQ(geo->page_tokens, 4);
  EXPECT_EQ(geo->positions_per_page, 16);
  EXPECT_EQ(geo->gate_rows_per_page, 4);
  // t = 40: P = 5 -> 2 pages per ring (16 rings) and per gate ring (4);
  // R = {0, 5, 17, 4}: K/V pages ceil(R/4)·(1+g), positions ceil(R/16),
  // gate rows ceil(R/4).
  const std::vector<int64_t> r = {0, 5, 17, 4};
  const int64_t want = 2 * 16 + 2 * 4 + (0) + (2 * 3 + 1 + 2) + (5 * 2 + 2 + 5) + (1 * 4 + 1 + 1);
  EXPECT_EQ(*state_pages(layout, 64, 40, r), want);
  EXPECT_EQ(*state_capacity_bytes(layout, 64, 40, r), want * 64);
  EXPECT_EQ(*state_pages(layout, 64, 0, std::vector<int64_t>(4, 0)), 0);
  EXPECT_EQ(geo->retained_gate_rows_per_page, 4);
  // Without gate rows of retained tokens: the same minus ceil(R/4) gate
  // pages per slot (0 + 2 + 5 + 1); the gate rings stay.
  KvLayout window_ctx = layout;
  window_ctx.gate_state_retained = false;
  auto geo_w = page_geometry(window_ctx, 64);
  ASSERT_TRUE(geo_w.ok());
  EXPECT_EQ(geo_w->gate_rows_per_page, 4);
  EXPECT_EQ(geo_w->retained_gate_rows_per_page, 0);
  EXPECT_EQ(geo_w->retained_pages(17, 2), 5 * 3 + 2);
  EXPECT_EQ(*state_pages(window_ctx, 64, 40, r), want - (0 + 2 + 5 + 1));
  // Errors: page sizes that do not cut into whole rows, bad counts.
  EXPECT_EQ(page_geometry(layout, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(page_geometry(layout, 24).status().code(), StatusCode::kInvalidArgument);  // K/V: 16
  KvLayout gate24 = layout;
  gate24.gate_state_bytes_per_token = 24;
  EXPECT_EQ(page_geometry(gate24, 64).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(page_geometry(gate24, 192).ok());
  EXPECT_FALSE(state_pages(layout, 64, 40, std::vector<int64_t>{0, 5, 36, 4}).ok());  // > distant
  EXPECT_FALSE(state_pages(layout, 64, 40, std::vector<int64_t>{0, 5}).ok());
  EXPECT_FALSE(predict_capacity_bytes(layout, 64, 10, 10, 1.5).ok());
  EXPECT_FALSE(predict_capacity_bytes(layout, 100, 10, 10, 0.5).ok());
  EXPECT_FALSE(predict_capacity_bytes(layout, 64, 10, 10, std::vector<int64_t>{1, 2}).ok());
}

// predict_capacity_bytes against real caches: random ragged layouts, page
// sizes, gate state with and without gate rows of retained tokens, flag
// patterns and lengths; a prompt built in one pass,
// then max_new appends. At the end the cache's capacity_bytes() equals the
// budget form for its own retained counts and the keep-rate form when every
// slot kept exactly retained_for_keep_rate() tokens; at every length before
// it is at most the final prediction (pages are never freed while a cache
// lives), and equals state_capacity_bytes() of its state.
TEST(Footprint, CapacityPredictionEqualsRealCachePages) {
  std::mt19937 rng(31);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int iter = 0; iter < 60; ++iter) {
    const int64_t head_dim = int64_t{4} << pick(0, 2);
    const int64_t page_bytes = 64 << pick(0, 2);
    const int64_t gate_bytes = pick(0, 1) ? 0 : (int64_t{8} << pick(0, 3));
    const bool gate_retained = iter % 2 == 0;  // gate context `cache` or `window`
    const KvLayout layout = make_layout(testing::random_block_map(pick(1, 6), pick(1, 3), rng),
                                        head_dim, pick(0, 4), pick(1, 9), gate_bytes,
                                        gate_retained);
    const int64_t prompt = pick(0, 80);
    const int64_t max_new = pick(0, 30);
    const int64_t t = prompt + max_new;
    const double keep_rates[] = {0.0, 0.25, 0.3, 0.5, 1.0};
    const double rate = keep_rates[pick(0, 4)];
    SCOPED_TRACE("iter " + std::to_string(iter) + " " + layout.blocks.to_string() + " prompt " +
                 std::to_string(prompt) + " new " + std::to_string(max_new) + " rate " +
                 std::to_string(rate) + " gate " + std::to_string(gate_bytes) +
                 (gate_retained ? "" : " (not retained)"));
    // Flags: each slot keeps exactly retained_for_keep_rate(rate, distant)
    // of the tokens that are distant at t (random ones); tokens still in
    // the window at t get random flags (pending, never applied).
    testing::History hist(layout, t, 0.5, rng);
    const int64_t n_slots = layout.blocks.n_slots();
    const int64_t distant = layout.distant_tokens(t);
    const int64_t keep = retained_for_keep_rate(rate, distant);
    for (int64_t s = 0; s < n_slots; ++s) {
      std::vector<int64_t> js;
      for (int64_t j = layout.n_sink_tokens; j < layout.n_sink_tokens + distant; ++j) {
        js.push_back(j);
      }
      std::shuffle(js.begin(), js.end(), rng);
      for (size_t i = 0; i < js.size(); ++i) {
        hist.flags[s * t + js[i]] = static_cast<int64_t>(i) < keep ? 1 : 0;
      }
    }
    auto pool = PagePool::create(page_bytes, int64_t{1} << 24);
    ASSERT_TRUE(pool.ok());
    auto built = CompressedKvCache::build_from_dense(layout, pool->get(), prompt, hist.dense(),
                                                     hist.prefix_flags(prompt), hist.dense_gate());
    ASSERT_TRUE(built.ok()) << built.status().to_string();
    CompressedKvCache& cache = *built;
    std::vector<int64_t> capacities = {cache.capacity_bytes()};
    for (int64_t j = prompt; j < t; ++j) {
      ASSERT_TRUE(cache.append(j, hist.token(j), hist.token_flags(j)).ok());
      capacities.push_back(cache.capacity_bytes());
      std::vector<int64_t> r(n_slots);
      for (int64_t s = 0; s < n_slots; ++s) r[s] = cache.retained_tokens(s);
      ASSERT_EQ(*state_capacity_bytes(layout, page_bytes, j + 1, r), cache.capacity_bytes());
      ASSERT_EQ(cache.capacity_bytes(), (*pool)->used_bytes());
    }
    std::vector<int64_t> r(n_slots);
    for (int64_t s = 0; s < n_slots; ++s) {
      r[s] = cache.retained_tokens(s);
      ASSERT_EQ(r[s], keep);
    }
    auto by_rate = predict_capacity_bytes(layout, page_bytes, prompt, max_new, rate);
    ASSERT_TRUE(by_rate.ok()) << by_rate.status().to_string();
    EXPECT_EQ(*by_rate, cache.capacity_bytes());
    auto by_budget = predict_capacity_bytes(layout, page_bytes, prompt, max_new, r);
    ASSERT_TRUE(by_budget.ok());
    EXPECT_EQ(*by_budget, cache.capacity_bytes());
    // A budget past the distant count clamps, as predict_bytes does.
    std::vector<int64_t> big(n_slots, distant + 5);
    EXPECT_EQ(*predict_capacity_bytes(layout, page_bytes, prompt, max_new, big),
              *state_capacity_bytes(layout, page_bytes, t, std::vector<int64_t>(n_slots, distant)));
    for (int64_t c : capacities) EXPECT_LE(c, *by_rate);
    // Page-granular: at least the exact bytes, which equal the cache's.
    EXPECT_GE(*by_rate, *predict_bytes(layout, prompt, max_new, rate));
    EXPECT_EQ(*predict_bytes(layout, prompt, max_new, rate), cache.bytes());
    EXPECT_EQ(cache.bytes(), testing::formula_bytes(layout, hist, t));
  }
}

}  // namespace
}  // namespace kvgate::kvstore
