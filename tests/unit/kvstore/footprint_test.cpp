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

}  // namespace
}  // namespace kvgate::kvstore
