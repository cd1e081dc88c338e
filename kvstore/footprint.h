// Byte footprint of a request's compressed KV cache (DESIGN.md §4) and its
// prediction before prefill (used for placement, §7).
//
// For each KV head h and block of g layers with R retained distant tokens,
// and P = min(t, n_sink + n_window) proximal tokens at length t:
//
//   kv_bytes       = b·d · Σ_h Σ_blocks (2·g·P + (g + 1)·R)
//   position_bytes = 4 · Σ_h Σ_blocks R
//   gate_bytes     = gate_state_bytes_per_token · Σ_h Σ_blocks (P + R)
//
// 2·g·P: own-layer K and V of every proximal token in every layer of the
// block; (g + 1)·R: one base-layer K plus g per-layer V per retained token.
// CompressedKvCache::bytes() equals total_bytes() of footprint() for its
// state, exactly; kvstore allocates (page-granular) at least this much.
//
// Pure functions; thread-safe; no allocation.
#pragma once

#include <cstdint>
#include <span>

#include "common/status.h"
#include "kvstore/layout.h"

namespace kvgate::kvstore {

struct Footprint {
  int64_t kv_bytes = 0;
  int64_t position_bytes = 0;
  int64_t gate_bytes = 0;

  int64_t total_bytes() const { return kv_bytes + position_bytes + gate_bytes; }
  bool operator==(const Footprint&) const = default;
};

// Footprint at length n_tokens with retained_tokens[slot] = R of each
// (block, head) slot (BlockMap slot order). Errors: invalid layout, n_tokens
// out of [0, kMaxTokens], wrong array size, R < 0 or R > distant tokens.
Result<Footprint> footprint(const KvLayout& layout, int64_t n_tokens,
                            std::span<const int64_t> retained_tokens);

// Bytes of a dense fp16 cache of n_tokens: 2·L·H·d·b·t (K and V, every
// layer and head, every token).
int64_t dense_bytes(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim, int64_t elem_bytes,
                    int64_t n_tokens);
inline int64_t dense_bytes(const KvLayout& layout, int64_t n_tokens) {
  return dense_bytes(layout.n_layers(), layout.n_kv_heads(), layout.head_dim, layout.elem_bytes,
                     n_tokens);
}

// Retained tokens predicted from a keep-rate: ceil(keep_rate · distant),
// where a product within 1e-9 of an integer counts as that integer (so
// 0.3 · 10 gives 3, not 4, despite binary rounding).
int64_t retained_for_keep_rate(double keep_rate, int64_t distant_tokens);

// Predicted footprint at the final length t = prompt + max_new (the largest
// the request can reach; the footprint never shrinks as t grows).
// Keep-rate form: every (block, head) keeps retained_for_keep_rate(rate,
// distant(t)) tokens; keep_rate in [0, 1].
Result<Footprint> predict_footprint(const KvLayout& layout, int64_t prompt_tokens,
                                    int64_t max_new_tokens, double keep_rate);
// Budget form (exact): slot s keeps min(budget_tokens[s], distant(t))
// tokens — a budget policy keeps at most its budget, and never more tokens
// than are distant. budget_tokens has n_slots() entries, each >= 0.
Result<Footprint> predict_footprint(const KvLayout& layout, int64_t prompt_tokens,
                                    int64_t max_new_tokens, std::span<const int64_t> budget_tokens);

// total_bytes() of the predictions above.
Result<int64_t> predict_bytes(const KvLayout& layout, int64_t prompt_tokens, int64_t max_new_tokens,
                              double keep_rate);
Result<int64_t> predict_bytes(const KvLayout& layout, int64_t prompt_tokens, int64_t max_new_tokens,
                              std::span<const int64_t> budget_tokens);

}  // namespace kvgate::kvstore
