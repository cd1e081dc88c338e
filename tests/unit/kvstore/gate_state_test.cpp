// The Attention-Gate's own state in CompressedKvCache: gate rows follow
// their tokens through the proximal ring into the retained lists, deferred
// flags, page accounting with gate pages, and the input checks.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kvstore/compressed_cache.h"
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

// Everything the cache holds at length t equals the naive model: K/V sets
// of every (layer, head), gate rows of every slot, bytes and footprint.
void expect_matches_model(const CompressedKvCache& cache, const History& hist, int64_t t) {
  const KvLayout& layout = cache.layout();
  ASSERT_EQ(cache.n_tokens(), t);
  for (int64_t s = 0; s < layout.blocks.n_slots(); ++s) {
    ASSERT_EQ(cache_gate_set(cache, s), gate_model_set(layout, hist, t, s))
        << "t=" << t << " slot=" << s << " map:\n"
        << layout.blocks.to_string();
  }
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    for (int64_t h = 0; h < layout.n_kv_heads(); ++h) {
      ASSERT_EQ(cache_set(cache, l, h), rule_table_set(layout, hist, t, l, h))
          << "t=" << t << " l=" << l << " h=" << h;
    }
  }
  ASSERT_EQ(cache.bytes(), formula_bytes(layout, hist, t));
  auto f = footprint(layout, t, retained_counts(cache));
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  ASSERT_EQ(*f, cache.footprint());
}

struct GateShape {
  int64_t n_layers, n_heads, head_dim, n_sink, n_window, page_tokens, n_tokens, gate_bytes;
};

// Gate rows ride the window and, for flag 1, land in the slot's retained
// list in position order; flag 0 drops them. Without gate_state_retained
// (gate context `window`) every gate row is dropped when its token leaves
// the window, flag 1 or not, and no retained gate page is ever taken.
// Ragged random block maps, random flags, gate pages holding more, fewer
// or as many rows as K/V pages.
TEST(GateState, RowsFollowTheWindowIntoRetainedLists) {
  const GateShape shapes[] = {
      {5, 3, 8, 3, 7, 4, 80, 4},    // 16 gate rows a page vs 4 K/V rows
      {4, 2, 16, 0, 1, 2, 40, 64},  // no sinks, window of one: 1 gate row a page
      {6, 2, 8, 2, 5, 8, 70, 128},  // gate row = one whole page
      {3, 3, 8, 4, 4, 4, 60, 32},   // 2 gate rows a page
  };
  std::mt19937 rng(11);
  for (const GateShape& sh : shapes) {
    for (bool retained : {true, false}) {
      for (double keep : {0.0, 0.5, 1.0}) {
        SCOPED_TRACE(std::string("gate rows of retained tokens ") + (retained ? "kept" : "dropped") +
                     ", keep " + std::to_string(keep));
        KvLayout layout = make_layout(random_block_map(sh.n_layers, sh.n_heads, rng), sh.head_dim,
                                      sh.n_sink, sh.n_window, sh.gate_bytes, retained);
        History hist(layout, sh.n_tokens, keep, rng);
        auto pool = make_pool(sh.page_tokens * 2 * sh.head_dim, int64_t{1} << 24);
        {
          auto cache = CompressedKvCache::create(layout, pool.get());
          ASSERT_TRUE(cache.ok()) << cache.status().to_string();
          EXPECT_EQ(cache->gate_rows_per_page(), pool->page_bytes() / sh.gate_bytes);
          EXPECT_EQ(cache->retained_gate_rows_per_page(), retained ? cache->gate_rows_per_page() : 0);
          for (int64_t j = 0; j < sh.n_tokens; ++j) {
            ASSERT_TRUE(cache->append(j, hist.token(j), hist.token_flags(j)).ok());
            expect_matches_model(*cache, hist, j + 1);
            if (HasFatalFailure()) return;
            ASSERT_EQ(pool->used_bytes(), cache->capacity_bytes());
            ASSERT_GE(cache->capacity_bytes(), cache->bytes());
          }
          const Footprint f = cache->footprint();
          const int64_t p = cache->proximal_tokens();
          int64_t r_sum = 0;
          for (int64_t s = 0; s < layout.blocks.n_slots(); ++s) {
            r_sum += cache->retained_tokens(s);
            if (!retained) {
              EXPECT_EQ(cache->gate_distant(s)->n_pages(), 0);
            }
          }
          EXPECT_EQ(f.gate_bytes,
                    sh.gate_bytes * (layout.blocks.n_slots() * p + (retained ? r_sum : 0)));
          if (keep > 0.0) {
            EXPECT_GT(r_sum, 0);
          }
        }
        EXPECT_EQ(pool->used_bytes(), 0);
      }
    }
  }
}

// The decode path: begin_append() with no flags, rows written through
// new_k_row/new_v_row/new_gate_row, flags given later while the token is in
// the window — at once, overwritten, a few steps later, per slot through
// set_flag_unchecked(), or never (then it is dropped everywhere).
TEST(GateState, DeferredFlagsSetWhileInTheWindow) {
  std::mt19937 rng(12);
  for (const auto& [n_sink, retained] : {std::pair{int64_t{0}, true}, std::pair{int64_t{3}, true},
                                        std::pair{int64_t{3}, false}}) {
    KvLayout layout = make_layout(random_block_map(5, 3, rng), 8, n_sink, 6, 8, retained);
    const int64_t n_tokens = 90;
    const int64_t w = layout.n_window_tokens;
    const int64_t n_slots = layout.blocks.n_slots();
    History hist(layout, n_tokens, 0.5, rng);  // hist.flags end up the effective flags
    auto pool = make_pool(64, 1 << 22);
    auto cache = CompressedKvCache::create(layout, pool.get());
    ASSERT_TRUE(cache.ok());

    std::uniform_int_distribution<int> pick_mode(0, 4);
    std::uniform_int_distribution<int64_t> pick_delay(1, w);
    std::multimap<int64_t, int64_t> later;  // step -> token whose flags are set then
    for (int64_t t = 0; t < n_tokens; ++t) {
      // Flags scheduled for now, before token t is appended (token j leaves
      // the window at begin_append(j + w), so steps j + 1 .. j + w are in time).
      for (auto [it, end] = later.equal_range(t); it != end; ++it) {
        ASSERT_TRUE(cache->set_flags(it->second, hist.token_flags(it->second)).ok());
      }
      later.erase(t);

      const int mode = pick_mode(rng);
      if (mode == 0) {
        ASSERT_TRUE(cache->begin_append(t, hist.token_flags(t)).ok());
      } else {
        ASSERT_TRUE(cache->begin_append(t, {}).ok());
      }
      for (int64_t l = 0; l < layout.n_layers(); ++l) {
        for (int64_t h = 0; h < layout.n_kv_heads(); ++h) {
          std::memcpy(cache->new_k_row(l, h), hist.k_row(t, l, h), 2 * layout.head_dim);
          std::memcpy(cache->new_v_row(l, h), hist.v_row(t, l, h), 2 * layout.head_dim);
        }
      }
      for (int64_t s = 0; s < n_slots; ++s) {
        std::memcpy(cache->new_gate_row(s), hist.gate_row(t, s), layout.gate_state_bytes_per_token);
      }
      switch (mode) {
        case 1: {  // set to the opposite, then overwritten with the real ones
          std::vector<uint8_t> opposite = hist.token_flags(t);
          for (auto& f : opposite) f ^= 1;
          ASSERT_TRUE(cache->set_flags(t, opposite).ok());
          ASSERT_TRUE(cache->set_flags(t, hist.token_flags(t)).ok());
          break;
        }
        case 2:
          later.emplace(t + pick_delay(rng), t);
          break;
        case 3:
          for (int64_t s = 0; s < n_slots; ++s) cache->set_flag_unchecked(s, hist.flag(s, t));
          break;
        case 4:  // never set: treated as flag 0 in every slot
          for (int64_t s = 0; s < n_slots; ++s) hist.flags[s * n_tokens + t] = 0;
          break;
        default:
          break;
      }
      expect_matches_model(*cache, hist, t + 1);
      if (HasFatalFailure()) return;
      ASSERT_EQ(pool->used_bytes(), cache->capacity_bytes());
    }

    // Flags scheduled past the end: their tokens are still in the window.
    for (auto [step, j] : later) ASSERT_TRUE(cache->set_flags(j, hist.token_flags(j)).ok());

    // Errors: the cache is unchanged by each.
    const int64_t t = cache->n_tokens();
    const int64_t gone = t - w - 1;  // left the window (not a sink: t is large)
    Status st = cache->set_flags(gone, hist.token_flags(gone));
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("already left the window"), std::string::npos) << st.message();
    st = cache->set_flags(t, hist.token_flags(0));
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("does not exist"), std::string::npos) << st.message();
    EXPECT_EQ(cache->set_flags(-1, hist.token_flags(0)).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(cache->set_flags(t - 1, std::vector<uint8_t>(n_slots - 1, 1)).code(),
              StatusCode::kInvalidArgument);
    std::vector<uint8_t> two(n_slots, 1);
    two[n_slots - 1] = 2;
    EXPECT_EQ(cache->set_flags(t - 1, two).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(cache->set_flags(t - 1, {}).code(), StatusCode::kInvalidArgument);
    // Sinks never leave: accepted, no effect (malformed flags still rejected).
    if (n_sink > 0) {
      EXPECT_TRUE(cache->set_flags(0, std::vector<uint8_t>(n_slots, 1)).ok());
      EXPECT_EQ(cache->set_flags(0, two).code(), StatusCode::kInvalidArgument);
    }
    expect_matches_model(*cache, hist, t);
    if (HasFatalFailure()) return;

    // The rejected calls changed no pending flag: the window drains as the
    // model says.
    for (int64_t j = t; j < t + w + 1; ++j) {
      std::vector<uint8_t> zeros(n_slots, 0);
      ASSERT_TRUE(cache->append(j, hist.token(j % n_tokens), zeros).ok());
    }
    for (int64_t s = 0; s < n_slots; ++s) {
      int64_t r = 0;
      for (int64_t j = n_sink; j < t; ++j) r += hist.flag(s, j);
      EXPECT_EQ(cache->retained_tokens(s), r) << "slot " << s;
    }
  }
}

// Sinks take no pending flags: set_flag_unchecked on a sink is a no-op, and
// set_flags on it is accepted.
TEST(GateState, FlagsOfSinksAreIgnored) {
  std::mt19937 rng(13);
  KvLayout layout = make_layout(*BlockMap::uniform(2, 2, 1), 8, 2, 2, 8);  // 4 slots
  History hist(layout, 12, 0.0, rng);
  auto pool = make_pool(64, 1 << 20);
  auto cache = CompressedKvCache::create(layout, pool.get());
  ASSERT_TRUE(cache.ok());
  for (int64_t t = 0; t < 12; ++t) {
    ASSERT_TRUE(cache->append(t, hist.token(t), hist.token_flags(t)).ok());
    if (t < 2) {
      for (int64_t s = 0; s < 4; ++s) cache->set_flag_unchecked(s, 1);
      EXPECT_TRUE(cache->set_flags(t, std::vector<uint8_t>(4, 1)).ok());
    }
  }
  expect_matches_model(*cache, hist, 12);
  for (int64_t s = 0; s < 4; ++s) EXPECT_EQ(cache->retained_tokens(s), 0);
}

// Page accounting counts gate pages exactly: with a pool of exactly the
// pages the next token needs it succeeds; with one page fewer it is
// RESOURCE_EXHAUSTED and the cache is unchanged. Same for prefill. With
// and without gate rows of retained tokens.
class GateStateExhaustion : public ::testing::TestWithParam<bool> {};

TEST_P(GateStateExhaustion, ExhaustionIsAtomicWithGatePages) {
  std::mt19937 rng(14);
  KvLayout layout =
      make_layout(random_block_map(3, 2, rng), 8, 2, 4, 32, GetParam());  // 2 gate rows a page
  const int64_t n_tokens = 60;
  History hist(layout, n_tokens, 0.6, rng);
  const int64_t page = 64;

  // Pages held after each length, from an unbounded run.
  std::vector<int64_t> pages(n_tokens + 1, 0);
  {
    auto pool = make_pool(page, 1 << 22);
    auto cache = CompressedKvCache::create(layout, pool.get());
    ASSERT_TRUE(cache.ok());
    for (int64_t t = 0; t < n_tokens; ++t) {
      ASSERT_TRUE(cache->append(t, hist.token(t), hist.token_flags(t)).ok());
      pages[t + 1] = pool->used_pages();
    }
  }

  for (int64_t t = 0; t < n_tokens; ++t) {
    if (pages[t + 1] == pages[t]) continue;  // token t takes no page
    // One page short for token t.
    auto pool = make_pool(page, page * (pages[t + 1] - 1));
    auto cache = CompressedKvCache::create(layout, pool.get());
    ASSERT_TRUE(cache.ok());
    for (int64_t j = 0; j < t; ++j) {
      ASSERT_TRUE(cache->append(j, hist.token(j), hist.token_flags(j)).ok());
    }
    EXPECT_EQ(cache->append(t, hist.token(t), hist.token_flags(t)).code(),
              StatusCode::kResourceExhausted)
        << "t=" << t;
    EXPECT_EQ(cache->begin_append(t, {}).code(), StatusCode::kResourceExhausted);
    EXPECT_EQ(pool->used_pages(), pages[t]);
    EXPECT_EQ(pool->used_bytes(), cache->capacity_bytes());
    expect_matches_model(*cache, hist, t);
    if (HasFatalFailure()) return;

    // Exactly enough: token t fits.
    auto exact = make_pool(page, page * pages[t + 1]);
    auto fits = CompressedKvCache::create(layout, exact.get());
    ASSERT_TRUE(fits.ok());
    for (int64_t j = 0; j <= t; ++j) {
      ASSERT_TRUE(fits->append(j, hist.token(j), hist.token_flags(j)).ok()) << "t=" << t;
    }
    EXPECT_EQ(exact->free_pages(), 0);

    // Prefill of t + 1 tokens: fails holding nothing one page short,
    // succeeds with exactly its pages.
    // (Pools are declared before the caches drawing from them.)
    auto short_pool = make_pool(page, page * (pages[t + 1] - 1));
    auto exact_pool = make_pool(page, page * pages[t + 1]);
    auto built = CompressedKvCache::build_from_dense(layout, short_pool.get(), t + 1, hist.dense(),
                                                     hist.prefix_flags(t + 1), hist.dense_gate());
    EXPECT_EQ(built.status().code(), StatusCode::kResourceExhausted);
    EXPECT_EQ(short_pool->used_pages(), 0);
    built = CompressedKvCache::build_from_dense(layout, exact_pool.get(), t + 1, hist.dense(),
                                                hist.prefix_flags(t + 1), hist.dense_gate());
    ASSERT_TRUE(built.ok()) << built.status().to_string();
    EXPECT_EQ(exact_pool->free_pages(), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(RetainedGateRows, GateStateExhaustion, ::testing::Bool());

// Gate inputs must match the layout: rows required with gate state,
// refused without.
TEST(GateState, GateInputsMustMatchTheLayout) {
  std::mt19937 rng(15);
  KvLayout gated = make_layout(*BlockMap::uniform(4, 2, 2), 8, 2, 4, 16);
  KvLayout plain = make_layout(*BlockMap::uniform(4, 2, 2), 8, 2, 4);
  History gh(gated, 10, 0.5, rng);
  History ph(plain, 10, 0.5, rng);
  auto pool = make_pool(64, 1 << 20);

  auto built = CompressedKvCache::build_from_dense(gated, pool.get(), 10, gh.dense(),
                                                   gh.prefix_flags(10));  // no gate rows
  EXPECT_EQ(built.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(built.status().message().find("gate state rows"), std::string::npos);
  built = CompressedKvCache::build_from_dense(plain, pool.get(), 10, ph.dense(),
                                              ph.prefix_flags(10), gh.dense_gate());
  EXPECT_EQ(built.status().code(), StatusCode::kInvalidArgument);
  // No tokens: nothing to read, so no rows needed.
  EXPECT_TRUE(CompressedKvCache::build_from_dense(gated, pool.get(), 0, DenseKv{}, {}).ok());
  EXPECT_EQ(pool->used_bytes(), 0);

  auto cache = CompressedKvCache::create(gated, pool.get());
  ASSERT_TRUE(cache.ok());
  TokenKv no_gate = gh.token(0);
  no_gate.gate = nullptr;
  EXPECT_EQ(cache->append(0, no_gate, gh.token_flags(0)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->n_tokens(), 0);
  EXPECT_EQ(cache->gate_proximal(0)->n_rows(), 0);

  auto plain_cache = CompressedKvCache::create(plain, pool.get());
  ASSERT_TRUE(plain_cache.ok());
  TokenKv extra = ph.token(0);
  extra.gate = gh.gate_row(0, 0);
  EXPECT_EQ(plain_cache->append(0, extra, ph.token_flags(0)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(pool->used_bytes(), 0);
}

// Without gate state the gate views are empty and new_gate_row is null,
// whatever the cache holds; slots are range-checked either way.
TEST(GateState, ViewsWithoutGateStateAreEmpty) {
  std::mt19937 rng(16);
  KvLayout layout = make_layout(*BlockMap::uniform(4, 2, 2), 8, 1, 3);  // 4 slots
  History hist(layout, 20, 1.0, rng);
  auto pool = make_pool(64, 1 << 20);
  auto cache = CompressedKvCache::build_from_dense(layout, pool.get(), 20, hist.dense(),
                                                   hist.prefix_flags(20));
  ASSERT_TRUE(cache.ok());
  EXPECT_EQ(cache->gate_rows_per_page(), 0);
  for (int64_t s = 0; s < 4; ++s) {
    ASSERT_GT(cache->retained_tokens(s), 0);
    EXPECT_EQ(cache->gate_proximal(s)->n_rows(), 0);
    EXPECT_EQ(cache->gate_proximal(s)->n_pages(), 0);
    EXPECT_EQ(cache->gate_distant(s)->n_rows(), 0);
  }
  EXPECT_EQ(cache->footprint().gate_bytes, 0);
  ASSERT_TRUE(cache->begin_append(20, {}).ok());
  EXPECT_EQ(cache->new_gate_row(0), nullptr);
  EXPECT_EQ(cache->gate_proximal(4).status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(cache->gate_distant(-1).status().code(), StatusCode::kOutOfRange);
}

// Gate pages move with the cache and come back once.
TEST(GateState, MoveTransfersGatePagesOnce) {
  std::mt19937 rng(17);
  KvLayout layout = make_layout(random_block_map(4, 2, rng), 8, 2, 4, 16);
  History hist(layout, 40, 0.5, rng);
  auto pool = make_pool(64, 1 << 20);
  {
    auto built = CompressedKvCache::build_from_dense(layout, pool.get(), 30, hist.dense(),
                                                     hist.prefix_flags(30), hist.dense_gate());
    ASSERT_TRUE(built.ok()) << built.status().to_string();
    const int64_t used = pool->used_bytes();
    CompressedKvCache moved = std::move(built).value();
    EXPECT_EQ(pool->used_bytes(), used);
    EXPECT_EQ(built->gate_proximal(0).status().code(), StatusCode::kFailedPrecondition);
    CompressedKvCache again = std::move(moved);
    EXPECT_EQ(pool->used_bytes(), used);
    for (int64_t t = 30; t < 40; ++t) {
      ASSERT_TRUE(again.append(t, hist.token(t), hist.token_flags(t)).ok());
    }
    expect_matches_model(again, hist, 40);
  }
  EXPECT_EQ(pool->used_bytes(), 0);
}

}  // namespace
}  // namespace kvgate::kvstore
