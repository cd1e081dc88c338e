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
// as it is computed (segments()): for block b (in BlockMap order, its
// layers' rings and its (block, head) slots):
//   ring K and V pages of every layer of b and every KV head,
//   for each slot of b: retained base K pages, V pages per block layer,
//   position pages, gate pages; then b's slots' gate ring pages.
// A layout whose blocks differ per KV head orders by (first layer of the
// slot, head). The exact rule is in wire_image.cpp and the descriptor
// carries every count the decoder needs; no count is inferred from the
// pages' contents.
//
// Descriptor (little-endian): magic "KVGW", u32 version kWireImageVersion,
// the layout (n_layers, n_kv_heads, head_dim, n_sink, n_window, elem bytes,
// gate bytes, every slot's layers), page_bytes, n_tokens, retained tokens
// per slot, pending flags of the window tokens [window row][slot], page
// counts per part, then a CRC32C of everything before it.
//
// Errors of adopt_wire_image (all name what is wrong, "wire image: ..."):
// bad magic or CRC, truncated or trailing bytes        kDataLoss
// another version                                      kUnimplemented
// a layout or page size other than the receiver's,
// counts that disagree with each other or the pages   kInvalidArgument
// the page source cannot hold the image               kResourceExhausted
// Nothing here trusts a count before checking it against the bytes and the
// layout, so a hostile descriptor never makes it allocate much or crash.
//
// Threading: the owner thread of the cache and its page source.
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

inline constexpr uint32_t kWireImageVersion = 1;

// A run of consecutive wire pages belonging to one block of layers.
struct WireSegment {
  int64_t first_page = 0;  // index into WireImage::pages
  int64_t n_pages = 0;
  int64_t last_layer = 0;  // the segment may ship once layers <= last_layer are computed
  bool operator==(const WireSegment&) const = default;
};

struct WireImage {
  std::vector<std::byte> descriptor;  // TransferManifest::layout_descriptor
  std::vector<PageId> pages;          // the exporting cache's pages, in wire order
  std::vector<WireSegment> segments;  // cover pages exactly, in order, non-empty
  int64_t page_bytes = 0;
  int64_t total_bytes() const { return static_cast<int64_t>(pages.size()) * page_bytes; }
};

// The cache's pages and descriptor. The pages stay the cache's: keep the
// cache alive and unchanged until the transfer finished. Errors: none for a
// valid cache (INTERNAL on a broken invariant).
Result<WireImage> export_wire_image(const CompressedKvCache& cache);

// Pages a cache of this state needs, i.e. export_wire_image(...).pages.size()
// — what the prefill node compares with its grant before shipping.
int64_t wire_image_pages(const CompressedKvCache& cache);

// Parses and checks a descriptor against the receiver's layout and page
// size without adopting anything; returns the number of pages it needs.
Result<int64_t> check_wire_descriptor(std::span<const std::byte> descriptor,
                                      const KvLayout& layout, int64_t page_bytes);

// The cache the descriptor describes, built on `pages` (wire order, taken
// from `source`, their content already landed). The cache owns those pages
// from then on (returns them to `source` when destroyed) and draws new
// pages from `source`. `pages` must hold at least the descriptor's count;
// surplus pages are returned to `source`. On error no page is kept: the
// caller still owns all of `pages`.
Result<CompressedKvCache> adopt_wire_image(const KvLayout& layout, PageSource* source,
                                           std::span<const std::byte> descriptor,
                                           std::span<const PageId> pages);

}  // namespace kvgate::kvstore
