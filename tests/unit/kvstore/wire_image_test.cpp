// The wire image (kvstore/wire_image.h): export from a cache in one pool,
// land the pages in a lease on another pool in wire order (as the
// transport does), adopt, and check that the adopted cache is the same
// cache; every descriptor error; page sources that run out; random
// mutations of valid descriptors.
#include "kvstore/wire_image.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "engine/cpu/isa.h"
#include "kvstore/attention.h"
#include "kvstore/footprint.h"
#include "kvstore/lease_manager.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::kvstore {
namespace {

using std::chrono::milliseconds;
using testing::History;
using testing::make_layout;
using testing::make_pool;
using testing::random_block_map;
using testing::retained_counts;

const LeaseClock::time_point t0{};

// The decode side: a pool, its lease manager, one lease and its view.
struct Receiver {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<LeaseManager> leases;
  LeaseId lease;
  std::unique_ptr<LeasePages> pages;  // stable address: caches keep it

  Receiver(int64_t page_bytes, int64_t pool_pages, int64_t lease_pages) {
    pool = make_pool(page_bytes, page_bytes * pool_pages);
    leases = std::move(LeaseManager::create(pool.get())).value();
    lease = std::move(leases->grant(RequestId{7}, lease_pages * page_bytes, milliseconds(1000), t0))
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

// ---- The documented descriptor format, written out again here. ----

struct Offsets {
  size_t version = 4, n_layers = 8, head_dim = 16, gate_bytes = 24, n_sink = 28, n_window = 36,
         page_bytes = 44, blocks = 52;
  size_t n_tokens, retained, rows, flags, ring, gate_ring, total, crc;
};

Offsets offsets_of(const KvLayout& layout, int64_t n_tokens) {
  Offsets o;
  size_t at = o.blocks;
  for (int64_t h = 0; h < layout.n_kv_heads(); ++h) at += 4 + 8 * layout.blocks.n_blocks(h);
  const int64_t n_slots = layout.blocks.n_slots();
  const int64_t rows =
      std::clamp<int64_t>(n_tokens - layout.n_sink_tokens, 0, layout.n_window_tokens);
  o.n_tokens = at;
  o.retained = at + 8;
  o.rows = o.retained + 8 * n_slots;
  o.flags = o.rows + 8;
  o.ring = o.flags + rows * n_slots;
  o.gate_ring = o.ring + 8;
  o.total = o.gate_ring + 8;
  o.crc = o.total + 8;
  return o;
}

void set_u32(std::vector<std::byte>& d, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) d[at + i] = static_cast<std::byte>(v >> (8 * i));
}
void set_u64(std::vector<std::byte>& d, size_t at, uint64_t v) {
  for (int i = 0; i < 8; ++i) d[at + i] = static_cast<std::byte>(v >> (8 * i));
}
uint64_t get_u64(const std::vector<std::byte>& d, size_t at) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v |= static_cast<uint64_t>(std::to_integer<uint8_t>(d[at + i])) << (8 * i);
  return v;
}
// Recomputes the trailing CRC32C (so a mutation reaches the field checks).
void fix_crc(std::vector<std::byte>& d) {
  if (d.size() < 4) return;
  set_u32(d, d.size() - 4, crc32c(d.data(), d.size() - 4));
}

// ---- Comparing two caches through their public views. ----

void expect_same_state(const CompressedKvCache& a, const CompressedKvCache& b) {
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
void expect_same_attention(const CompressedKvCache& a, const CompressedKvCache& b,
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
void append_token(CompressedKvCache& c, const History& hist, int64_t j, int mode) {
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

// The page pointers the documented wire order lists, from the cache's
// public views (nullptr: a position page, which has no pointer view; its
// (slot, page index in the slot's position list) go to *positions).
std::vector<const void*> documented_order(
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
void expect_documented_image(const CompressedKvCache& c, const PagePool& pool,
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

struct Case {
  int64_t n_layers, n_heads, head_dim, n_sink, n_window, page_bytes, gate_bytes, n_tokens;
  double keep;
};

Case random_case(std::mt19937& rng, int kind) {
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

// The round trip of the task: (a) views equal, (b) the same further tokens
// give the same state and attention, (c) bytes and capacity equal, (d) the
// adopted cache's pages all go back to the lease.
TEST(WireImage, RoundTripThroughALeaseIsTheSameCache) {
  std::mt19937 rng(2024);
  int adopted_nonempty = 0, with_retained = 0, with_gate = 0;
  for (int iter = 0; iter < 160; ++iter) {
    const Case cs = random_case(rng, iter);
    const KvLayout layout = make_layout(random_block_map(cs.n_layers, cs.n_heads, rng), cs.head_dim,
                                        cs.n_sink, cs.n_window, cs.gate_bytes);
    SCOPED_TRACE("iter " + std::to_string(iter) + ": " + layout.blocks.to_string() + " d " +
                 std::to_string(cs.head_dim) + " sink " + std::to_string(cs.n_sink) + " window " +
                 std::to_string(cs.n_window) + " page " + std::to_string(cs.page_bytes) + " gate " +
                 std::to_string(cs.gate_bytes) + " tokens " + std::to_string(cs.n_tokens) +
                 " keep " + std::to_string(cs.keep));
    const int64_t extra = cs.n_window + 4;  // every pending flag gets applied
    const History hist(layout, cs.n_tokens + extra, cs.keep, rng);

    // Prefill side: a prefix built in one pass, then single appends.
    auto pool_a = make_pool(cs.page_bytes, int64_t{1} << 22);
    const int64_t n0 = std::uniform_int_distribution<int64_t>(0, cs.n_tokens)(rng);
    auto built = CompressedKvCache::build_from_dense(layout, pool_a.get(), n0, hist.dense(),
                                                     hist.prefix_flags(n0), hist.dense_gate());
    ASSERT_TRUE(built.ok()) << built.status().to_string();
    CompressedKvCache original = std::move(*built);
    for (int64_t j = n0; j < cs.n_tokens; ++j) {
      append_token(original, hist, j, static_cast<int>(rng() % 3));
    }
    auto image = export_wire_image(original);
    ASSERT_TRUE(image.ok()) << image.status().to_string();
    expect_documented_image(original, *pool_a, *image);
    auto needed = check_wire_descriptor(image->descriptor, layout, cs.page_bytes);
    ASSERT_TRUE(needed.ok()) << needed.status().to_string();
    EXPECT_EQ(*needed, original.n_pages());
    EXPECT_EQ(*state_pages(layout, cs.page_bytes, original.n_tokens(), retained_counts(original)),
              original.n_pages());

    // Decode side: a lease with room for the image, 3 surplus pages and
    // growth; the transport lands wire page i in lease page i.
    const int64_t n_img = *needed;
    Receiver rx(cs.page_bytes, n_img + 4096, n_img + 2048);
    const int64_t surplus = 3;
    rx.land(*image, *pool_a, n_img + surplus);
    {
      // The lease's own page list, passed as is (adopt copies it before
      // returning the surplus pages, which reorders it).
      auto adopted =
          adopt_wire_image(layout, rx.pages.get(), image->descriptor, rx.leases->pages(rx.lease));
      ASSERT_TRUE(adopted.ok()) << adopted.status().to_string();
      EXPECT_EQ(rx.taken(), n_img);  // surplus returned to the lease
      EXPECT_EQ(rx.pool->used_pages(), n_img);
      // (a), (c)
      expect_same_state(original, *adopted);
      EXPECT_EQ(adopted->bytes(), original.bytes());
      EXPECT_EQ(adopted->capacity_bytes(), original.capacity_bytes());
      expect_same_attention(original, *adopted, rng);
      // The adopted cache exports the same descriptor.
      auto again = export_wire_image(*adopted);
      ASSERT_TRUE(again.ok());
      EXPECT_EQ(again->descriptor, image->descriptor);
      // (b): the same further tokens and flags on both.
      for (int64_t j = cs.n_tokens; j < cs.n_tokens + extra; ++j) {
        const int mode = static_cast<int>(rng() % 3);
        append_token(original, hist, j, mode);
        append_token(*adopted, hist, j, mode);
        expect_same_state(original, *adopted);
        expect_same_attention(original, *adopted, rng);
        EXPECT_EQ(adopted->capacity_bytes(), original.capacity_bytes());
        EXPECT_EQ(rx.taken(), adopted->n_pages());
      }
      if (original.n_tokens() > 0) ++adopted_nonempty;
      for (int64_t r : retained_counts(original)) with_retained += r > 0;
      with_gate += layout.has_gate_state();
    }
    // (d)
    EXPECT_EQ(rx.taken(), 0);
    EXPECT_EQ(rx.pool->used_pages(), 0);
  }
  // The random cases covered what they are meant to.
  EXPECT_GT(adopted_nonempty, 100);
  EXPECT_GT(with_retained, 100);
  EXPECT_GT(with_gate, 50);
}

TEST(WireImage, EmptyCacheHasNoPagesAndNoSegments) {
  const KvLayout layout = make_layout(*BlockMap::uniform(3, 2, 2), 8, 2, 3, 16);
  auto pool = make_pool(64, 64 * 16);
  auto cache = CompressedKvCache::create(layout, pool.get());
  ASSERT_TRUE(cache.ok());
  auto image = export_wire_image(*cache);
  ASSERT_TRUE(image.ok());
  EXPECT_TRUE(image->pages.empty());
  EXPECT_TRUE(image->segments.empty());
  EXPECT_EQ(*check_wire_descriptor(image->descriptor, layout, 64), 0);
  Receiver rx(64, 16, 4);
  const std::vector<PageId> ids = rx.land(*image, *pool, 2);  // both surplus
  auto adopted = adopt_wire_image(layout, rx.pages.get(), image->descriptor, ids);
  ASSERT_TRUE(adopted.ok()) << adopted.status().to_string();
  EXPECT_EQ(adopted->n_tokens(), 0);
  EXPECT_EQ(rx.taken(), 0);
  CompressedKvCache moved = std::move(*adopted);
  EXPECT_EQ(export_wire_image(*adopted).status().code(), StatusCode::kFailedPrecondition);
}

// A fixed cache for the error tests: ragged blocks, gate state, a wrapped
// window, retained tokens over several pages.
struct Fixed {
  KvLayout layout;
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<History> hist;
  std::unique_ptr<CompressedKvCache> cache;
  WireImage image;

  Fixed() {
    std::vector<std::vector<LayerBlock>> per_head = {{{0, 2}, {2, 2}}, {{0, 1}, {1, 3}}};
    layout = make_layout(*BlockMap::create(4, per_head), 8, 2, 3, 16);
    pool = make_pool(64, 64 * 4096);
    std::mt19937 rng(5);
    hist = std::make_unique<History>(layout, 40, 0.6, rng);
    auto built = CompressedKvCache::build_from_dense(layout, pool.get(), 40, hist->dense(),
                                                     hist->prefix_flags(40), hist->dense_gate());
    EXPECT_TRUE(built.ok());
    cache = std::make_unique<CompressedKvCache>(std::move(*built));
    image = std::move(export_wire_image(*cache)).value();
  }
  Offsets offsets() const { return offsets_of(layout, 40); }
};

// Checks `desc` fails with `code` in check_wire_descriptor and in adopt,
// and that a failed adopt keeps no page (and returns none).
void expect_rejected(const Fixed& f, const std::vector<std::byte>& desc, StatusCode code,
                     const std::string& what, const KvLayout* layout = nullptr,
                     int64_t page_bytes = 64) {
  SCOPED_TRACE(what);
  const KvLayout& l = layout != nullptr ? *layout : f.layout;
  auto checked = check_wire_descriptor(desc, l, page_bytes);
  ASSERT_FALSE(checked.ok());
  EXPECT_EQ(checked.status().code(), code) << checked.status().to_string();
  EXPECT_EQ(checked.status().message().rfind("wire image: ", 0), 0u) << checked.status().message();
  Receiver rx(page_bytes, f.image.pages.size() + 8, f.image.pages.size() + 4);
  const std::vector<PageId> ids = rx.land(f.image, *f.pool, f.image.pages.size() + 2);
  auto adopted = adopt_wire_image(l, rx.pages.get(), desc, ids);
  ASSERT_FALSE(adopted.ok());
  EXPECT_EQ(adopted.status().code(), code) << adopted.status().to_string();
  EXPECT_EQ(rx.taken(), static_cast<int64_t>(ids.size()));  // nothing returned
  const auto held = rx.leases->pages(rx.lease);
  EXPECT_TRUE(std::equal(held.begin(), held.end(), ids.begin(), ids.end()));
}

TEST(WireImage, DescriptorMatchesTheDocumentedFormat) {
  Fixed f;
  const Offsets o = f.offsets();
  const auto& d = f.image.descriptor;
  ASSERT_EQ(d.size(), o.crc + 4);
  EXPECT_EQ(std::memcmp(d.data(), "KVGW", 4), 0);
  EXPECT_EQ(get_u64(d, o.n_tokens), 40u);
  for (int64_t s = 0; s < f.layout.blocks.n_slots(); ++s) {
    EXPECT_EQ(get_u64(d, o.retained + 8 * s), static_cast<uint64_t>(f.cache->retained_tokens(s)));
  }
  EXPECT_EQ(get_u64(d, o.rows), 3u);
  EXPECT_EQ(get_u64(d, o.total), static_cast<uint64_t>(f.cache->n_pages()));
  EXPECT_EQ(get_u64(d, o.page_bytes), 64u);
  std::vector<std::byte> copy = d;
  fix_crc(copy);
  EXPECT_EQ(copy, d);
}

TEST(WireImage, EveryTruncationIsDataLoss) {
  Fixed f;
  const auto& d = f.image.descriptor;
  for (size_t n = 0; n < d.size(); ++n) {
    expect_rejected(f, std::vector<std::byte>(d.begin(), d.begin() + n), StatusCode::kDataLoss,
                    "prefix of " + std::to_string(n) + " bytes");
  }
  // Truncated with a valid CRC: the fields run out.
  for (size_t cut : {size_t{1}, size_t{8}, size_t{20}}) {
    std::vector<std::byte> t(d.begin(), d.end() - 4 - cut);
    t.resize(t.size() + 4);
    fix_crc(t);
    expect_rejected(f, t, StatusCode::kDataLoss, "re-CRC'd cut of " + std::to_string(cut));
  }
  std::vector<std::byte> trailing(d.begin(), d.end() - 4);
  trailing.push_back(std::byte{0});
  trailing.resize(trailing.size() + 4);
  fix_crc(trailing);
  expect_rejected(f, trailing, StatusCode::kDataLoss, "trailing byte");
}

TEST(WireImage, MagicCrcAndVersionErrors) {
  Fixed f;
  const auto& d = f.image.descriptor;
  auto bad_magic = d;
  bad_magic[0] = std::byte{'X'};
  fix_crc(bad_magic);
  expect_rejected(f, bad_magic, StatusCode::kDataLoss, "bad magic");
  for (size_t at : {size_t{10}, size_t{60}, d.size() - 5, d.size() - 1}) {
    auto flipped = d;
    flipped[at] ^= std::byte{0x10};
    expect_rejected(f, flipped, StatusCode::kDataLoss, "bit flip at " + std::to_string(at));
  }
  for (uint32_t v : {0u, 2u, 0xFFFFFFFFu}) {
    auto other = d;
    set_u32(other, 4, v);
    expect_rejected(f, other, StatusCode::kUnimplemented, "version " + std::to_string(v));
    fix_crc(other);
    expect_rejected(f, other, StatusCode::kUnimplemented, "version (CRC fixed)");
  }
}

TEST(WireImage, ReceiverLayoutOrPageSizeMismatchIsInvalidArgument) {
  Fixed f;
  const auto& d = f.image.descriptor;
  auto with = [&](auto change) {
    KvLayout l = f.layout;
    change(l);
    return l;
  };
  const KvLayout layouts[] = {
      with([](KvLayout& l) { l.head_dim = 16; }),
      with([](KvLayout& l) { l.n_sink_tokens = 1; }),
      with([](KvLayout& l) { l.n_window_tokens = 4; }),
      with([](KvLayout& l) { l.gate_state_bytes_per_token = 0; }),
      with([](KvLayout& l) { l.gate_state_bytes_per_token = 32; }),
      with([](KvLayout& l) { l.blocks = *BlockMap::uniform(4, 2, 2); }),
      with([](KvLayout& l) { l.blocks = *BlockMap::uniform(5, 2, 2); }),
      with([](KvLayout& l) { l.blocks = *BlockMap::uniform(4, 3, 2); }),
      with([](KvLayout& l) {
        l.blocks = *BlockMap::create(4, {{{0, 2}, {2, 2}}, {{0, 2}, {2, 2}}});
      }),
  };
  for (size_t i = 0; i < std::size(layouts); ++i) {
    expect_rejected(f, d, StatusCode::kInvalidArgument, "layout " + std::to_string(i), &layouts[i]);
  }
  expect_rejected(f, d, StatusCode::kInvalidArgument, "page size 128", nullptr, 128);
  EXPECT_EQ(check_wire_descriptor(d, f.layout, 48).status().code(), StatusCode::kInvalidArgument);
  KvLayout invalid = f.layout;
  invalid.n_window_tokens = 0;
  EXPECT_EQ(check_wire_descriptor(d, invalid, 64).status().code(), StatusCode::kInvalidArgument);
}

TEST(WireImage, InconsistentCountsAreInvalidArgument) {
  Fixed f;
  const Offsets o = f.offsets();
  const auto& d = f.image.descriptor;
  const int64_t distant = f.layout.distant_tokens(40);
  auto patched = [&](size_t at, uint64_t v, int width = 8) {
    auto p = d;
    if (width == 8) {
      set_u64(p, at, v);
    } else {
      set_u32(p, at, static_cast<uint32_t>(v));
    }
    fix_crc(p);
    return p;
  };
  struct Patch {
    const char* what;
    std::vector<std::byte> desc;
  };
  // Slot 3 (head 1, layers 1-3) retains some tokens over 2+ pages.
  ASSERT_GT(f.cache->retained_tokens(3), 4);
  const uint64_t r3 = f.cache->retained_tokens(3);
  const std::vector<Patch> patches = {
      {"n_tokens 4 (window rows disagree)", patched(o.n_tokens, 4)},
      {"n_tokens 2^40", patched(o.n_tokens, uint64_t{1} << 40)},
      {"n_tokens 0", patched(o.n_tokens, 0)},
      {"retained > distant", patched(o.retained + 8 * 3, distant + 1)},
      {"retained huge", patched(o.retained, ~uint64_t{0})},
      {"retained across a page", patched(o.retained + 8 * 3, r3 + 4)},
      {"pending rows + 1", patched(o.rows, 4)},
      {"pending rows huge", patched(o.rows, uint64_t{1} << 62)},
      {"flag 2", patched(o.flags, 2, 4)},
      {"ring pages + 1", patched(o.ring, get_u64(d, o.ring) + 1)},
      {"gate ring pages 0", patched(o.gate_ring, 0)},
      {"total pages - 1", patched(o.total, get_u64(d, o.total) - 1)},
      {"total pages huge", patched(o.total, uint64_t{1} << 62)},
      {"n_layers", patched(o.n_layers, 5, 4)},
      {"head_dim", patched(o.head_dim, 16, 4)},
      {"page_bytes", patched(o.page_bytes, 128)},
      {"n_sink", patched(o.n_sink, 1)},
      {"n_window huge", patched(o.n_window, ~uint64_t{0})},
      {"head 0 block count", patched(o.blocks, 3, 4)},
      {"head 0 block count huge", patched(o.blocks, 0xFFFFFFFF, 4)},
      {"head 1 block 1 first layer", patched(o.blocks + 4 + 16 + 4 + 8, 2, 4)},
  };
  for (const Patch& p : patches) {
    expect_rejected(f, p.desc, StatusCode::kInvalidArgument, p.what);
  }
}

TEST(WireImage, AdoptChecksThePagesAndTheirContent) {
  Fixed f;
  const int64_t n = static_cast<int64_t>(f.image.pages.size());
  {  // A lease that could not hold the image: fewer pages than needed.
    Receiver rx(64, n + 8, n);
    std::vector<PageId> ids = rx.land(f.image, *f.pool, n);
    ids.pop_back();
    auto adopted = adopt_wire_image(f.layout, rx.pages.get(), f.image.descriptor, ids);
    EXPECT_EQ(adopted.status().code(), StatusCode::kResourceExhausted)
        << adopted.status().to_string();
    EXPECT_EQ(rx.taken(), n);
  }
  {  // A page given twice, a negative id, no source.
    Receiver rx(64, n + 8, n + 1);
    std::vector<PageId> ids = rx.land(f.image, *f.pool, n);
    ids.push_back(ids[3]);
    EXPECT_EQ(adopt_wire_image(f.layout, rx.pages.get(), f.image.descriptor, ids).status().code(),
              StatusCode::kInvalidArgument);
    ids.back() = PageId{-1};
    EXPECT_EQ(adopt_wire_image(f.layout, rx.pages.get(), f.image.descriptor, ids).status().code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ(adopt_wire_image(f.layout, nullptr, f.image.descriptor, ids).status().code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ(rx.taken(), n);
  }
  // Landed out of wire order or corrupted: the positions tell.
  std::vector<WireSegment> segs;
  const std::vector<const void*> order = documented_order(*f.cache, &segs);
  int64_t pos_page = -1;
  for (size_t i = 0; i < order.size(); ++i) {
    if (order[i] == nullptr) pos_page = static_cast<int64_t>(i);
  }
  ASSERT_GE(pos_page, 1);
  for (int variant = 0; variant < 3; ++variant) {
    Receiver rx(64, n + 8, n);
    std::vector<PageId> ids = rx.land(f.image, *f.pool, n);
    int32_t* first = reinterpret_cast<int32_t*>(rx.pool->data(ids[pos_page]));
    if (variant == 0) {
      first[0] = -5;  // below the sinks
    } else if (variant == 1) {
      first[1] = first[0];  // not increasing
    } else {
      std::swap(ids[pos_page], ids[0]);  // a ring K page where positions belong
    }
    auto adopted = adopt_wire_image(f.layout, rx.pages.get(), f.image.descriptor, ids);
    EXPECT_EQ(adopted.status().code(), StatusCode::kDataLoss)
        << "variant " << variant << ": " << adopted.status().to_string();
    EXPECT_EQ(rx.taken(), n);
  }
}

// The page source runs out: appends to an adopted cache past its lease are
// RESOURCE_EXHAUSTED and change nothing; an extend makes room.
TEST(WireImage, AdoptedCacheGrowsOnlyWithinItsLease) {
  Fixed f;
  const int64_t n = static_cast<int64_t>(f.image.pages.size());
  Receiver rx(64, n + 4096, n);  // exactly the image
  const std::vector<PageId> ids = rx.land(f.image, *f.pool, n);
  auto adopted = adopt_wire_image(f.layout, rx.pages.get(), f.image.descriptor, ids);
  ASSERT_TRUE(adopted.ok()) << adopted.status().to_string();
  EXPECT_EQ(rx.pages->free_pages(), 0);
  std::mt19937 rng(9);
  const History more(f.layout, 80, 1.0, rng);  // all kept: retained lists grow
  int64_t j = adopted->n_tokens();
  Status st;
  for (; j < 80; ++j) {
    const int64_t before_pages = adopted->n_pages();
    const int64_t before_bytes = adopted->bytes();
    st = adopted->append(j, more.token(j), more.token_flags(j));
    if (!st.ok()) {
      EXPECT_EQ(adopted->n_tokens(), j);
      EXPECT_EQ(adopted->n_pages(), before_pages);
      EXPECT_EQ(adopted->bytes(), before_bytes);
      break;
    }
  }
  ASSERT_EQ(st.code(), StatusCode::kResourceExhausted) << st.to_string();
  EXPECT_EQ(rx.taken(), adopted->n_pages());
  ASSERT_TRUE(rx.leases->extend(rx.lease, 64 * 64, t0).ok());
  EXPECT_TRUE(adopted->append(j, more.token(j), more.token_flags(j)).ok());
  // A cache built on a too small lease fails whole, holding nothing.
  Receiver small(64, 64, 3);
  auto built = CompressedKvCache::build_from_dense(f.layout, small.pages.get(), 40, f.hist->dense(),
                                                   f.hist->prefix_flags(40), f.hist->dense_gate());
  EXPECT_EQ(built.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(small.taken(), 0);
}

// Random mutations of valid descriptors (with the CRC fixed up half the
// time, so they reach the field checks): never a crash; either an error
// with a documented code and "wire image: " or a descriptor whose adopted
// cache is consistent with what it claims.
TEST(WireImage, RandomMutationsAreErrorsOrConsistent) {
  std::mt19937 rng(77);
  const uint32_t odd[] = {0, 1, 2, 3, 4, 7, 8, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF};
  int accepted = 0, rejected = 0;
  for (int base = 0; base < 12; ++base) {
    const Case cs = random_case(rng, base);
    const KvLayout layout = make_layout(random_block_map(cs.n_layers, cs.n_heads, rng), cs.head_dim,
                                        cs.n_sink, cs.n_window, cs.gate_bytes);
    const History hist(layout, cs.n_tokens + 1, cs.keep, rng);
    auto pool = make_pool(cs.page_bytes, int64_t{1} << 22);
    auto built =
        CompressedKvCache::build_from_dense(layout, pool.get(), cs.n_tokens, hist.dense(),
                                            hist.prefix_flags(cs.n_tokens), hist.dense_gate());
    ASSERT_TRUE(built.ok());
    const WireImage image = std::move(export_wire_image(*built)).value();
    const int64_t n = static_cast<int64_t>(image.pages.size());
    for (int it = 0; it < 400; ++it) {
      std::vector<std::byte> d = image.descriptor;
      const int n_mut = 1 + static_cast<int>(rng() % 3);
      for (int k = 0; k < n_mut; ++k) {
        const size_t at = d.empty() ? 0 : rng() % d.size();
        switch (rng() % 6) {
          case 0:
            if (!d.empty()) d[at] ^= static_cast<std::byte>(1u << (rng() % 8));
            break;
          case 1:
            if (!d.empty()) d[at] = static_cast<std::byte>(rng());
            break;
          case 2:
            d.resize(rng() % (d.size() + 1));
            break;
          case 3:
            d.insert(d.begin() + static_cast<std::ptrdiff_t>(at), static_cast<std::byte>(rng()));
            break;
          case 4:
            if (!d.empty()) d.erase(d.begin() + static_cast<std::ptrdiff_t>(at));
            break;
          default:
            if (d.size() >= 4) {
              set_u32(d, rng() % (d.size() - 3), odd[rng() % std::size(odd)]);
            }
            break;
        }
      }
      if (rng() % 2) fix_crc(d);
      auto checked = check_wire_descriptor(d, layout, cs.page_bytes);
      Receiver rx(cs.page_bytes, n + 64, n + 32);
      const std::vector<PageId> ids = rx.land(image, *pool, n + 1);
      auto adopted = adopt_wire_image(layout, rx.pages.get(), d, ids);
      if (!checked.ok()) {
        ++rejected;
        const StatusCode c = checked.status().code();
        EXPECT_TRUE(c == StatusCode::kDataLoss || c == StatusCode::kInvalidArgument ||
                    c == StatusCode::kUnimplemented)
            << checked.status().to_string();
        EXPECT_EQ(checked.status().message().rfind("wire image: ", 0), 0u);
        ASSERT_FALSE(adopted.ok());
        EXPECT_EQ(adopted.status().code(), c);
        EXPECT_EQ(rx.taken(), n + 1);
        continue;
      }
      if (*checked > n + 1) {
        EXPECT_EQ(adopted.status().code(), StatusCode::kResourceExhausted);
        continue;
      }
      if (!adopted.ok()) {
        // Only the landed content can still be refused (positions).
        EXPECT_EQ(adopted.status().code(), StatusCode::kDataLoss) << adopted.status().to_string();
        EXPECT_EQ(rx.taken(), n + 1);
        continue;
      }
      ++accepted;
      // Consistent with what it claims: pages, bytes, formula; and usable.
      EXPECT_EQ(adopted->n_pages(), *checked);
      EXPECT_EQ(rx.taken(), *checked);
      EXPECT_EQ(*state_pages(layout, cs.page_bytes, adopted->n_tokens(), retained_counts(*adopted)),
                *checked);
      EXPECT_EQ(adopted->bytes(),
                footprint(layout, adopted->n_tokens(), retained_counts(*adopted))->total_bytes());
      auto again = export_wire_image(*adopted);
      ASSERT_TRUE(again.ok());
      EXPECT_EQ(again->descriptor, d);  // the encoding is canonical
      if (adopted->n_tokens() > 0) {
        std::vector<float> q(2 * layout.n_kv_heads() * layout.head_dim, 0.5f);
        std::vector<float> out(q.size());
        EXPECT_TRUE(attend_layer(*adopted, 0, 2 * layout.n_kv_heads(), q.data(), q.data(),
                                 out.data(), engine::cpu::Isa::kScalar)
                        .ok());
      }
      { CompressedKvCache drop = std::move(*adopted); }
      EXPECT_EQ(rx.taken(), 0);
    }
  }
  EXPECT_GT(rejected, 1000);
  EXPECT_GT(accepted, 10);  // unmutated or benign (pending flag 0<->1) mutants
}

}  // namespace
}  // namespace kvgate::kvstore
