// Helpers of the wire image tests: the decode side (a pool, a lease, the
// transport's landing of wire pages), the documented wire order rebuilt
// from a cache's public views, and random cache shapes.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "kvstore/compressed_cache.h"
#include "kvstore/footprint.h"
#include "kvstore/lease_manager.h"
#include "kvstore/wire_image.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::kvstore::testing {

inline const LeaseClock::time_point t0{};

// The decode side: a pool, its lease manager, one lease and its view.
struct Receiver {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<LeaseManager> leases;
  LeaseId lease;
  std::unique_ptr<LeasePages> pages;  // stable address: caches keep it

  Receiver(int64_t page_bytes, int64_t pool_pages, int64_t lease_pages) {
    pool = make_pool(page_bytes, page_bytes * pool_pages);
    leases = std::move(LeaseManager::create(pool.get())).value();
    lease = std::move(leases->grant(RequestId{7}, lease_pages * page_bytes,
                                    std::chrono::milliseconds(1000), t0))
                .value();
    pages = std::make_unique<LeasePages>(leases.get(), lease);
  }
  int64_t taken() const { return leases->info(lease)->taken_pages; }
  // Takes n pages of the lease and lands wire page i of `image` (content in
  // `from`) in the i-th (the rest keep whatever they hold).
  std::vector<PageId> land(const WireImage& image, const PagePool& from, int64_t n) {
    auto taken_pages = leases->take_pages(lease, n);
    EXPECT_TRUE(taken_pages.ok()) << taken_pages.status().to_string();
    std::vector<PageId> ids = *taken_pages;
    const int64_t bytes = std::min(pool->page_bytes(), from.page_bytes());
    for (size_t i = 0; i < image.pages.size() && i < ids.size(); ++i) {
      std::memcpy(pool->data(ids[i]), from.data(image.pages[i]), bytes);
    }
    return ids;
  }
};

// The page pointers the documented wire order lists, from the cache's
// public views (nullptr: a position page, which has no pointer view; its
// (slot, page index in the slot's position list) go to *positions).
inline std::vector<const void*> documented_order(
    const CompressedKvCache& c, std::vector<WireSegment>* segments,
    std::vector<std::pair<int64_t, int64_t>>* positions = nullptr) {
  const KvLayout& layout = c.layout();
  const BlockMap& map = layout.blocks;
  std::vector<int64_t> slots(map.n_slots());
  for (int64_t s = 0; s < map.n_slots(); ++s) slots[s] = s;
  std::stable_sort(slots.begin(), slots.end(), [&](int64_t a, int64_t b) {
    return std::make_pair(map.slot_block(a).end_layer(), map.slot_head(a)) <
           std::make_pair(map.slot_block(b).end_layer(), map.slot_head(b));
  });
  const PageGeometry geo = c.geometry();
  std::vector<const void*> out;
  int64_t seg_begin = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t s = slots[i];
    const int64_t h = map.slot_head(s);
    const LayerBlock blk = map.slot_block(s);
    for (int64_t l = blk.first_layer; l < blk.end_layer(); ++l) {
      const SegmentView near = *c.proximal(l, h);
      for (int64_t r = 0; r < near.n_pages(); ++r) out.push_back(near.page(r).k);
      for (int64_t r = 0; r < near.n_pages(); ++r) out.push_back(near.page(r).v);
    }
    const SegmentView base = *c.distant(blk.first_layer, h);
    for (int64_t r = 0; r < base.n_pages(); ++r) out.push_back(base.page(r).k);
    for (int64_t l = blk.first_layer; l < blk.end_layer(); ++l) {
      const SegmentView far = *c.distant(l, h);
      for (int64_t r = 0; r < far.n_pages(); ++r) out.push_back(far.page(r).v);
    }
    const int64_t pos_pages = PageGeometry::pages_for(c.retained_tokens(s), geo.positions_per_page);
    for (int64_t r = 0; r < pos_pages; ++r) {
      out.push_back(nullptr);
      if (positions != nullptr) positions->emplace_back(s, r);
    }
    const GateRowsView gd = *c.gate_distant(s);
    for (int64_t r = 0; r < gd.n_pages(); ++r) out.push_back(gd.page(r).rows);
    const GateRowsView gp = *c.gate_proximal(s);
    for (int64_t r = 0; r < gp.n_pages(); ++r) out.push_back(gp.page(r).rows);
    if (i + 1 == slots.size() || map.slot_block(slots[i + 1]).end_layer() != blk.end_layer()) {
      const auto end = static_cast<int64_t>(out.size());
      if (end > seg_begin) segments->push_back({seg_begin, end - seg_begin, blk.end_layer() - 1});
      seg_begin = end;
    }
  }
  return out;
}

// Checks an image against its cache: pages are the cache's, each once, in
// the documented order; segments as documented; positions pages hold the
// retained positions.
inline void expect_documented_image(const CompressedKvCache& c, const PagePool& pool,
                                    const WireImage& image) {
  EXPECT_EQ(static_cast<int64_t>(image.pages.size()), c.n_pages());
  EXPECT_EQ(wire_image_pages(c), c.n_pages());
  EXPECT_EQ(image.page_bytes, pool.page_bytes());
  EXPECT_EQ(image.total_bytes(), c.capacity_bytes());
  std::set<int32_t> distinct;
  for (PageId p : image.pages) distinct.insert(p.value);
  EXPECT_EQ(distinct.size(), image.pages.size());
  EXPECT_EQ(static_cast<int64_t>(image.pages.size()), pool.used_pages());
  std::vector<WireSegment> segments;
  std::vector<std::pair<int64_t, int64_t>> positions;
  const std::vector<const void*> want = documented_order(c, &segments, &positions);
  ASSERT_EQ(want.size(), image.pages.size());
  EXPECT_EQ(image.segments, segments);
  int64_t covered = 0;
  int64_t last_layer = -1;
  for (const WireSegment& s : image.segments) {
    EXPECT_EQ(s.first_page, covered);
    EXPECT_GT(s.n_pages, 0);
    EXPECT_GT(s.last_layer, last_layer);
    last_layer = s.last_layer;
    covered += s.n_pages;
  }
  EXPECT_EQ(covered, static_cast<int64_t>(image.pages.size()));
  if (!image.pages.empty()) {
    EXPECT_EQ(last_layer, c.layout().n_layers() - 1);
  }
  // Every other page is the view's page; position pages hold the slot's
  // retained positions, page_bytes / 4 a page.
  const int64_t per_page = pool.page_bytes() / 4;
  size_t k = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] != nullptr) {
      ASSERT_EQ(want[i], static_cast<const void*>(pool.data(image.pages[i]))) << "wire page " << i;
      continue;
    }
    ASSERT_LT(k, positions.size());
    const auto [slot, page] = positions[k++];
    const auto* pos = reinterpret_cast<const int32_t*>(pool.data(image.pages[i]));
    for (int64_t e = page * per_page; e < std::min((page + 1) * per_page, c.retained_tokens(slot));
         ++e) {
      ASSERT_EQ(pos[e - page * per_page], c.retained_position(slot, e)) << "wire page " << i;
    }
  }
  EXPECT_EQ(k, positions.size());
}

// The concatenation of wire_group_pages() over wire_slot_groups() (and
// the segments it implies, if `segments`).
inline std::vector<PageId> listed_by_groups(const CompressedKvCache& c,
                                            std::vector<WireSegment>* segments) {
  std::vector<PageId> out;
  for (const WireSlotGroup& g : wire_slot_groups(c.layout())) {
    auto pages = wire_group_pages(c, g);
    EXPECT_TRUE(pages.ok()) << pages.status().to_string();
    if (!pages.ok()) return out;
    if (segments != nullptr && !pages->empty()) {
      segments->push_back(
          {static_cast<int64_t>(out.size()), static_cast<int64_t>(pages->size()), g.last_layer});
    }
    out.insert(out.end(), pages->begin(), pages->end());
  }
  return out;
}

struct Case {
  int64_t n_layers, n_heads, head_dim, n_sink, n_window, page_bytes, gate_bytes, n_tokens;
  double keep;
  bool gate_retained = true;  // KvLayout::gate_state_retained
};

inline Case random_case(std::mt19937& rng, int kind) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  Case c;
  c.n_layers = pick(1, 5);
  c.n_heads = pick(1, 3);
  c.head_dim = int64_t{4} << pick(0, 2);  // 4, 8, 16
  c.n_sink = pick(0, 3);
  c.n_window = pick(1, 7);
  c.page_bytes = 64 << pick(0, 1);
  c.gate_bytes = pick(0, 1) ? 0 : (int64_t{8} << pick(0, 3));  // 0 or 8..64
  const double keeps[] = {0.0, 0.5, 1.0};
  c.keep = keeps[pick(0, 2)];
  // Gate rows of retained tokens kept (context `cache`) or not (`window`);
  // from `kind`, so the random draws are the same either way.
  c.gate_retained = (kind / 4) % 2 == 0;
  switch (kind % 4) {
    case 0:  // sinks only (or empty)
      c.n_tokens = pick(0, c.n_sink);
      break;
    case 1:  // window not yet wrapped
      c.n_tokens = pick(0, c.n_sink + c.n_window);
      break;
    default:  // wrapped, with distant tokens (many pages per list)
      c.n_tokens = pick(c.n_sink + c.n_window, 70);
      break;
  }
  return c;
}

}  // namespace kvgate::kvstore::testing
