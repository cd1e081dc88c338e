// Byte footprint of a request's compressed KV cache (DESIGN.md §4) and its
// prediction before prefill (used for placement, §7); and the page-granular
// form of both: how pages are cut for a layout (PageGeometry) and the bytes
// of the pages a cache of a given state holds (what a decode node must
// reserve, predict_capacity_bytes).
//
// For each KV head h and block of g layers with R retained distant tokens,
// and P = min(t, n_sink + n_window) proximal tokens at length t:
//
//   kv_bytes       = b·d · Σ_h Σ_blocks (2·g·P + (g + 1)·R)
//   position_bytes = 4 · Σ_h Σ_blocks R
//   gate_bytes     = gate_state_bytes_per_token · Σ_h Σ_blocks (P + R)
//                    (gate_state_retained: gate context `cache`), or
//                  = gate_state_bytes_per_token · Σ_h Σ_blocks P
//                    (not retained: context `window`)
//
// 2·g·P: own-layer K and V of every proximal token in every layer of the
// block; (g + 1)·R: one base-layer K plus g per-layer V per retained token;
// the gate's row of each proximal token and, if its context covers them,
// of each retained one.
// CompressedKvCache::bytes() equals total_bytes() of footprint() for its
// state, exactly; kvstore allocates (page-granular) at least this much:
// CompressedKvCache::capacity_bytes() equals state_capacity_bytes() of its
// state, exactly.
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

// How pages of `page_bytes` are cut for a layout. Every K/V list (a ring
// of one (layer, head), a retained K or V list of one slot) packs
// page_tokens rows per page, positions packed positions_per_page per page,
// gate rows gate_rows_per_page per page; a list of n entries holds
// ceil(n / per_page) pages (none when empty). A slot's retained list has
// gate row pages only if the layout keeps gate rows of retained tokens
// (retained_gate_rows_per_page > 0). CompressedKvCache stores by this
// geometry; the capacity functions and the wire image count by it.
struct PageGeometry {
  int64_t page_bytes = 0;
  int64_t page_tokens = 0;         // K or V rows: page_bytes / (2·head_dim)
  int64_t positions_per_page = 0;  // page_bytes / 4
  int64_t gate_rows_per_page = 0;  // page_bytes / gate bytes per token; 0 without gate state
  // gate_rows_per_page if retained tokens keep their gate rows
  // (KvLayout::gate_state_retained), else 0.
  int64_t retained_gate_rows_per_page = 0;

  static int64_t pages_for(int64_t n, int64_t per_page) { return (n + per_page - 1) / per_page; }
  // Pages of one (layer, head) K (or V) ring holding p proximal rows.
  int64_t ring_pages(int64_t p) const { return pages_for(p, page_tokens); }
  // Pages of one slot's gate ring holding p rows (0 without gate state).
  int64_t gate_ring_pages(int64_t p) const {
    return gate_rows_per_page > 0 ? pages_for(p, gate_rows_per_page) : 0;
  }
  // Pages of one slot's retained gate rows for r tokens (0 when retained
  // tokens keep no gate row).
  int64_t retained_gate_pages(int64_t r) const {
    return retained_gate_rows_per_page > 0 ? pages_for(r, retained_gate_rows_per_page) : 0;
  }
  // Pages of one slot's retained list of r tokens in a block of g layers:
  // base K, g V lists, positions, gate rows.
  int64_t retained_pages(int64_t r, int64_t g) const {
    return pages_for(r, page_tokens) * (1 + g) + pages_for(r, positions_per_page) +
           retained_gate_pages(r);
  }
};

// The geometry of `page_bytes` for a valid layout. INVALID_ARGUMENT (naming
// the sizes) unless page_bytes is positive and a whole number of K/V rows
// (2·head_dim bytes), of positions (4 bytes) and, with gate state, of gate
// rows (gate_state_bytes_per_token).
Result<PageGeometry> page_geometry(const KvLayout& layout, int64_t page_bytes);

// Pages a CompressedKvCache holds at length n_tokens with retained_tokens
// [slot] = R per (block, head) slot: 2·L·H rings of ceil(P / page_tokens)
// pages, n_slots gate rings, and each slot's retained pages (gate row
// pages only with gate_state_retained). Exactly
// capacity_bytes() / page_bytes of such a cache (however it got there:
// appends, build_from_dense, adopt_wire_image), and the length of its wire
// image. Errors: those of footprint() and page_geometry().
Result<int64_t> state_pages(const KvLayout& layout, int64_t page_bytes, int64_t n_tokens,
                            std::span<const int64_t> retained_tokens);
// state_pages() * page_bytes.
Result<int64_t> state_capacity_bytes(const KvLayout& layout, int64_t page_bytes, int64_t n_tokens,
                                     std::span<const int64_t> retained_tokens);

// Bytes of the pages a request's cache holds at its final length t =
// prompt + max_new, with the retained counts of predict_footprint()
// (keep-rate or budget form): what the coordinator reserves on a decode
// node (DESIGN.md §7, docs/cluster.md). A cache never frees a page while it
// lives (rings and lists only grow), so its pages at t bound its pages at
// every earlier length, and this equals capacity_bytes() of the real cache
// at t whenever its retained counts are the predicted ones. Errors: those
// of predict_footprint() and page_geometry().
Result<int64_t> predict_capacity_bytes(const KvLayout& layout, int64_t page_bytes,
                                       int64_t prompt_tokens, int64_t max_new_tokens,
                                       double keep_rate);
Result<int64_t> predict_capacity_bytes(const KvLayout& layout, int64_t page_bytes,
                                       int64_t prompt_tokens, int64_t max_new_tokens,
                                       std::span<const int64_t> budget_tokens);

}  // namespace kvgate::kvstore
