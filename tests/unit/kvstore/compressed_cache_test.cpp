#include "kvstore/compressed_cache.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "kvstore/footprint.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::kvstore {
namespace {

using testing::cache_gate_set;
using testing::cache_set;
using testing::formula_bytes;
using testing::gate_model_set;
using testing::History;
using testing::make_layout;
using testing::make_pool;
using testing::random_block_map;
using testing::retained_counts;
using testing::rule_table_set;

struct Shape {
  int64_t n_layers, n_heads, head_dim, n_sink, n_window, page_tokens, n_tokens;
  int64_t gate_bytes;  // the gate-state variant's row size (also run with 0)
};

// bytes() equals the formula (computed here from the flags, independently
// of the cache) at every length, for random flags and ragged blocks, with
// and without gate state; the pool's used bytes equal the cache's pages,
// and all come back at the end.
TEST(CompressedKvCache, BytesEqualFormulaAtEveryLength) {
  const Shape shapes[] = {
      {5, 3, 8, 4, 8, 4, 120, 8},       // small, many page boundaries; 8 gate rows a page
      {3, 2, 32, 0, 1, 1, 40, 16},      // no sinks, window of one, one-token pages
      {4, 1, 8, 3, 5, 64, 90, 1024},    // pages larger than the ring; one gate row a page
      {30, 3, 64, 4, 64, 16, 1000, 64}  // SmolLM2-135M shape, gate h'·d' = 16
  };
  std::mt19937 rng(1);
  for (const Shape& sh : shapes) {
    for (const int64_t gate_bytes : {int64_t{0}, sh.gate_bytes}) {
      for (double keep : {0.0, 0.3, 1.0}) {
        KvLayout layout = make_layout(random_block_map(sh.n_layers, sh.n_heads, rng), sh.head_dim,
                                      sh.n_sink, sh.n_window, gate_bytes);
        History hist(layout, sh.n_tokens, keep, rng);
        auto pool = make_pool(sh.page_tokens * 2 * sh.head_dim, int64_t{1} << 26);
        {
          auto cache = CompressedKvCache::create(layout, pool.get());
          ASSERT_TRUE(cache.ok()) << cache.status().to_string();
          EXPECT_EQ(cache->bytes(), 0);
          EXPECT_EQ(cache->capacity_bytes(), 0);
          for (int64_t j = 0; j < sh.n_tokens; ++j) {
            ASSERT_TRUE(cache->append(j, hist.token(j), hist.token_flags(j)).ok());
            const int64_t t = j + 1;
            ASSERT_EQ(cache->bytes(), formula_bytes(layout, hist, t))
                << "t=" << t << " keep=" << keep << " gate=" << gate_bytes << " map:\n"
                << layout.blocks.to_string();
            auto f = footprint(layout, t, retained_counts(*cache));
            ASSERT_TRUE(f.ok());
            ASSERT_EQ(*f, cache->footprint());
            ASSERT_GE(cache->capacity_bytes(), cache->bytes());
            ASSERT_EQ(pool->used_bytes(), cache->capacity_bytes());
            ASSERT_LE(pool->used_bytes(), pool->capacity_bytes());
          }
        }
        EXPECT_EQ(pool->used_bytes(), 0);
      }
    }
  }
}

// The cache holds exactly the (position, K, V) sets of DESIGN.md §4's table
// for every (layer, head) at the interesting lengths.
TEST(CompressedKvCache, ContentsFollowTheRuleTable) {
  std::mt19937 rng(2);
  KvLayout layout = make_layout(random_block_map(6, 3, rng), 8, 3, 7);
  History hist(layout, 60, 0.5, rng);
  auto pool = make_pool(64, 1 << 22);
  auto cache = CompressedKvCache::create(layout, pool.get());
  ASSERT_TRUE(cache.ok());
  const std::set<int64_t> check = {1, 2, 3, 4, 9, 10, 11, 17, 18, 19, 60};
  for (int64_t j = 0; j < 60; ++j) {
    ASSERT_TRUE(cache->append(j, hist.token(j), hist.token_flags(j)).ok());
    if (!check.count(j + 1)) continue;
    for (int64_t l = 0; l < 6; ++l) {
      for (int64_t h = 0; h < 3; ++h) {
        ASSERT_EQ(cache_set(*cache, l, h), rule_table_set(layout, hist, j + 1, l, h))
            << "t=" << j + 1 << " l=" << l << " h=" << h;
      }
    }
  }
}

TEST(CompressedKvCache, DenseMapAllFlagsHoldsEveryTokensOwnKv) {
  std::mt19937 rng(3);
  KvLayout layout = make_layout(*BlockMap::dense(4, 2), 16, 2, 5);
  History hist(layout, 50, 1.0, rng);
  auto pool = make_pool(128, 1 << 22);
  auto cache = CompressedKvCache::build_from_dense(layout, pool.get(), 50, hist.dense(),
                                                   hist.prefix_flags(50));
  ASSERT_TRUE(cache.ok());
  for (int64_t l = 0; l < 4; ++l) {
    for (int64_t h = 0; h < 2; ++h) {
      auto got = cache_set(*cache, l, h);
      ASSERT_EQ(got.size(), 50u);
      for (int64_t j = 0; j < 50; ++j) {
        const auto& [pos, k, v] = got[j];
        EXPECT_EQ(pos, j);
        EXPECT_EQ(k, std::vector<fp16_t>(hist.k_row(j, l, h), hist.k_row(j, l, h) + 16));
        EXPECT_EQ(v, std::vector<fp16_t>(hist.v_row(j, l, h), hist.v_row(j, l, h) + 16));
      }
    }
  }
  // Same K/V bytes as a dense cache, plus the retained tokens' positions.
  EXPECT_EQ(cache->footprint().kv_bytes, dense_bytes(layout, 50));
}

// Prefill in one pass gives the state of appending token by token: same
// counts, bytes, pages, contents (gate rows included) — and the same future
// (pending flags of window tokens survive, so later appends evict
// identically).
TEST(CompressedKvCache, BuildFromDenseEqualsTokenByTokenAppend) {
  std::mt19937 rng(4);
  for (int64_t gate_bytes : {0, 16, 64}) {
    for (int64_t prompt : {0, 1, 3, 9, 10, 11, 12, 37, 200}) {
      KvLayout layout = make_layout(random_block_map(5, 2, rng), 8, 3, 7, gate_bytes);
      History hist(layout, prompt + 30, 0.4, rng);
      auto pool = make_pool(64, 1 << 22);
      auto built = CompressedKvCache::build_from_dense(
          layout, pool.get(), prompt, hist.dense(), hist.prefix_flags(prompt), hist.dense_gate());
      ASSERT_TRUE(built.ok()) << built.status().to_string();
      auto stepped = CompressedKvCache::create(layout, pool.get());
      ASSERT_TRUE(stepped.ok());
      for (int64_t t = 0; t < prompt + 30; ++t) {
        if (t >= prompt) {
          ASSERT_TRUE(built->append(t, hist.token(t), hist.token_flags(t)).ok());
        }
        ASSERT_TRUE(stepped->append(t, hist.token(t), hist.token_flags(t)).ok());
        if (t + 1 < prompt) continue;
        ASSERT_EQ(built->n_tokens(), stepped->n_tokens());
        ASSERT_EQ(retained_counts(*built), retained_counts(*stepped));
        ASSERT_EQ(built->bytes(), stepped->bytes());
        ASSERT_EQ(built->capacity_bytes(), stepped->capacity_bytes());
        for (int64_t l = 0; l < 5; ++l) {
          for (int64_t h = 0; h < 2; ++h) {
            auto a = *built->proximal(l, h);
            auto b = *stepped->proximal(l, h);
            ASSERT_EQ(a.n_tokens(), b.n_tokens());
            for (int64_t r = 0; r < a.n_tokens(); ++r) {  // same ring rows, not just same sets
              ASSERT_EQ(built->proximal_row_position(r), stepped->proximal_row_position(r));
              ASSERT_EQ(0, std::memcmp(a.k_row(r), b.k_row(r), 16));
              ASSERT_EQ(0, std::memcmp(a.v_row(r), b.v_row(r), 16));
            }
            ASSERT_EQ(cache_set(*built, l, h), cache_set(*stepped, l, h));
          }
        }
        for (int64_t s = 0; s < layout.blocks.n_slots(); ++s) {
          const GateRowsView a = *built->gate_proximal(s);
          const GateRowsView b = *stepped->gate_proximal(s);
          ASSERT_EQ(a.n_rows(), b.n_rows());
          for (int64_t r = 0; r < a.n_rows(); ++r) {  // same ring rows
            ASSERT_EQ(0, std::memcmp(a.row(r), b.row(r), gate_bytes));
          }
          const GateRowsView c = *built->gate_distant(s);
          const GateRowsView d = *stepped->gate_distant(s);
          ASSERT_EQ(c.n_rows(), d.n_rows());
          for (int64_t i = 0; i < c.n_rows(); ++i) {
            ASSERT_EQ(0, std::memcmp(c.row(i), d.row(i), gate_bytes));
          }
          ASSERT_EQ(cache_gate_set(*built, s), gate_model_set(layout, hist, t + 1, s));
        }
      }
    }
  }
}

TEST(CompressedKvCache, FullPoolIsResourceExhaustedAndLeavesStateUnchanged) {
  std::mt19937 rng(5);
  KvLayout layout = make_layout(random_block_map(4, 2, rng), 8, 2, 4);
  History hist(layout, 400, 0.7, rng);
  auto pool = make_pool(64, 64 * 40);  // 40 pages of 4 tokens
  auto cache = CompressedKvCache::create(layout, pool.get());
  ASSERT_TRUE(cache.ok());
  int64_t t = 0;
  Status st;
  while ((st = cache->append(t, hist.token(t), hist.token_flags(t))).ok()) {
    ASSERT_LE(pool->used_bytes(), pool->capacity_bytes());
    ++t;
    ASSERT_LT(t, 400) << "pool never filled";
  }
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(cache->n_tokens(), t);
  EXPECT_EQ(cache->bytes(), formula_bytes(layout, hist, t));
  EXPECT_EQ(pool->used_bytes(), cache->capacity_bytes());
  // Retrying after another request frees pages would succeed; here it fails
  // the same way, with nothing half-written.
  EXPECT_EQ(cache->append(t, hist.token(t), hist.token_flags(t)).code(),
            StatusCode::kResourceExhausted);
  for (int64_t l = 0; l < 4; ++l) {
    for (int64_t h = 0; h < 2; ++h) {
      ASSERT_EQ(cache_set(*cache, l, h), rule_table_set(layout, hist, t, l, h));
    }
  }

  // A prefill that does not fit fails up front and takes no pages.
  auto other = make_pool(64, 64 * 10);
  auto big = CompressedKvCache::build_from_dense(layout, other.get(), 300, hist.dense(),
                                                 hist.prefix_flags(300));
  EXPECT_EQ(big.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(other->used_bytes(), 0);

  cache = CompressedKvCache::create(layout, pool.get());  // move-assign frees the old pages
  ASSERT_TRUE(cache.ok());
  EXPECT_EQ(pool->used_bytes(), 0);
}

TEST(CompressedKvCache, MoveTransfersPagesOnce) {
  std::mt19937 rng(6);
  KvLayout layout = make_layout(*BlockMap::uniform(4, 2, 2), 8, 2, 4);
  History hist(layout, 30, 0.5, rng);
  auto pool = make_pool(64, 1 << 20);
  {
    auto built = CompressedKvCache::build_from_dense(layout, pool.get(), 30, hist.dense(),
                                                     hist.prefix_flags(30));
    ASSERT_TRUE(built.ok());
    const int64_t used = pool->used_bytes();
    CompressedKvCache moved = std::move(built).value();
    EXPECT_EQ(pool->used_bytes(), used);
    EXPECT_EQ(moved.bytes(), formula_bytes(layout, hist, 30));
    CompressedKvCache again = std::move(moved);
    EXPECT_EQ(pool->used_bytes(), used);
    EXPECT_EQ(again.append(30, hist.token(0), hist.token_flags(0)).ok(), true);
  }
  EXPECT_EQ(pool->used_bytes(), 0);
}

TEST(CompressedKvCache, BadInputsAreErrorsNotAsserts) {
  std::mt19937 rng(7);
  KvLayout layout = make_layout(*BlockMap::uniform(4, 2, 2), 8, 2, 4);  // 4 slots
  History hist(layout, 10, 0.5, rng);
  auto pool = make_pool(64, 1 << 20);
  auto cache = CompressedKvCache::create(layout, pool.get());
  ASSERT_TRUE(cache.ok());

  Status st = cache->append(0, hist.token(0), std::vector<uint8_t>(3, 1));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("3 flags given, expected 4"), std::string::npos) << st.message();
  EXPECT_EQ(cache->append(0, hist.token(0), std::vector<uint8_t>{0, 1, 2, 0}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->append(1, hist.token(0), hist.token_flags(0)).code(),
            StatusCode::kInvalidArgument);  // position must be the next one
  EXPECT_EQ(cache->append(0, TokenKv{}, hist.token_flags(0)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->n_tokens(), 0);
  EXPECT_EQ(pool->used_bytes(), 0);

  ASSERT_TRUE(cache->append(0, hist.token(0), hist.token_flags(0)).ok());
  EXPECT_EQ(cache->proximal(4, 0).status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(cache->proximal(-1, 0).status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(cache->distant(0, 2).status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(cache->distant(9, 0).status().message().find("layer 9"), std::string::npos);

  auto built = CompressedKvCache::build_from_dense(layout, pool.get(), 10, hist.dense(),
                                                   std::vector<uint8_t>(39, 0));
  EXPECT_EQ(built.status().code(), StatusCode::kInvalidArgument);
  built = CompressedKvCache::build_from_dense(layout, pool.get(), -2, hist.dense(), {});
  EXPECT_EQ(built.status().code(), StatusCode::kInvalidArgument);
  built =
      CompressedKvCache::build_from_dense(layout, pool.get(), 10, DenseKv{}, hist.prefix_flags(10));
  EXPECT_EQ(built.status().code(), StatusCode::kInvalidArgument);

  KvLayout bad = layout;
  bad.head_dim = 24;  // 48-byte rows do not tile 64-byte pages
  EXPECT_EQ(CompressedKvCache::create(bad, pool.get()).status().code(),
            StatusCode::kInvalidArgument);
  bad = layout;
  bad.gate_state_bytes_per_token = 24;  // 24-byte gate rows do not tile 64-byte pages
  auto no_tile = CompressedKvCache::create(bad, pool.get());
  EXPECT_EQ(no_tile.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(no_tile.status().message().find("24-byte gate state rows"), std::string::npos)
      << no_tile.status().message();
  bad.gate_state_bytes_per_token = 128;  // a gate row larger than a page
  EXPECT_EQ(CompressedKvCache::create(bad, pool.get()).status().code(),
            StatusCode::kInvalidArgument);
  bad.gate_state_bytes_per_token = 7;  // not whole fp16 values
  EXPECT_EQ(CompressedKvCache::create(bad, pool.get()).status().code(),
            StatusCode::kInvalidArgument);
  bad.gate_state_bytes_per_token = 8;
  EXPECT_TRUE(CompressedKvCache::create(bad, pool.get()).ok());
  EXPECT_FALSE(CompressedKvCache::create(layout, nullptr).ok());
}

}  // namespace
}  // namespace kvgate::kvstore
