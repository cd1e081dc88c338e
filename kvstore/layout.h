// KvLayout: the parameters of the compressed KV layout of one model
// (DESIGN.md §4): which tokens are proximal (the first n_sink and the last
// n_window), how layers are grouped into blocks per KV head, and the shape
// and element size of a K/V row, and the gate's own state per token.
// Shared by the footprint formula, the per-request cache and the wire
// descriptor.
//
// A plain value; immutable once validated; safe to share between threads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/status.h"
#include "kvstore/block_map.h"

namespace kvgate::kvstore {

// K and V are stored as fp16 on every backend (the wire image is
// backend-neutral), so the element size is fixed.
inline constexpr int64_t kKvElementBytes = 2;
// Bytes of one retained token's position (int32).
inline constexpr int64_t kPositionBytes = 4;
// Largest head_dim the kernels take (stack scratch, no allocation per call);
// every Llama-family model is well below it.
inline constexpr int64_t kMaxHeadDim = 256;
// Positions are stored as int32 and never re-indexed.
inline constexpr int64_t kMaxTokens = int64_t{1} << 31;
// The gate's own K/V state is fp16 too.
inline constexpr int64_t kGateElementBytes = 2;

struct KvLayout {
  BlockMap blocks;                       // defines n_layers and n_kv_heads
  int64_t head_dim = 0;                  // d
  int64_t n_sink_tokens = 0;             // attention sinks: tokens [0, n_sink) never leave
  int64_t n_window_tokens = 1;           // the last n_window tokens are proximal
  int64_t elem_bytes = kKvElementBytes;  // b
  // Bytes of gate state per (block, head) per proximal token, and per
  // retained token when gate_state_retained (the gate keeps its own K/V
  // only for the tokens its context covers, DESIGN.md §4): one row of
  // gate_row_elems() fp16 values (the gate's K then V; kvstore does not
  // interpret it). 0 for gates without state (linear kind); counted by the
  // footprint formula and the predictor, stored by CompressedKvCache.
  int64_t gate_state_bytes_per_token = 0;
  // Whether a retained distant token keeps its gate row (gate context
  // `cache`: a new token's gate attends over sinks, window and retained
  // tokens) or the row is dropped when the token leaves the window (context
  // `window`: the gate attends over sinks and window only, so no gate state
  // outlives the window). No effect without gate state.
  bool gate_state_retained = true;

  int64_t n_layers() const { return blocks.n_layers(); }
  int64_t n_kv_heads() const { return blocks.n_kv_heads(); }
  int64_t n_proximal_capacity() const { return n_sink_tokens + n_window_tokens; }
  // Proximal (sink or window) tokens at length t: min(t, n_sink + n_window).
  int64_t proximal_tokens(int64_t n_tokens) const {
    return std::min(n_tokens, n_proximal_capacity());
  }
  // Distant tokens at length t: those neither sink nor in the window.
  int64_t distant_tokens(int64_t n_tokens) const { return n_tokens - proximal_tokens(n_tokens); }
  // fp16 values in one gate state row (0 without gate state).
  int64_t gate_row_elems() const { return gate_state_bytes_per_token / kGateElementBytes; }
  bool has_gate_state() const { return gate_state_bytes_per_token > 0; }
  // Gate state bytes per retained token and slot: gate_state_bytes_per_token
  // if retained tokens keep their gate rows, else 0.
  int64_t retained_gate_bytes_per_token() const {
    return gate_state_retained ? gate_state_bytes_per_token : 0;
  }
};

// head_dim in [1, kMaxHeadDim], n_sink >= 0, n_window >= 1 (the newest token
// must meet its own key at every layer), elem_bytes == 2, gate bytes >= 0
// and even (whole fp16 values).
// The error names the field.
Status validate_layout(const KvLayout& layout);

}  // namespace kvgate::kvstore
