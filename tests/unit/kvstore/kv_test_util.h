// Helpers shared by the kvstore tests: random ragged block maps, random K/V
// (and gate state) histories, the rule table of DESIGN.md §4 applied
// directly to a full history (independently of CompressedKvCache's data
// structures), comparisons of two caches through their public views, and
// poisoned layer-major K/V for staged builds.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "engine/cpu/isa.h"
#include "engine/ggml_types.h"
#include "kvstore/attention.h"
#include "kvstore/block_map.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/layout.h"
#include "kvstore/page_pool.h"

namespace kvgate::kvstore::testing {

using engine::fp16_t;
using engine::fp16_to_fp32;
using engine::fp32_to_fp16;

// A page pool the test cannot run without (a failure is reported).
inline std::unique_ptr<PagePool> make_pool(int64_t page_bytes, int64_t capacity_bytes) {
  auto pool = PagePool::create(page_bytes, capacity_bytes);
  EXPECT_TRUE(pool.ok()) << pool.status().to_string();
  return std::move(pool).value();
}

// R of every (block, head) slot, in slot order (the footprint's input).
inline std::vector<int64_t> retained_counts(const CompressedKvCache& c) {
  std::vector<int64_t> r(c.layout().blocks.n_slots());
  for (size_t s = 0; s < r.size(); ++s) r[s] = c.retained_tokens(static_cast<int64_t>(s));
  return r;
}

// Every head cut into blocks at random points (each boundary with p = 0.4).
inline BlockMap random_block_map(int64_t n_layers, int64_t n_heads, std::mt19937& rng) {
  std::bernoulli_distribution cut(0.4);
  std::vector<std::vector<LayerBlock>> per_head(n_heads);
  for (auto& blocks : per_head) {
    int32_t first = 0;
    for (int32_t l = 1; l <= n_layers; ++l) {
      if (l == n_layers || cut(rng)) {
        blocks.push_back({first, l - first});
        first = l;
      }
    }
  }
  return *BlockMap::create(n_layers, per_head);
}

// gate_retained: KvLayout::gate_state_retained (gate context `cache` when
// true, `window` when false).
inline KvLayout make_layout(BlockMap map, int64_t head_dim, int64_t n_sink, int64_t n_window,
                            int64_t gate_bytes = 0, bool gate_retained = true) {
  KvLayout layout;
  layout.blocks = std::move(map);
  layout.head_dim = head_dim;
  layout.n_sink_tokens = n_sink;
  layout.n_window_tokens = n_window;
  layout.gate_state_bytes_per_token = gate_bytes;
  layout.gate_state_retained = gate_retained;
  return layout;
}

// Full K/V of every token, layer and head: [token][layer][head][d], fp16
// values uniform in [-1, 1]; gate flags [slot][token]; and, with gate
// state, every token's gate row per slot: [token][slot][gate_row_elems].
struct History {
  int64_t n_layers, n_heads, head_dim, n_tokens;
  std::vector<fp16_t> k, v;
  std::vector<uint8_t> flags;
  int64_t n_slots;
  int64_t gate_elems;
  std::vector<fp16_t> gate;

  History(const KvLayout& layout, int64_t tokens, double keep_p, std::mt19937& rng)
      : n_layers(layout.n_layers()),
        n_heads(layout.n_kv_heads()),
        head_dim(layout.head_dim),
        n_tokens(tokens),
        n_slots(layout.blocks.n_slots()),
        gate_elems(layout.gate_row_elems()) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    k.resize(tokens * n_layers * n_heads * head_dim);
    v.resize(k.size());
    for (auto& x : k) x = fp32_to_fp16(u(rng));
    for (auto& x : v) x = fp32_to_fp16(u(rng));
    std::bernoulli_distribution keep(keep_p);
    flags.resize(n_slots * tokens);
    for (auto& f : flags) f = keep(rng) ? 1 : 0;
    gate.resize(tokens * n_slots * gate_elems);
    for (auto& x : gate) x = fp32_to_fp16(u(rng));
  }

  const fp16_t* k_row(int64_t j, int64_t l, int64_t h) const {
    return k.data() + ((j * n_layers + l) * n_heads + h) * head_dim;
  }
  const fp16_t* v_row(int64_t j, int64_t l, int64_t h) const {
    return v.data() + ((j * n_layers + l) * n_heads + h) * head_dim;
  }
  const fp16_t* gate_row(int64_t j, int64_t slot) const {
    return gate.data() + (j * n_slots + slot) * gate_elems;
  }
  uint8_t flag(int64_t slot, int64_t j) const { return flags[slot * n_tokens + j]; }
  std::vector<uint8_t> token_flags(int64_t j) const {
    std::vector<uint8_t> f(n_slots);
    for (int64_t s = 0; s < n_slots; ++s) f[s] = flag(s, j);
    return f;
  }
  TokenKv token(int64_t j) const {
    TokenKv kv{k_row(j, 0, 0), v_row(j, 0, 0), n_heads * head_dim, head_dim};
    if (gate_elems > 0) {
      kv.gate = gate_row(j, 0);
      kv.gate_slot_stride = gate_elems;
    }
    return kv;
  }
  DenseKv dense() const {
    return {k.data(), v.data(), n_layers * n_heads * head_dim, n_heads * head_dim, head_dim};
  }
  // Empty without gate state (what build_from_dense expects then).
  DenseGate dense_gate() const {
    if (gate_elems == 0) return {};
    return {gate.data(), n_slots * gate_elems, gate_elems};
  }
  // Flags of the first t tokens only, [slot][t], for build_from_dense.
  std::vector<uint8_t> prefix_flags(int64_t t) const {
    std::vector<uint8_t> f(n_slots * t);
    for (int64_t s = 0; s < n_slots; ++s) {
      for (int64_t j = 0; j < t; ++j) f[s * t + j] = flag(s, j);
    }
    return f;
  }
};

// One (position, K row, V row) of the set a query attends to.
using Entry = std::tuple<int64_t, std::vector<fp16_t>, std::vector<fp16_t>>;

// DESIGN.md §4's table at length t for (layer, head): sinks and window with
// own-layer K/V; distant flag-1 tokens with the base layer's K and own V.
inline std::vector<Entry> rule_table_set(const KvLayout& layout, const History& hist, int64_t t,
                                         int64_t layer, int64_t head) {
  const int64_t d = layout.head_dim;
  const int64_t block = layout.blocks.block_index(layer, head);
  const int64_t slot = layout.blocks.slot(head, block);
  const int64_t base = layout.blocks.block(head, block).first_layer;
  std::vector<Entry> out;
  for (int64_t j = 0; j < t; ++j) {
    const bool proximal = j < layout.n_sink_tokens || j >= t - layout.n_window_tokens;
    int64_t key_layer;
    if (proximal) {
      key_layer = layer;
    } else if (hist.flag(slot, j)) {
      key_layer = base;
    } else {
      continue;
    }
    const fp16_t* kr = hist.k_row(j, key_layer, head);
    const fp16_t* vr = hist.v_row(j, layer, head);
    out.emplace_back(j, std::vector<fp16_t>(kr, kr + d), std::vector<fp16_t>(vr, vr + d));
  }
  return out;
}

// The same set read back from a cache (through its views and positions),
// sorted by position.
inline std::vector<Entry> cache_set(const CompressedKvCache& cache, int64_t layer, int64_t head) {
  const KvLayout& layout = cache.layout();
  const int64_t d = layout.head_dim;
  std::vector<Entry> out;
  const SegmentView near = *cache.proximal(layer, head);
  for (int64_t r = 0; r < near.n_tokens(); ++r) {
    out.emplace_back(cache.proximal_row_position(r),
                     std::vector<fp16_t>(near.k_row(r), near.k_row(r) + d),
                     std::vector<fp16_t>(near.v_row(r), near.v_row(r) + d));
  }
  const SegmentView far = *cache.distant(layer, head);
  const int64_t slot = layout.blocks.slot_of_layer(layer, head);
  for (int64_t i = 0; i < far.n_tokens(); ++i) {
    out.emplace_back(cache.retained_position(slot, i),
                     std::vector<fp16_t>(far.k_row(i), far.k_row(i) + d),
                     std::vector<fp16_t>(far.v_row(i), far.v_row(i) + d));
  }
  std::sort(out.begin(), out.end());
  return out;
}

// One (position, gate row) of a slot's gate state.
using GateEntry = std::pair<int64_t, std::vector<fp16_t>>;

// The gate rows slot `slot` must hold at length t: every proximal token's
// and, if the layout keeps gate rows of retained tokens, every distant
// flag-1 token's, by position.
inline std::vector<GateEntry> gate_model_set(const KvLayout& layout, const History& hist, int64_t t,
                                             int64_t slot) {
  std::vector<GateEntry> out;
  if (!layout.has_gate_state()) return out;  // the cache stores no gate rows then
  for (int64_t j = 0; j < t; ++j) {
    const bool proximal = j < layout.n_sink_tokens || j >= t - layout.n_window_tokens;
    if (!proximal && (!layout.gate_state_retained || !hist.flag(slot, j))) continue;
    const fp16_t* g = hist.gate_row(j, slot);
    out.emplace_back(j, std::vector<fp16_t>(g, g + hist.gate_elems));
  }
  return out;
}

// The same read back from a cache's gate views: proximal rows by
// proximal_row_position(), retained rows by retained_position() (which must
// come in increasing order), sorted by position.
inline std::vector<GateEntry> cache_gate_set(const CompressedKvCache& cache, int64_t slot) {
  const int64_t ge = cache.layout().gate_row_elems();
  std::vector<GateEntry> out;
  const bool gated = cache.layout().has_gate_state();
  const GateRowsView near = *cache.gate_proximal(slot);
  EXPECT_EQ(near.n_rows(), gated ? cache.proximal_tokens() : 0);
  EXPECT_EQ(near.row_elems(), ge);
  for (int64_t r = 0; r < near.n_rows(); ++r) {
    out.emplace_back(cache.proximal_row_position(r),
                     std::vector<fp16_t>(near.row(r), near.row(r) + ge));
  }
  const GateRowsView far = *cache.gate_distant(slot);
  EXPECT_EQ(far.n_rows(),
            gated && cache.layout().gate_state_retained ? cache.retained_tokens(slot) : 0);
  for (int64_t i = 0; i < far.n_rows(); ++i) {
    if (i > 0) {
      EXPECT_LT(cache.retained_position(slot, i - 1), cache.retained_position(slot, i));
    }
    out.emplace_back(cache.retained_position(slot, i),
                     std::vector<fp16_t>(far.row(i), far.row(i) + ge));
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Footprint formula written out again from DESIGN.md §4, counting R from the
// flags of the tokens that have left the window; gate bytes per (P + R),
// or per P when retained tokens keep no gate row.
inline int64_t formula_bytes(const KvLayout& layout, const History& hist, int64_t t) {
  const int64_t b = 2, d = layout.head_dim;
  const int64_t p = std::min(t, layout.n_sink_tokens + layout.n_window_tokens);
  int64_t kv = 0, pos = 0, gate = 0;
  for (int64_t h = 0; h < layout.n_kv_heads(); ++h) {
    for (int64_t blk = 0; blk < layout.blocks.n_blocks(h); ++blk) {
      const int64_t g = layout.blocks.block(h, blk).n_layers;
      const int64_t slot = layout.blocks.slot(h, blk);
      int64_t r = 0;
      for (int64_t j = layout.n_sink_tokens; j < t - layout.n_window_tokens; ++j) {
        r += hist.flag(slot, j);
      }
      kv += b * d * (2 * g * p + (g + 1) * r);
      pos += 4 * r;
      gate += layout.gate_state_bytes_per_token * (p + (layout.gate_state_retained ? r : 0));
    }
  }
  return kv + pos + gate;
}

// ---- Comparing two caches through their public views. ----

inline void expect_same_state(const CompressedKvCache& a, const CompressedKvCache& b) {
  const KvLayout& layout = a.layout();
  const int64_t d = layout.head_dim;
  ASSERT_EQ(a.n_tokens(), b.n_tokens());
  ASSERT_EQ(retained_counts(a), retained_counts(b));
  EXPECT_EQ(a.bytes(), b.bytes());
  EXPECT_EQ(a.capacity_bytes(), b.capacity_bytes());
  EXPECT_EQ(a.n_pages(), b.n_pages());
  for (int64_t r = 0; r < a.proximal_tokens(); ++r) {
    EXPECT_EQ(a.proximal_row_position(r), b.proximal_row_position(r));
  }
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    for (int64_t h = 0; h < layout.n_kv_heads(); ++h) {
      for (auto seg : {std::make_pair(*a.proximal(l, h), *b.proximal(l, h)),
                       std::make_pair(*a.distant(l, h), *b.distant(l, h))}) {
        ASSERT_EQ(seg.first.n_tokens(), seg.second.n_tokens());
        for (int64_t r = 0; r < seg.first.n_tokens(); ++r) {
          ASSERT_EQ(std::memcmp(seg.first.k_row(r), seg.second.k_row(r), 2 * d), 0)
              << "K row " << r << " layer " << l << " head " << h;
          ASSERT_EQ(std::memcmp(seg.first.v_row(r), seg.second.v_row(r), 2 * d), 0)
              << "V row " << r << " layer " << l << " head " << h;
        }
      }
    }
  }
  const int64_t ge = layout.gate_row_elems();
  for (int64_t s = 0; s < layout.blocks.n_slots(); ++s) {
    for (int64_t i = 0; i < a.retained_tokens(s); ++i) {
      ASSERT_EQ(a.retained_position(s, i), b.retained_position(s, i)) << "slot " << s;
    }
    for (auto g : {std::make_pair(*a.gate_proximal(s), *b.gate_proximal(s)),
                   std::make_pair(*a.gate_distant(s), *b.gate_distant(s))}) {
      ASSERT_EQ(g.first.n_rows(), g.second.n_rows());
      for (int64_t r = 0; r < g.first.n_rows(); ++r) {
        ASSERT_EQ(std::memcmp(g.first.row(r), g.second.row(r), 2 * ge), 0) << "gate row " << r;
      }
    }
  }
}

// Attention of random queries at every layer gives bit-identical outputs.
inline void expect_same_attention(const CompressedKvCache& a, const CompressedKvCache& b,
                                  std::mt19937& rng) {
  if (a.n_tokens() == 0) return;
  const KvLayout& layout = a.layout();
  const int64_t d = layout.head_dim;
  const int64_t n_q = 2 * layout.n_kv_heads();
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> q(n_q * d), qb(n_q * d), out_a(n_q * d), out_b(n_q * d);
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    for (auto& x : q) x = u(rng);
    for (auto& x : qb) x = u(rng);
    const auto isa = engine::cpu::best_isa();
    ASSERT_TRUE(attend_layer(a, l, n_q, q.data(), qb.data(), out_a.data(), isa).ok());
    ASSERT_TRUE(attend_layer(b, l, n_q, q.data(), qb.data(), out_b.data(), isa).ok());
    ASSERT_EQ(std::memcmp(out_a.data(), out_b.data(), out_a.size() * sizeof(float)), 0)
        << "layer " << l;
  }
}

// Appends token j of `hist` to `c`; mode 0: flags given, 1: deferred then
// set_flags, 2: deferred and never given (dropped when it leaves).
inline void append_token(CompressedKvCache& c, const History& hist, int64_t j, int mode) {
  const std::vector<uint8_t> flags = hist.token_flags(j);
  if (mode == 0) {
    ASSERT_TRUE(c.append(j, hist.token(j), flags).ok());
    return;
  }
  ASSERT_TRUE(c.append(j, hist.token(j), {}).ok());
  if (mode == 1) {
    ASSERT_TRUE(c.set_flags(j, flags).ok());
  }
}

// ---- Staged builds (CompressedKvCache::begin_build / fill_slot). ----

// An fp16 NaN with a payload: a row that must not be read. Any row of it
// that reaches a cache shows up in a byte comparison (and in attention).
inline constexpr fp16_t kPoison = 0x7E5A;

// The first n_tokens tokens of a history laid out layer-major, as a
// layer-by-layer prefill holds them: K/V [layer][head][token][d], gate rows
// [slot][token][elems]. Rows for which keep_kv(layer, head) (gate rows:
// keep_gate(slot)) is false hold kPoison: K/V not computed yet, or of
// other slots, which fill_slot must not read.
struct LayerMajorKv {
  int64_t n_layers = 0, n_heads = 0, head_dim = 0, n_tokens = 0, gate_elems = 0;
  std::vector<fp16_t> k, v, gate;

  template <typename KeepKv, typename KeepGate>
  LayerMajorKv(const History& hist, int64_t tokens, KeepKv keep_kv, KeepGate keep_gate)
      : n_layers(hist.n_layers),
        n_heads(hist.n_heads),
        head_dim(hist.head_dim),
        n_tokens(tokens),
        gate_elems(hist.gate_elems) {
    k.assign(n_layers * n_heads * n_tokens * head_dim, kPoison);
    v.assign(k.size(), kPoison);
    for (int64_t l = 0; l < n_layers; ++l) {
      for (int64_t h = 0; h < n_heads; ++h) {
        if (!keep_kv(l, h)) continue;
        for (int64_t j = 0; j < n_tokens; ++j) {
          const int64_t at = ((l * n_heads + h) * n_tokens + j) * head_dim;
          std::copy_n(hist.k_row(j, l, h), head_dim, k.begin() + at);
          std::copy_n(hist.v_row(j, l, h), head_dim, v.begin() + at);
        }
      }
    }
    gate.assign(hist.n_slots * n_tokens * gate_elems, kPoison);
    for (int64_t s = 0; s < hist.n_slots; ++s) {
      if (!keep_gate(s)) continue;
      for (int64_t j = 0; j < n_tokens; ++j) {
        std::copy_n(hist.gate_row(j, s), gate_elems,
                    gate.begin() + (s * n_tokens + j) * gate_elems);
      }
    }
  }
  DenseKv dense() const {
    return {k.data(), v.data(), head_dim, n_heads * n_tokens * head_dim, n_tokens * head_dim};
  }
  DenseGate dense_gate() const {
    if (gate_elems == 0) return {};
    return {gate.data(), gate_elems, n_tokens * gate_elems};
  }
};

// What fill_slot(slot) may read: only the slot's layers and head, and its
// gate rows; everything else poisoned.
inline LayerMajorKv slot_only_kv(const KvLayout& layout, const History& hist, int64_t n_tokens,
                                 int64_t slot) {
  const LayerBlock blk = layout.blocks.slot_block(slot);
  const int64_t head = layout.blocks.slot_head(slot);
  return LayerMajorKv(
      hist, n_tokens,
      [&](int64_t l, int64_t h) {
        return h == head && l >= blk.first_layer && l < blk.end_layer();
      },
      [&](int64_t s) { return s == slot; });
}

// Slot s's flags of the first t tokens ([t] of hist.prefix_flags(t)).
inline std::vector<uint8_t> slot_flags(const History& hist, int64_t slot, int64_t t) {
  std::vector<uint8_t> f(t);
  for (int64_t j = 0; j < t; ++j) f[j] = hist.flag(slot, j);
  return f;
}

}  // namespace kvgate::kvstore::testing
