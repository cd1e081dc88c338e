// CompressedKvCache: one request's KV cache in the block-gated PoD layout
// (DESIGN.md §4, §5), stored in pages of a PageSource (a PagePool, or a
// request's lease on one: LeasePages).
//
// Storage:
//   - per (layer, KV head), a ring of n_sink + n_window rows holding the
//     own-layer K and V of proximal tokens: sinks in rows [0, n_sink), the
//     window in rows [n_sink, n_sink + n_window), token j >= n_sink at row
//     n_sink + (j - n_sink) % n_window (so after the window wraps, rows are
//     not in position order; attention does not care);
//   - per (block, KV head) slot, a list of retained distant tokens holding
//     the base layer's K, every block layer's V (g lists) and the token
//     positions (int32), in append order (increasing position);
//   - with gate state (layout.gate_state_bytes_per_token > 0), per slot a
//     ring of gate rows for the proximal tokens (same ring-row mapping as
//     the K/V rings) and, if layout.gate_state_retained (gate context
//     `cache`), a list of gate rows of the retained tokens (same order as
//     the slot's retained K/V and positions). A gate row is
//     gate_row_elems() fp16 values, opaque to the cache.
// Every K/V list is a sequence of pages of page_tokens() rows of head_dim
// fp16 each (page_tokens = page_bytes / (2·head_dim)); positions are packed
// page_bytes / 4 per page; gate rows gate_rows_per_page() per page (the
// PageGeometry of kvstore/footprint.h). All pages come from the one page
// source; capacity_bytes() equals state_capacity_bytes() of the state.
//
// Eviction is deferred: a token's flags (one per slot) are given when it is
// appended, or later through set_flags() while it is in the window, and
// applied when it leaves the window: flag 1 moves the base-layer key, every
// layer's value and the slot's gate row (dropped instead without
// gate_state_retained) into the slot's retained list, flag 0 drops them. A token whose flags were never given is dropped
// (flag 0) in every slot. Sinks never leave. Positions are never
// re-indexed.
//
// bytes() equals the footprint formula (kvstore/footprint.h) for the current
// state exactly; capacity_bytes() is what the pages hold (>= bytes()).
//
// A cache can also be made from a wire image (kvstore/wire_image.h): the
// pages a prefill node's cache held, landed in a decode node's lease, are
// adopted in place and continue exactly as the exported cache would have.
//
// Threading: one owner thread (the engine loop), the same one that owns the
// page source. Views returned by proximal()/distant()/gate_proximal()/
// gate_distant() stay valid until the next append()/begin_append() or the
// cache's destruction. Destruction returns every page.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
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
// With gate state, slot s's gate row starts at gate + s * gate_slot_stride
// (gate_row_elems() contiguous fp16); gate must be null without it.
struct TokenKv {
  const fp16_t* k = nullptr;
  const fp16_t* v = nullptr;
  int64_t layer_stride = 0;
  int64_t head_stride = 0;
  const fp16_t* gate = nullptr;
  int64_t gate_slot_stride = 0;
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

// Gate state rows of a run of tokens for every (block, head) slot: token
// j's row of slot s starts at rows + j * token_stride + s * slot_stride (in
// elements), gate_row_elems() contiguous fp16 values.
struct DenseGate {
  const fp16_t* rows = nullptr;
  int64_t token_stride = 0;
  int64_t slot_stride = 0;
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
// page() resolves one page through the page source (one indirect call per
// page, not per row, in the kernels).
class SegmentView {
 public:
  SegmentView(const PageSource* pool, const PageId* k_ids, const PageId* v_ids, int64_t id_stride,
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
  const PageSource* pool_;
  const PageId* k_ids_;
  const PageId* v_ids_;
  int64_t id_stride_;
  int64_t n_tokens_;
  int64_t page_tokens_;
  int64_t head_dim_;
};

// One page's share of a run of gate rows: n_rows rows of row_elems fp16
// each, contiguous (row stride = row_elems).
struct GatePageSpan {
  const fp16_t* rows = nullptr;
  int64_t n_rows = 0;
};

// Gate state rows of one (block, head) slot (its proximal ring or its
// retained list), for the gate to iterate without copying. Cheap to copy;
// borrows the cache. Empty (0 rows) for a layout without gate state.
class GateRowsView {
 public:
  GateRowsView() = default;
  GateRowsView(const PageSource* pool, const PageId* ids, int64_t id_stride, int64_t n_rows,
               int64_t rows_per_page, int64_t row_elems)
      : pool_(pool),
        ids_(ids),
        id_stride_(id_stride),
        n_rows_(n_rows),
        rows_per_page_(rows_per_page),
        row_elems_(row_elems) {}

  int64_t n_rows() const { return n_rows_; }
  int64_t row_elems() const { return row_elems_; }
  int64_t n_pages() const {
    return n_rows_ == 0 ? 0 : (n_rows_ + rows_per_page_ - 1) / rows_per_page_;
  }
  // Page i in [0, n_pages()).
  GatePageSpan page(int64_t i) const {
    return {reinterpret_cast<const fp16_t*>(pool_->data(ids_[i * id_stride_])),
            std::min(rows_per_page_, n_rows_ - i * rows_per_page_)};
  }
  // Row r in [0, n_rows()).
  const fp16_t* row(int64_t r) const {
    return page(r / rows_per_page_).rows + (r % rows_per_page_) * row_elems_;
  }

 private:
  const PageSource* pool_ = nullptr;
  const PageId* ids_ = nullptr;
  int64_t id_stride_ = 0;
  int64_t n_rows_ = 0;
  int64_t rows_per_page_ = 1;
  int64_t row_elems_ = 0;
};

class CompressedKvCache {
 public:
  // An empty cache (no tokens, no pages). Errors (INVALID_ARGUMENT):
  // invalid layout, no page source, a page size that page_geometry()
  // rejects (not whole K/V rows, positions or gate rows). `pool` (a
  // PagePool, or a LeasePages to draw against a lease) must outlive the
  // cache; the cache does not own it.
  static Result<CompressedKvCache> create(const KvLayout& layout, PageSource* pool);

  // The state reached by appending tokens 0..n_tokens-1 one at a time (with
  // their flags given), built in one pass (prefill). flags[slot * n_tokens +
  // j] is token j's flag for (block, head) slot `slot`. `gate` holds every
  // token's gate rows: required (non-null rows, when n_tokens > 0) iff the
  // layout has gate state, and must be empty without it. Errors as for
  // append(); on error no page stays allocated.
  // Implemented as begin_build + fill_slot of every slot + finish_build,
  // after checking every argument and the pages of the whole state up
  // front (so a prefill that does not fit fails before taking any page).
  static Result<CompressedKvCache> build_from_dense(const KvLayout& layout, PageSource* pool,
                                                    int64_t n_tokens, const DenseKv& kv,
                                                    std::span<const uint8_t> flags,
                                                    const DenseGate& gate = {});

  // Staged build, for a layer-major prefill (all prompt tokens through
  // layer 0, then layer 1, ...): a (block, head) slot can be built as soon
  // as its block's last layer is computed, and its wire pages listed
  // (wire_group_pages() of kvstore/wire_image.h) and shipped while later
  // layers are still being computed.
  //
  // begin_build(): a cache of exactly n_tokens tokens (fixed from here on)
  // whose every (layer, head) K/V ring and every slot's gate ring is
  // allocated (their page count depends only on n_tokens; contents unset),
  // with no slot filled yet. Errors: those of create(); INVALID_ARGUMENT
  // for n_tokens outside [0, 2^31]; RESOURCE_EXHAUSTED naming the rings'
  // pages needed and the source's free pages (no page kept).
  //
  // While the build runs (building()), valid calls are: fill_slot(),
  // finish_build(), building(), slot_filled(), layout(), n_tokens(),
  // page_tokens(), gate_rows_per_page(), geometry(), n_pages() and
  // capacity_bytes() (the rings plus the filled slots' retained pages),
  // retained_tokens()/retained_position() of a filled slot,
  // proximal_tokens(), proximal_row_position(), moving and destroying (which
  // returns every page taken so far), and wire_group_pages() of filled
  // slots. append(), begin_append(), set_flags(), proximal(), distant(),
  // gate_proximal(), gate_distant() and export_wire_image() return
  // FAILED_PRECONDITION; footprint()/bytes() are meaningful only once
  // finished (precondition); the unchecked hot-path calls
  // (new_k_row, ..., set_flag_unchecked) need a successful begin_append()
  // and so cannot be reached.
  static Result<CompressedKvCache> begin_build(const KvLayout& layout, PageSource* pool,
                                               int64_t n_tokens);

  // Builds (block, head) slot `slot` of a staged build exactly as
  // build_from_dense() does: the sink and window rows of the slot's layers
  // (l in its block, its head) into their K/V rings, the slot's gate ring
  // rows, the pending flags of its window tokens, and its distant tokens
  // with flag 1 retained (base-layer K, every block layer's V, position,
  // gate row if gate_state_retained) in position order. slot_flags has n_tokens() entries, 0 or
  // 1: this slot's flag of each token. Reads from `kv` ONLY the rows of
  // the slot's layers and head, and from `gate` only the slot's rows, so
  // the caller may pass a DenseKv whose later layers (and other heads) are
  // not computed yet. Takes only the slot's retained pages, checked up
  // front. Errors (nothing of the slot kept, the cache unchanged):
  // FAILED_PRECONDITION (no build in progress, moved-from); INVALID_ARGUMENT
  // (slot out of range, a slot filled twice, slot_flags of the wrong size
  // or not 0/1, no K or V rows, gate rows missing for a layout with gate
  // state or given for one without); RESOURCE_EXHAUSTED naming the pages
  // needed and free (retryable once pages are freed).
  // Does not block; copies the slot's rows.
  Status fill_slot(int64_t slot, const DenseKv& kv, std::span<const uint8_t> slot_flags,
                   const DenseGate& gate = {});

  // Ends a staged build: from here on the cache is exactly what
  // build_from_dense() gives for the same input (contents, ring rows,
  // retained lists, pending flags, bytes(), capacity_bytes(), and every
  // later call). FAILED_PRECONDITION (naming the first unfilled slot) if a
  // slot was not filled — the build goes on then — or if no build is in
  // progress.
  Status finish_build();

  // True between begin_build() and a successful finish_build().
  bool building() const { return building_; }
  // Whether `slot`'s pages hold its content: true for every slot outside
  // a staged build, and during one for the slots filled so far. False for
  // a slot out of range.
  bool slot_filled(int64_t slot) const {
    if (slot < 0 || slot >= static_cast<int64_t>(distant_.size())) return false;
    return !building_ || slot_filled_[static_cast<size_t>(slot)] != 0;
  }

  CompressedKvCache(CompressedKvCache&& other) noexcept;
  CompressedKvCache& operator=(CompressedKvCache&& other) noexcept;
  CompressedKvCache(const CompressedKvCache&) = delete;
  CompressedKvCache& operator=(const CompressedKvCache&) = delete;
  ~CompressedKvCache();

  // Appends the token at `position`, which must equal n_tokens(). flags has
  // n_slots() entries, each 0 or 1 (ignored for sinks, which never leave),
  // or is empty: flags given later with set_flags(). If a token leaves the
  // window, its flags are applied now. kv.gate must be given iff the layout
  // has gate state. Errors: INVALID_ARGUMENT (position, flags, null rows),
  // RESOURCE_EXHAUSTED (the page source lacks the pages — an empty pool or
  // a used-up lease: the cache is unchanged).
  // Does not block.
  Status append(int64_t position, const TokenKv& kv, std::span<const uint8_t> flags);

  // Two-phase append for a forward pass that computes K/V layer by layer:
  // begin_append() applies the leaving token's flags and claims the new
  // token's ring row (same checks and errors as append(); on error nothing
  // changes); then new_k_row()/new_v_row() give that row of each (layer,
  // head) to write, and new_gate_row() that of each slot's gate state. Until
  // a layer's rows are written its content is stale, so attention at layer l
  // must come after writing layer l. An empty `flags` defers the new
  // token's flags (the gate computes them during the forward step): set
  // them with set_flags()/set_flag_unchecked() before the token leaves the
  // window, or it is dropped in every slot.
  Status begin_append(int64_t position, std::span<const uint8_t> flags);
  fp16_t* new_k_row(int64_t layer, int64_t head);
  fp16_t* new_v_row(int64_t layer, int64_t head);
  // The new token's gate row of `slot` (gate_row_elems() fp16 to write;
  // stale until written, and gate_proximal() already counts it).
  // Unchecked: after a successful begin_append(), slot in [0, n_slots()),
  // and the layout has gate state (null otherwise).
  fp16_t* new_gate_row(int64_t slot);

  // Sets (overwrites) the pending flags of the token at `position` while it
  // is in the window; they are applied when it leaves. For a sink the call
  // is accepted and has no effect (sinks never leave). flags has n_slots()
  // entries, each 0 or 1. INVALID_ARGUMENT if the token does not exist
  // (position >= n_tokens() or < 0), already left the window, or flags are
  // malformed; the cache is unchanged then. O(n_slots), no allocation.
  Status set_flags(int64_t position, std::span<const uint8_t> flags);
  // Hot-path form for the newest token (position n_tokens() - 1): its flag
  // in `slot` becomes `flag`. Unchecked: after a successful begin_append(),
  // slot in [0, n_slots()), flag 0 or 1. No effect for a sink.
  void set_flag_unchecked(int64_t slot, uint8_t flag);

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

  // Gate state rows of (block, head) `slot`: of the proximal tokens in
  // ring-row order (n_rows = proximal_tokens(); row r belongs to the token
  // at proximal_row_position(r)), and of the retained tokens in retained
  // order (n_rows = retained_tokens(slot); row i belongs to
  // retained_position(slot, i)). 0 rows without gate state, and
  // gate_distant() has 0 rows when the layout keeps no gate rows for
  // retained tokens (!gate_state_retained). OUT_OF_RANGE for a bad slot.
  Result<GateRowsView> gate_proximal(int64_t slot) const;
  Result<GateRowsView> gate_distant(int64_t slot) const;

  const KvLayout& layout() const { return layout_; }
  // Whether the page source's memory is the host's (PageSource::
  // host_accessible()): host kernels (kvstore/attention.h) may read the
  // views' rows only then; otherwise they are device addresses.
  bool host_accessible() const { return host_pages_; }
  int64_t n_tokens() const { return n_tokens_; }
  int64_t page_tokens() const { return page_tokens_; }
  // Gate rows per page (0 without gate state).
  int64_t gate_rows_per_page() const { return gate_rows_per_page_; }
  // Gate rows per page of the retained lists (0 without gate state or
  // without gate_state_retained: retained tokens keep no gate row).
  int64_t retained_gate_rows_per_page() const { return retained_gate_rows_per_page_; }
  int64_t proximal_tokens() const { return layout_.proximal_tokens(n_tokens_); }
  // R of a (block, head) slot; slot in [0, n_slots()).
  int64_t retained_tokens(int64_t slot) const { return distant_[slot].n_tokens; }

  // The formula of kvstore/footprint.h for the current state.
  Footprint footprint() const;
  int64_t bytes() const { return footprint().total_bytes(); }
  // Bytes of the pages this cache holds (page-granular, >= bytes()).
  int64_t capacity_bytes() const { return n_pages_held_ * page_bytes_; }
  // Pages this cache holds (capacity_bytes() / page bytes).
  int64_t n_pages() const { return n_pages_held_; }
  // How its pages are cut (kvstore/footprint.h).
  PageGeometry geometry() const {
    return {page_bytes_, page_tokens_, positions_per_page_, gate_rows_per_page_,
            retained_gate_rows_per_page_};
  }

 private:
  // kvstore/wire_image.cpp: lists the pages (export) and builds a cache on
  // landed pages (adopt); it reads and sets the members below directly.
  friend struct WireAccess;

  // Retained distant tokens of one (block, head) slot.
  struct DistantList {
    std::vector<PageId> k_pages;               // base-layer keys
    std::vector<std::vector<PageId>> v_pages;  // [layer in block][page]
    std::vector<PageId> pos_pages;             // int32 positions
    std::vector<PageId> gate_pages;            // gate state rows (gate_state_retained)
    int64_t n_tokens = 0;
  };

  CompressedKvCache(const KvLayout& layout, PageSource* pool, const PageGeometry& geometry);

  // flags holds n_slots() x n_tokens entries, each 0 or 1.
  Status validate_flags(std::span<const uint8_t> flags, int64_t n_tokens) const;
  // The K/V and gate rows a build of n_tokens tokens reads are given (or,
  // for gate rows, absent) as the layout requires.
  Status check_dense_inputs(int64_t n_tokens, const DenseKv& kv, const DenseGate& gate) const;
  // FAILED_PRECONDITION while a staged build runs (or after a move).
  Status check_built(const char* call) const;
  // Pages of every K/V ring and gate ring at n_tokens tokens.
  int64_t ring_pages_needed(int64_t n_tokens) const;
  // Pages `slot` retains for these flags (its n_tokens entries).
  int64_t slot_retained_pages(int64_t slot, std::span<const uint8_t> slot_flags) const;
  // Starts a staged build of n_tokens tokens on this empty cache: checks
  // n_tokens and the rings' pages, then allocates the rings.
  Status start_build(int64_t n_tokens);
  Status check_layer_head(int64_t layer, int64_t head) const;
  Status check_slot(int64_t slot) const;
  // Ring row of the token at `position` while it is proximal.
  int64_t ring_row(int64_t position) const;
  // Pages needed to retain one more token in `slot`.
  int64_t retain_pages_needed(int64_t slot) const;
  // The helpers below take pages without checking: callers have made sure
  // the page source has them (so a failure never leaves half a token behind).
  // Adds one page to every (layer, head) ring, K and V.
  void grow_ring();
  // Adds one page to every slot's gate ring.
  void grow_gate_ring();
  fp16_t* ring_row_ptr(std::vector<PageId>& pages, int64_t layer, int64_t head, int64_t row);
  fp16_t* gate_ring_row_ptr(int64_t slot, int64_t row);
  // Appends one retained token to `slot`: base-layer K row from k_base(),
  // V row of block layer i from v_of_layer(i), gate row from gate_row()
  // (called only when retained tokens keep gate rows), and its position.
  // The rows are page memory (rows_in_pages: a leaving token's ring rows)
  // or host memory (a dense prefill input).
  template <typename KRowFn, typename VRowFn, typename GateRowFn>
  void retain(int64_t slot, KRowFn k_base, VRowFn v_of_layer, GateRowFn gate_row, int64_t position,
              bool rows_in_pages);
  // Page bytes only through these (PageSource memory operations): a plain
  // memcpy on a host source, the source's op otherwise (page_pool.h).
  // put: host memory -> page; move_in_pages: page -> page.
  void put(void* dst, const void* src, int64_t bytes) {
    if (host_pages_) {
      std::memcpy(dst, src, static_cast<size_t>(bytes));
    } else {
      pool_->write(static_cast<std::byte*>(dst), src, bytes);
    }
  }
  void move_in_pages(void* dst, const void* src, int64_t bytes) {
    if (host_pages_) {
      std::memcpy(dst, src, static_cast<size_t>(bytes));
    } else {
      pool_->copy(static_cast<std::byte*>(dst), static_cast<const std::byte*>(src), bytes);
    }
  }
  PageId take_page();
  void release();

  KvLayout layout_;
  PageSource* pool_ = nullptr;  // not owned; null once moved from
  bool host_pages_ = true;      // pool_->host_accessible(), asked once
  int64_t page_bytes_ = 0;
  int64_t page_tokens_ = 0;
  int64_t positions_per_page_ = 0;
  int64_t gate_rows_per_page_ = 0;  // 0 without gate state
  int64_t retained_gate_rows_per_page_ = 0;  // 0 unless retained tokens keep gate rows
  int64_t gate_row_elems_ = 0;
  int64_t n_tokens_ = 0;
  int64_t n_pages_held_ = 0;
  int64_t n_ring_pages_ = 0;  // per (layer, head), same for all
  // Ring pages, [page][layer][head]: growing by one page round appends
  // n_layers * n_kv_heads ids.
  std::vector<PageId> ring_k_pages_;
  std::vector<PageId> ring_v_pages_;
  // Gate ring pages, [page][slot]; n_gate_ring_pages_ rounds.
  std::vector<PageId> gate_ring_pages_;
  int64_t n_gate_ring_pages_ = 0;
  std::vector<DistantList> distant_;  // by slot
  // Flags of the tokens now in the window, [window row][slot], applied when
  // the token leaves (0 until given, for deferred flags).
  std::vector<uint8_t> pending_flags_;
  // Staged build: building_ from begin_build() to finish_build();
  // slot_filled_[slot] (by slot, only while building) marks filled slots.
  bool building_ = false;
  std::vector<uint8_t> slot_filled_;
};

}  // namespace kvgate::kvstore
