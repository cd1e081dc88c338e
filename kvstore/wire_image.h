// The wire image of a compressed KV cache (DESIGN.md §5, §6): what a
// prefill node ships and what a decode node adopts, with no copy on either
// side beyond the transport's own.
//
// The image IS the cache's pages. export_wire_image() lists the pages of a
// CompressedKvCache in a canonical order (wire page i lands at logical
// offset i * page_bytes of the decode node's lease) and describes them in a
// small, versioned, backend-neutral descriptor (fp16 K/V, the layout, token
// counts, each window token's pending flags). adopt_wire_image() takes the
// landed pages, in wire order, and makes them a CompressedKvCache again —
// the cache then continues (append, attention, eviction) exactly as the
// exported one would have.
//
// Wire order, block by block, so a block of layers can be shipped as soon
// as it is computed (segments). The (block, head) slots are taken in order
// of their block's last layer, then head; slots with the same last layer
// form one segment (with the same blocks for every head — a uniform map —
// that is one segment per block; a per-head ragged map gets one segment per
// distinct block end, so segments stay in the order layers get computed).
// Within a slot s of head h and layers [f, e), its pages are, in order:
//   for each layer l in [f, e): the K ring pages of (l, h), then its V ring
//     pages (ring page 0 first);
//   the retained base-layer K pages, then the V pages of block layer 0, 1,
//     ..., g-1, then the position pages, then the gate row pages (only
//     when retained tokens keep gate rows, KvLayout::gate_state_retained);
//   the slot's gate ring pages (with gate state).
// Every (layer, head) ring belongs to exactly one slot, so every page of
// the cache appears once. The descriptor carries every count the decoder
// needs; no count is inferred from the pages' contents.
//
// Descriptor (little-endian): magic "KVGW", u32 version kWireImageVersion;
// the layout: u32 n_layers, n_kv_heads, head_dim, elem_bytes, gate bytes
// per token, gate_state_retained (1 iff retained tokens keep gate rows:
// gate bytes > 0 and KvLayout::gate_state_retained; else 0); u64 n_sink,
// n_window, page_bytes; per KV head u32 n_blocks
// then (u32 first_layer, u32 n_layers) per block; the state: u64 n_tokens,
// u64 retained tokens per slot (BlockMap slot order), u64 window rows with
// pending flags (min(max(n_tokens - n_sink, 0), n_window)), their flags
// [ring row - n_sink][slot] as bytes 0/1; the page counts: u64 pages per
// K/V ring, u64 pages per gate ring, u64 total pages; then u32 CRC32C of
// everything before it.
//
// Errors of check_wire_descriptor/adopt_wire_image (all "wire image: ..."):
// bad magic or CRC, truncated or trailing bytes        kDataLoss
// retained positions out of order (adopt: pages that
// did not land in wire order)                          kDataLoss
// another version                                      kUnimplemented
// a layout or page size other than the receiver's,
// counts that disagree with each other or the layout,
// a flag other than 0/1, bad `pages` ids               kInvalidArgument
// fewer `pages` than the image needs (the source —
// a lease — could not hold it)                         kResourceExhausted
// Nothing here trusts a count before checking it against the bytes and the
// receiver's layout, and adopt checks the page count against `pages` before
// sizing anything, so a hostile descriptor never makes it allocate much or
// crash.
//
// adopt_wire_image() reads the landed position pages with PageSource::read()
// (one read per position page: a plain memcpy on a host pool; on a device
// pool each read flushes the pool's pending ops and synchronizes). Export
// only lists page ids and never touches page bytes.
//
// Threading: the owner thread of the cache and its page source; no call
// blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/layout.h"
#include "kvstore/page_pool.h"

namespace kvgate::kvstore {

// Version 2 added gate_state_retained to the layout fields. Any change to
// the descriptor's fields takes a new version: a reader refuses every
// version but its own (UNIMPLEMENTED) before reading past the header.
inline constexpr uint32_t kWireImageVersion = 2;

// A run of consecutive wire pages belonging to one block of layers (the
// slots whose block ends at last_layer).
struct WireSegment {
  int64_t first_page = 0;  // index into WireImage::pages
  int64_t n_pages = 0;
  int64_t last_layer = 0;  // the segment may ship once layers <= last_layer are computed
  bool operator==(const WireSegment&) const = default;
};

struct WireImage {
  std::vector<std::byte> descriptor;  // TransferManifest::layout_descriptor
  std::vector<PageId> pages;          // the exporting cache's pages, in wire order
  // Cover pages exactly, in order, each non-empty, last_layer increasing
  // (an empty cache, no tokens, has no pages and no segments).
  std::vector<WireSegment> segments;
  int64_t page_bytes = 0;
  int64_t total_bytes() const { return static_cast<int64_t>(pages.size()) * page_bytes; }
};

// The slots of one wire segment: every (block, head) slot whose block
// ends at last_layer, in wire order (by head).
struct WireSlotGroup {
  int64_t last_layer = 0;
  std::vector<int64_t> slots;  // BlockMap slot numbers
  bool operator==(const WireSlotGroup&) const = default;
};

// The wire segments' slots in wire order (last_layer increasing; one
// group per distinct block end, every slot in exactly one group). Depends
// only on the block map. Allocates.
std::vector<WireSlotGroup> wire_slot_groups(const KvLayout& layout);

// The pages of `group`'s slots in wire order: what export_wire_image()
// lists for that segment. Valid as soon as those slots are filled — during
// a staged build (CompressedKvCache::begin_build/fill_slot) too, so a
// layer-major prefill ships a segment right after its last layer: the
// slots' pages never change after fill_slot, and the concatenation of
// every group's pages (wire_slot_groups order) equals
// export_wire_image(cache).pages once the build is finished (a group
// whose slots hold no page — no tokens — has no segment). Errors:
// FAILED_PRECONDITION (a moved-from cache; a slot of the group not filled
// yet, named), INVALID_ARGUMENT (a slot out of range, or whose block does
// not end at group.last_layer). Allocates the list.
Result<std::vector<PageId>> wire_group_pages(const CompressedKvCache& cache,
                                             const WireSlotGroup& group);

// The cache's pages and descriptor (the pages are those of
// wire_group_pages() over wire_slot_groups(), one segment per non-empty
// group). The pages stay the cache's: keep the cache alive and unchanged
// until the transfer finished. Errors: FAILED_PRECONDITION for a
// moved-from cache or one whose staged build is not finished (the
// descriptor needs every slot's retained count and pending flags),
// INTERNAL on a broken invariant; none otherwise. Allocates the
// descriptor and page list.
Result<WireImage> export_wire_image(const CompressedKvCache& cache);

// Pages a cache of this state needs, i.e. export_wire_image(...).pages.size()
// (== cache.n_pages(), == state_pages() of its state) — what the prefill
// node compares with its grant before shipping.
int64_t wire_image_pages(const CompressedKvCache& cache);

// Parses and checks a descriptor against the receiver's layout and page
// size without adopting anything; returns the number of pages it needs.
// Does not allocate beyond one vector of the layout's slot count.
Result<int64_t> check_wire_descriptor(std::span<const std::byte> descriptor, const KvLayout& layout,
                                      int64_t page_bytes);

// The cache the descriptor describes, built on `pages` (wire order, taken
// from `source`, their content already landed): the first
// check_wire_descriptor() pages; it behaves exactly as the exported cache
// (same tokens, ring rows, retained lists, positions, gate rows, pending
// flags, bytes() and capacity_bytes()). The cache owns those pages from
// then on (returns them to `source` when destroyed) and draws new pages
// from `source` (a LeasePages: the request's lease, which must outlive the
// cache). Surplus pages past the image are returned to `source` (last
// first). `pages` may be the source's own list (LeaseManager::pages()): the
// ids are copied before any is returned. Every id must be distinct and
// held by `source`. On error no page is kept and none returned: the caller
// still owns all of `pages` (except if `source` refuses a surplus page,
// a caller bug reported as INVALID_ARGUMENT after the ones before it went
// back).
Result<CompressedKvCache> adopt_wire_image(const KvLayout& layout, PageSource* source,
                                           std::span<const std::byte> descriptor,
                                           std::span<const PageId> pages);

}  // namespace kvgate::kvstore
