// max_append_pages (engine/batch_decode.h): the pages a decode step may
// take. With every flag 1 the bound is exact — every step takes exactly
// that many — for gates that keep state for retained tokens and for those
// whose context is the window (which take no retained gate pages: counting
// them would refuse requests for "pool full" with pages to spare).
#include <gtest/gtest.h>

#include <random>

#include "engine/batch_decode.h"
#include "kvstore/compressed_cache.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::engine {
namespace {

using kvstore::CompressedKvCache;
using kvstore::testing::History;
using kvstore::testing::make_layout;
using kvstore::testing::make_pool;
using kvstore::testing::random_block_map;

class MaxAppendPages : public ::testing::TestWithParam<bool> {};

TEST_P(MaxAppendPages, ExactWhenEveryTokenIsKept) {
  const bool retained_gate_rows = GetParam();
  std::mt19937 rng(21);
  for (int trial = 0; trial < 6; ++trial) {
    // Gate rows of 32 bytes: 2 per 64-byte page; with 8-element rows of
    // fp16 a K/V page holds 4 tokens, so gate and K/V pages round apart.
    auto layout = make_layout(random_block_map(4, 2, rng), 8, 2, 5, trial % 2 == 0 ? 32 : 16,
                              retained_gate_rows);
    const int64_t n_tokens = 40;
    History hist(layout, n_tokens, 1.0, rng);
    auto pool = make_pool(64, 1 << 22);
    auto cache = CompressedKvCache::create(layout, pool.get());
    ASSERT_TRUE(cache.ok());
    for (int64_t t = 0; t < n_tokens; ++t) {
      const int64_t bound = max_append_pages(*cache);
      const int64_t before = pool->used_pages();
      ASSERT_TRUE(cache->append(t, hist.token(t), hist.token_flags(t)).ok());
      EXPECT_EQ(pool->used_pages() - before, bound) << "trial " << trial << " t=" << t;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(RetainedGateRows, MaxAppendPages, ::testing::Bool());

}  // namespace
}  // namespace kvgate::engine
