// CompressedKvCache: one request's KV cache in the block-gated PoD layout
// (DESIGN.md §4, §5), stored in pages of a PagePool.
//
// Storage:
//   - per (layer, KV head), a ring of n_sink + n_window rows holding the
//     own-layer K and V of proximal tokens: sinks in rows [0, n_sink), the
//     window in rows [n_sink, n_sink + n_window), token j >= n_sink at row
//     n_sink + (j - n_sink) % n_window (so after the window wraps, rows are
//     not in position order; attention does not care);
//   - per (block, KV head) slot, a list of retained distant tokens holding
//     the base layer's K, every block layer's V (g lists) and the token
//     positions (int32), in append order (increasing position).
// Every K/V list is a sequence of pages of page_tokens() rows of head_dim
// fp16 each (page_tokens = page_bytes / (2·head_dim)); positions are packed
// page_bytes / 4 per page.
//
// Eviction is deferred: a token's flags (one per slot) are given when it is
// appended and applied when it leaves the window: flag 1 moves the
// base-layer key and every layer's value into the slot's retained list,
// flag 0 drops them. Sinks never leave. Positions are never re-indexed.
//
// bytes() equals the footprint formula (kvstore/footprint.h) for the current
// state exactly; capacity_bytes() is what the pages hold (>= bytes()).
//
// Threading: one owner thread (the engine loop), the same one that owns the
// pool. Views returned by proximal()/distant() stay valid until the next
// append() or the cache's destruction. Destruction returns every page.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/ggml_types.h"
#include "kvstore/footprint.h"
#include "kvstore/layout.h"
#include "kvstore/page_pool.h"

namespace kvgate::kvstore {

using engine::fp16_t;

// One new token's K and V rows for every (layer, KV head): the row of
// (l, h) starts at k + l * layer_stride + h * head_stride (in elements);
// V likewise from v. Each row is head_dim contiguous fp16 values.
struct TokenKv {
  const fp16_t* k = nullptr;
  const fp16_t* v = nullptr;
  int64_t layer_stride = 0;
  int64_t head_stride = 0;
};

// K and V of a run of tokens for every (layer, KV head): token j's row of
// (l, h) starts at k + j * token_stride + l * layer_stride + h * head_stride.
// Covers [token][layer][head][d] and [layer][head][token][d] layouts alike.
struct DenseKv {
  const fp16_t* k = nullptr;
  const fp16_t* v = nullptr;
  int64_t token_stride = 0;
  int64_t layer_stride = 0;
  int64_t head_stride = 0;
};

// One page's share of a segment: n_tokens rows of K and the matching rows of
// V, each row head_dim contiguous fp16 (row stride = head_dim).
struct KvPageSpan {
  const fp16_t* k = nullptr;
  const fp16_t* v = nullptr;
  int64_t n_tokens = 0;
};

// A segment (proximal or distant) of one (layer, head) as page spans, for
// kernels to iterate without copying. Cheap to copy; borrows the cache.
class SegmentView {
 public:
  SegmentView(const PagePool* pool, const PageId* k_ids, const PageId* v_ids, int64_t id_stride,
              int64_t n_tokens, int64_t page_tokens, int64_t head_dim)
      : pool_(pool),
        k_ids_(k_ids),
        v_ids_(v_ids),
        id_stride_(id_stride),
        n_tokens_(n_tokens),
        page_tokens_(page_tokens),
        head_dim_(head_dim) {}

  int64_t n_tokens() const { return n_tokens_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t n_pages() const { return (n_tokens_ + page_tokens_ - 1) / page_tokens_; }
  // Page i in [0, n_pages()).
  KvPageSpan page(int64_t i) const {
    return {reinterpret_cast<const fp16_t*>(pool_->data(k_ids_[i * id_stride_])),
            reinterpret_cast<const fp16_t*>(pool_->data(v_ids_[i * id_stride_])),
            std::min(page_tokens_, n_tokens_ - i * page_tokens_)};
  }
  // Row r in [0, n_tokens()).
  const fp16_t* k_row(int64_t r) const {
    return page(r / page_tokens_).k + (r % page_tokens_) * head_dim_;
  }
  const fp16_t* v_row(int64_t r) const {
    return page(r / page_tokens_).v + (r % page_tokens_) * head_dim_;
  }

 private:
  const PagePool* pool_;
  const PageId* k_ids_;
  const PageId* v_ids_;
  int64_t id_stride_;
  int64_t n_tokens_;
  int64_t page_tokens_;
  int64_t head_dim_;
};

class CompressedKvCache {
 public:
  // An empty cache (no tokens, no pages). Errors: invalid layout, a pool
  // whose page_bytes is not a multiple of 2·head_dim, gate state bytes > 0
  // (UNIMPLEMENTED: gate state is not stored here yet). `pool` must outlive
  // the cache.
  static Result<CompressedKvCache> create(const KvLayout& layout, PagePool* pool);

  // The state reached by appending tokens 0..n_tokens-1 one at a time, built
  // in one pass (prefill). flags[slot * n_tokens + j] is token j's flag for
  // (block, head) slot `slot`. Errors as for append(); on error no page
  // stays allocated.
  static Result<CompressedKvCache> build_from_dense(const KvLayout& layout, PagePool* pool,
                                                    int64_t n_tokens, const DenseKv& kv,
                                                    std::span<const uint8_t> flags);

  CompressedKvCache(CompressedKvCache&& other) noexcept;
  CompressedKvCache& operator=(CompressedKvCache&& other) noexcept;
  CompressedKvCache(const CompressedKvCache&) = delete;
  CompressedKvCache& operator=(const CompressedKvCache&) = delete;
  ~CompressedKvCache();

  // Appends the token at `position`, which must equal n_tokens(). flags has
  // n_slots() entries, each 0 or 1 (ignored for sinks, which never leave).
  // If a token leaves the window, its flags are applied now. Errors:
  // INVALID_ARGUMENT (position, flags, null rows), RESOURCE_EXHAUSTED (the
  // pool lacks the pages: the cache is unchanged). Does not block.
  Status append(int64_t position, const TokenKv& kv, std::span<const uint8_t> flags);

  // Two-phase append for a forward pass that computes K/V layer by layer:
  // begin_append() applies the leaving token's flags and claims the new
  // token's ring row (same checks and errors as append(); on error nothing
  // changes); then new_k_row()/new_v_row() give that row of each (layer,
  // head) to write. Until a layer's rows are written its content is stale,
  // so attention at layer l must come after writing layer l.
  Status begin_append(int64_t position, std::span<const uint8_t> flags);
  fp16_t* new_k_row(int64_t layer, int64_t head);
  fp16_t* new_v_row(int64_t layer, int64_t head);

  // Proximal segment of (layer, head): own-layer K and V of the sinks and
  // the window, in ring-row order. OUT_OF_RANGE for a bad layer or head.
  Result<SegmentView> proximal(int64_t layer, int64_t head) const;
  // Distant segment of (layer, head): retained tokens of the block holding
  // `layer`, with the base layer's K and layer `layer`'s V.
  Result<SegmentView> distant(int64_t layer, int64_t head) const;
  // Position of the token in proximal ring row `row` (< proximal_tokens()).
  int64_t proximal_row_position(int64_t row) const;
  // Position of the i-th retained token of `slot` (i < retained_tokens(slot)).
  int32_t retained_position(int64_t slot, int64_t i) const;

  const KvLayout& layout() const { return layout_; }
  int64_t n_tokens() const { return n_tokens_; }
  int64_t page_tokens() const { return page_tokens_; }
  int64_t proximal_tokens() const { return layout_.proximal_tokens(n_tokens_); }
  // R of a (block, head) slot; slot in [0, n_slots()).
  int64_t retained_tokens(int64_t slot) const { return distant_[slot].n_tokens; }

  // The formula of kvstore/footprint.h for the current state.
  Footprint footprint() const;
  int64_t bytes() const { return footprint().total_bytes(); }
  // Bytes of the pages this cache holds (page-granular, >= bytes()).
  int64_t capacity_bytes() const { return n_pages_held_ * pool_->page_bytes(); }

 private:
  // Retained distant tokens of one (block, head) slot.
  struct DistantList {
    std::vector<PageId> k_pages;               // base-layer keys
    std::vector<std::vector<PageId>> v_pages;  // [layer in block][page]
    std::vector<PageId> pos_pages;             // int32 positions
    int64_t n_tokens = 0;
  };

  CompressedKvCache(const KvLayout& layout, PagePool* pool, int64_t page_tokens);

  // flags holds n_slots() x n_tokens entries, each 0 or 1.
  Status validate_flags(std::span<const uint8_t> flags, int64_t n_tokens) const;
  Status check_layer_head(int64_t layer, int64_t head) const;
  // Ring row of the token at `position` while it is proximal.
  int64_t ring_row(int64_t position) const;
  // Pages needed to retain one more token in `slot`.
  int64_t retain_pages_needed(int64_t slot) const;
  // The helpers below take pages without checking: callers have made sure
  // the pool has them (so a failure never leaves half a token behind).
  // Adds one page to every (layer, head) ring, K and V.
  void grow_ring();
  fp16_t* ring_row_ptr(std::vector<PageId>& pages, int64_t layer, int64_t head, int64_t row);
  // Appends one retained token to `slot`: base-layer K row from k_base(),
  // V row of block layer i from v_of_layer(i), and its position.
  template <typename KRowFn, typename VRowFn>
  void retain(int64_t slot, KRowFn k_base, VRowFn v_of_layer, int64_t position);
  PageId take_page();
  void release();

  KvLayout layout_;
  PagePool* pool_ = nullptr;  // null once moved from
  int64_t page_tokens_ = 0;
  int64_t positions_per_page_ = 0;
  int64_t n_tokens_ = 0;
  int64_t n_pages_held_ = 0;
  int64_t n_ring_pages_ = 0;  // per (layer, head), same for all
  // Ring pages, [page][layer][head]: growing by one page round appends
  // n_layers * n_kv_heads ids.
  std::vector<PageId> ring_k_pages_;
  std::vector<PageId> ring_v_pages_;
  std::vector<DistantList> distant_;  // by slot
  // Flags of the tokens now in the window, [window row][slot], applied when
  // the token leaves.
  std::vector<uint8_t> pending_flags_;
};

}  // namespace kvgate::kvstore
