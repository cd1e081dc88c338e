#include "kvstore/compressed_cache.h"

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kvstore/footprint.h"
#include "kvstore/wire_image.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::kvstore {
namespace {

using testing::append_token;
using testing::cache_gate_set;
using testing::cache_set;
using testing::expect_same_attention;
using testing::expect_same_state;
using testing::formula_bytes;
using testing::gate_model_set;
using testing::History;
using testing::LayerMajorKv;
using testing::make_layout;
using testing::make_pool;
using testing::random_block_map;
using testing::retained_counts;
using testing::rule_table_set;
using testing::slot_flags;
using testing::slot_only_kv;

struct Shape {
  int64_t n_layers, n_heads, head_dim, n_sink, n_window, page_tokens, n_tokens;
  int64_t gate_bytes;  // the gate-state variant's row size (also run with 0)
};

// bytes() equals the formula (computed here from the flags, independently
// of the cache) at every length, for random flags and ragged blocks, with
// and without gate state, with and without gate rows of retained tokens
// (gate context `cache` / `window`); the pool's used bytes equal the
// cache's pages, and all come back at the end.
TEST(CompressedKvCache, BytesEqualFormulaAtEveryLength) {
  const Shape shapes[] = {
      {5, 3, 8, 4, 8, 4, 120, 8},       // small, many page boundaries; 8 gate rows a page
      {3, 2, 32, 0, 1, 1, 40, 16},      // no sinks, window of one, one-token pages
      {4, 1, 8, 3, 5, 64, 90, 1024},    // pages larger than the ring; one gate row a page
      {30, 3, 64, 4, 64, 16, 1000, 64}  // SmolLM2-135M shape, gate h'·d' = 16
  };
  std::mt19937 rng(1);
  for (const Shape& sh : shapes) {
    for (const auto& [gate_bytes, retained] :
         {std::pair{int64_t{0}, true}, std::pair{sh.gate_bytes, true},
          std::pair{sh.gate_bytes, false}}) {
      for (double keep : {0.0, 0.3, 1.0}) {
        KvLayout layout = make_layout(random_block_map(sh.n_layers, sh.n_heads, rng), sh.head_dim,
                                      sh.n_sink, sh.n_window, gate_bytes, retained);
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
                << "t=" << t << " keep=" << keep << " gate=" << gate_bytes
                << " retained gate rows=" << retained << " map:\n"
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
  for (const auto& [gate_bytes, retained] : {std::pair{int64_t{0}, true}, std::pair{int64_t{16}, true},
                                            std::pair{int64_t{64}, true},
                                            std::pair{int64_t{16}, false}}) {
    for (int64_t prompt : {0, 1, 3, 9, 10, 11, 12, 37, 200}) {
      KvLayout layout = make_layout(random_block_map(5, 2, rng), 8, 3, 7, gate_bytes, retained);
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

// A staged build — begin_build, fill_slot of every slot in a random order,
// each given layer-major K/V in which only the slot's own layers and head
// (and its own gate rows) hold values and everything else is NaN, then
// finish_build — is the cache build_from_dense gives from token-major K/V:
// every row of every view, ring rows, retained lists and positions, gate
// rows, bytes, capacity, pages taken, the wire descriptor (retained counts
// and pending flags), attention, and the future under further appends.
TEST(CompressedKvCache, StagedBuildInAnyOrderEqualsBuildFromDense) {
  std::mt19937 rng(8);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  int wrapped = 0, gated = 0, with_retained = 0, short_of_sinks = 0;
  for (int iter = 0; iter < 200; ++iter) {
    const int64_t n_layers = pick(1, 6), n_heads = pick(1, 3), head_dim = int64_t{4} << pick(0, 2);
    const int64_t n_sink = pick(0, 3), n_window = pick(1, 7),
                  page_bytes = int64_t{64} << pick(0, 1);
    const int64_t gate_bytes = pick(0, 1) ? 0 : (int64_t{8} << pick(0, 3));
    int64_t n_tokens = 0;
    switch (iter % 5) {
      case 0:  // sinks only (or none): shorter than sinks + window
        n_tokens = pick(0, n_sink);
        break;
      case 1:  // window not wrapped
        n_tokens = pick(0, n_sink + n_window);
        break;
      case 2:  // many pages per list
        n_tokens = pick(100, 300);
        break;
      default:  // wrapped window
        n_tokens = pick(n_sink + n_window, 70);
        break;
    }
    const double keeps[] = {0.0, 0.5, 1.0};
    const double keep = keeps[pick(0, 2)];
    // Gate rows of retained tokens kept (context `cache`) or not (`window`).
    const bool gate_retained = (iter / 5) % 2 == 0;
    const KvLayout layout = make_layout(random_block_map(n_layers, n_heads, rng), head_dim, n_sink,
                                        n_window, gate_bytes, gate_retained);
    SCOPED_TRACE("iter " + std::to_string(iter) + ": " + layout.blocks.to_string() + " d " +
                 std::to_string(head_dim) + " sink " + std::to_string(n_sink) + " window " +
                 std::to_string(n_window) + " page " + std::to_string(page_bytes) + " gate " +
                 std::to_string(gate_bytes) + (gate_retained ? "" : " (not retained)") +
                 " tokens " + std::to_string(n_tokens) + " keep " +
                 std::to_string(keep));
    const int64_t n_slots = layout.blocks.n_slots();
    const int64_t extra = n_window + 4;  // every pending flag gets applied
    const History hist(layout, n_tokens + extra, keep, rng);
    auto pool_a = make_pool(page_bytes, int64_t{1} << 22);
    auto pool_b = make_pool(page_bytes, int64_t{1} << 22);
    {
      auto built =
          CompressedKvCache::build_from_dense(layout, pool_a.get(), n_tokens, hist.dense(),
                                              hist.prefix_flags(n_tokens), hist.dense_gate());
      ASSERT_TRUE(built.ok()) << built.status().to_string();
      auto staged = CompressedKvCache::begin_build(layout, pool_b.get(), n_tokens);
      ASSERT_TRUE(staged.ok()) << staged.status().to_string();
      EXPECT_TRUE(staged->building());
      EXPECT_EQ(staged->n_tokens(), n_tokens);
      // The rings alone: the state with nothing retained.
      EXPECT_EQ(staged->n_pages(),
                *state_pages(layout, page_bytes, n_tokens, std::vector<int64_t>(n_slots, 0)));
      EXPECT_EQ(pool_b->used_pages(), staged->n_pages());

      std::vector<int64_t> order(n_slots);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      for (size_t i = 0; i < order.size(); ++i) {
        const int64_t s = order[i];
        EXPECT_FALSE(staged->slot_filled(s));
        const LayerMajorKv kv = slot_only_kv(layout, hist, n_tokens, s);
        const Status st =
            staged->fill_slot(s, kv.dense(), slot_flags(hist, s, n_tokens), kv.dense_gate());
        ASSERT_TRUE(st.ok()) << "slot " << s << ": " << st.to_string();
        EXPECT_TRUE(staged->slot_filled(s));
        EXPECT_EQ(staged->retained_tokens(s), built->retained_tokens(s));
        for (int64_t r = 0; r < staged->retained_tokens(s); ++r) {
          ASSERT_EQ(staged->retained_position(s, r), built->retained_position(s, r));
        }
        EXPECT_EQ(pool_b->used_pages(), staged->n_pages());
        if (i + 1 < order.size()) {
          EXPECT_EQ(staged->finish_build().code(), StatusCode::kFailedPrecondition);
        }
      }
      ASSERT_TRUE(staged->finish_build().ok());
      EXPECT_FALSE(staged->building());

      expect_same_state(*built, *staged);
      EXPECT_EQ(staged->footprint(), built->footprint());
      EXPECT_EQ(staged->bytes(), formula_bytes(layout, hist, n_tokens));
      EXPECT_EQ(pool_b->used_pages(), pool_a->used_pages());
      for (int64_t l = 0; l < n_layers; ++l) {
        for (int64_t h = 0; h < n_heads; ++h) {
          ASSERT_EQ(cache_set(*staged, l, h), rule_table_set(layout, hist, n_tokens, l, h))
              << "l=" << l << " h=" << h;
        }
      }
      for (int64_t s = 0; s < n_slots; ++s) {
        ASSERT_EQ(cache_gate_set(*staged, s), gate_model_set(layout, hist, n_tokens, s));
      }
      // Same counts and pending flags of the window tokens, byte for byte.
      auto image_a = export_wire_image(*built);
      auto image_b = export_wire_image(*staged);
      ASSERT_TRUE(image_a.ok() && image_b.ok());
      EXPECT_EQ(image_a->descriptor, image_b->descriptor);
      EXPECT_EQ(image_a->segments, image_b->segments);
      expect_same_attention(*built, *staged, rng);
      // The same future: further tokens (flags given, deferred, or never
      // given) evict identically from both.
      for (int64_t j = n_tokens; j < n_tokens + extra; ++j) {
        const int mode = static_cast<int>(rng() % 3);
        append_token(*built, hist, j, mode);
        append_token(*staged, hist, j, mode);
        expect_same_state(*built, *staged);
        expect_same_attention(*built, *staged, rng);
        EXPECT_EQ(pool_b->used_pages(), pool_a->used_pages());
      }
      wrapped += n_tokens > n_sink + n_window;
      short_of_sinks += n_tokens < n_sink;
      gated += layout.has_gate_state();
      for (int64_t r : retained_counts(*staged)) with_retained += r > 0;
    }
    EXPECT_EQ(pool_b->used_bytes(), 0);
  }
  // The random cases covered what they are meant to.
  EXPECT_GT(wrapped, 80);
  EXPECT_GT(short_of_sinks, 10);
  EXPECT_GT(gated, 60);
  EXPECT_GT(with_retained, 100);
}

TEST(CompressedKvCache, StagedBuildErrorsChangeNothing) {
  std::mt19937 rng(9);
  const KvLayout layout = make_layout(*BlockMap::uniform(4, 2, 2), 8, 2, 4, 16);  // 4 slots
  const History hist(layout, 30, 0.5, rng);
  auto pool = make_pool(64, 1 << 20);
  auto expect_error = [](const Status& st, StatusCode code, const std::string& text) {
    EXPECT_EQ(st.code(), code) << st.to_string();
    EXPECT_NE(st.message().find(text), std::string::npos) << st.message();
  };

  // begin_build
  expect_error(CompressedKvCache::begin_build(layout, pool.get(), -1).status(),
               StatusCode::kInvalidArgument, "n_tokens -1");
  expect_error(CompressedKvCache::begin_build(layout, pool.get(), kMaxTokens + 1).status(),
               StatusCode::kInvalidArgument, "not in [0, 2^31]");
  EXPECT_EQ(CompressedKvCache::begin_build(layout, nullptr, 3).status().code(),
            StatusCode::kInvalidArgument);
  {
    auto tiny = make_pool(64, 64 * 3);
    // 6 proximal tokens of 4 per page: 2 rounds x 2 x 8 (layer, head) K/V
    // rings + 2 gate ring pages (4 rows of 16 bytes each) x 4 slots = 40.
    expect_error(CompressedKvCache::begin_build(layout, tiny.get(), 30).status(),
                 StatusCode::kResourceExhausted, "need 40 pages, the page source has 3 free");
    EXPECT_EQ(tiny->used_pages(), 0);
  }

  auto cache = CompressedKvCache::begin_build(layout, pool.get(), 30);
  ASSERT_TRUE(cache.ok()) << cache.status().to_string();
  const int64_t rings = pool->used_pages();
  EXPECT_EQ(rings, 40);
  const DenseKv kv = hist.dense();
  const DenseGate gate = hist.dense_gate();
  const std::vector<uint8_t> f0 = slot_flags(hist, 0, 30);
  expect_error(cache->fill_slot(-1, kv, f0, gate), StatusCode::kInvalidArgument, "slot -1");
  expect_error(cache->fill_slot(4, kv, f0, gate), StatusCode::kInvalidArgument,
               "slot 4, not in [0, 4)");
  expect_error(cache->fill_slot(0, kv, std::vector<uint8_t>(29, 0), gate),
               StatusCode::kInvalidArgument, "29 flags given, expected 30");
  std::vector<uint8_t> bad = f0;
  bad[17] = 2;
  expect_error(cache->fill_slot(0, kv, bad, gate), StatusCode::kInvalidArgument,
               "flag of token 17 is 2");
  expect_error(cache->fill_slot(0, DenseKv{}, f0, gate), StatusCode::kInvalidArgument,
               "without K or V rows");
  expect_error(cache->fill_slot(0, kv, f0, DenseGate{}), StatusCode::kInvalidArgument,
               "without gate state rows");
  EXPECT_FALSE(cache->slot_filled(0));
  EXPECT_EQ(cache->retained_tokens(0), 0);
  EXPECT_EQ(pool->used_pages(), rings);

  // Until finished, the cache cannot be read, appended to or exported.
  const Status during = cache->proximal(0, 0).status();
  expect_error(during, StatusCode::kFailedPrecondition, "staged build");
  EXPECT_EQ(cache->distant(0, 0).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache->gate_proximal(0).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache->gate_distant(0).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache->append(30, hist.token(29), hist.token_flags(29)).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache->set_flags(29, hist.token_flags(29)).code(), StatusCode::kFailedPrecondition);
  expect_error(export_wire_image(*cache).status(), StatusCode::kFailedPrecondition,
               "staged build is not finished");

  ASSERT_TRUE(cache->fill_slot(0, kv, f0, gate).ok());
  const int64_t after_one = pool->used_pages();
  expect_error(cache->fill_slot(0, kv, f0, gate), StatusCode::kInvalidArgument,
               "slot 0 (KV head 0, layers 0-1) filled twice");
  EXPECT_EQ(pool->used_pages(), after_one);
  expect_error(cache->finish_build(), StatusCode::kFailedPrecondition,
               "before slot 1 (KV head 0, layers 2-3) was filled (3 of 4 slots unfilled)");
  for (int64_t s = 1; s < 4; ++s) {
    ASSERT_TRUE(cache->fill_slot(s, kv, slot_flags(hist, s, 30), gate).ok());
  }
  ASSERT_TRUE(cache->finish_build().ok());
  EXPECT_EQ(pool->used_pages(), cache->n_pages());
  expect_error(cache->fill_slot(0, kv, f0, gate), StatusCode::kFailedPrecondition,
               "outside a staged build");
  EXPECT_EQ(cache->finish_build().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(cache->append(30, hist.token(29), hist.token_flags(29)).ok());

  // Gate rows for a layout without gate state.
  const KvLayout plain = make_layout(*BlockMap::uniform(4, 2, 2), 8, 2, 4);
  const History plain_hist(plain, 30, 1.0, rng);
  auto other = CompressedKvCache::begin_build(plain, pool.get(), 30);
  ASSERT_TRUE(other.ok());
  expect_error(other->fill_slot(0, plain_hist.dense(), slot_flags(plain_hist, 0, 30), gate),
               StatusCode::kInvalidArgument, "gate state rows given for a layout without");
  cache = std::move(other).value();  // move-assign frees the finished cache's pages

  // A slot that does not fit: RESOURCE_EXHAUSTED naming needed and free,
  // nothing kept, and the same call succeeds once pages are freed. Every
  // slot retains its 24 distant tokens: 6 pages of 4 base-K rows, 6 x 2 V
  // pages, 2 position pages = 20 pages.
  auto small = make_pool(64, 64 * (32 + 20 + 20));
  auto staged = CompressedKvCache::begin_build(plain, small.get(), 30);
  ASSERT_TRUE(staged.ok());
  EXPECT_EQ(small->used_pages(), 32);
  ASSERT_TRUE(staged->fill_slot(0, plain_hist.dense(), slot_flags(plain_hist, 0, 30)).ok());
  EXPECT_EQ(small->used_pages(), 52);
  std::vector<PageId> elsewhere;  // another request's pages
  for (int i = 0; i < 15; ++i) elsewhere.push_back(*small->allocate());
  expect_error(staged->fill_slot(1, plain_hist.dense(), slot_flags(plain_hist, 1, 30)),
               StatusCode::kResourceExhausted,
               "slot 1 (KV head 0, layers 2-3) needs 20 pages for its retained tokens, the page "
               "source has 5 free");
  EXPECT_FALSE(staged->slot_filled(1));
  EXPECT_EQ(staged->retained_tokens(1), 0);
  EXPECT_EQ(small->used_pages(), 52 + 15);
  for (PageId p : elsewhere) ASSERT_TRUE(small->free(p).ok());
  ASSERT_TRUE(staged->fill_slot(1, plain_hist.dense(), slot_flags(plain_hist, 1, 30)).ok());
  EXPECT_EQ(staged->retained_tokens(1), 24);
  // An unfinished build, destroyed, returns every page.
  staged = CompressedKvCache::create(plain, small.get());
  EXPECT_EQ(small->used_pages(), 0);
  // A moved-from cache.
  auto moved_from = CompressedKvCache::begin_build(plain, small.get(), 30);
  ASSERT_TRUE(moved_from.ok());
  CompressedKvCache taken = std::move(*moved_from);
  EXPECT_EQ(moved_from->fill_slot(0, plain_hist.dense(), slot_flags(plain_hist, 0, 30)).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(moved_from->finish_build().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(taken.building());
}

}  // namespace
}  // namespace kvgate::kvstore
