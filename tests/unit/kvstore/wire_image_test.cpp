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
#include "tests/unit/kvstore/wire_test_util.h"

namespace kvgate::kvstore {
namespace {

using std::chrono::milliseconds;
using testing::append_token;
using testing::Case;
using testing::documented_order;
using testing::expect_documented_image;
using testing::expect_same_attention;
using testing::expect_same_state;
using testing::History;
using testing::listed_by_groups;
using testing::make_layout;
using testing::make_pool;
using testing::random_block_map;
using testing::random_case;
using testing::Receiver;
using testing::retained_counts;
using testing::t0;

// ---- The documented descriptor format, written out again here. ----

struct Offsets {
  size_t version = 4, n_layers = 8, head_dim = 16, gate_bytes = 24, gate_retained = 28,
         n_sink = 32, n_window = 40, page_bytes = 48, blocks = 56;
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
uint32_t get_u32(const std::vector<std::byte>& d, size_t at) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i)
    v |= static_cast<uint32_t>(std::to_integer<uint8_t>(d[at + i])) << (8 * i);
  return v;
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

// The round trip of the task: (a) views equal, (b) the same further tokens
// give the same state and attention, (c) bytes and capacity equal, (d) the
// adopted cache's pages all go back to the lease.
TEST(WireImage, RoundTripThroughALeaseIsTheSameCache) {
  std::mt19937 rng(2024);
  int adopted_nonempty = 0, with_retained = 0, with_gate = 0, with_window_gate = 0;
  for (int iter = 0; iter < 160; ++iter) {
    const Case cs = random_case(rng, iter);
    const KvLayout layout = make_layout(random_block_map(cs.n_layers, cs.n_heads, rng), cs.head_dim,
                                        cs.n_sink, cs.n_window, cs.gate_bytes, cs.gate_retained);
    SCOPED_TRACE("iter " + std::to_string(iter) + ": " + layout.blocks.to_string() + " d " +
                 std::to_string(cs.head_dim) + " sink " + std::to_string(cs.n_sink) + " window " +
                 std::to_string(cs.n_window) + " page " + std::to_string(cs.page_bytes) + " gate " +
                 std::to_string(cs.gate_bytes) + (cs.gate_retained ? "" : " (not retained)") +
                 " tokens " + std::to_string(cs.n_tokens) +
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
    EXPECT_EQ(listed_by_groups(original, nullptr), image->pages);
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
      with_window_gate += layout.has_gate_state() && !layout.gate_state_retained;
    }
    // (d)
    EXPECT_EQ(rx.taken(), 0);
    EXPECT_EQ(rx.pool->used_pages(), 0);
  }
  // The random cases covered what they are meant to.
  EXPECT_GT(adopted_nonempty, 100);
  EXPECT_GT(with_retained, 100);
  EXPECT_GT(with_gate, 50);
  EXPECT_GT(with_window_gate, 20);
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
  EXPECT_EQ(get_u32(d, o.version), kWireImageVersion);
  EXPECT_EQ(kWireImageVersion, 2u);
  EXPECT_EQ(get_u32(d, o.gate_bytes), 16u);
  EXPECT_EQ(get_u32(d, o.gate_retained), 1u);
  EXPECT_EQ(get_u64(d, o.n_sink), 2u);
  EXPECT_EQ(get_u64(d, o.n_window), 3u);
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
  // 1: the format before gate_state_retained; a version-1 reader refuses 2.
  for (uint32_t v : {0u, 1u, 3u, 0xFFFFFFFFu}) {
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
      with([](KvLayout& l) { l.gate_state_retained = false; }),  // gates of context `window`
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

// gate_state_retained: a window-context sender writes 0 and only a
// window-context receiver takes it; without gate state the flag means
// nothing and both write (and accept) 0.
TEST(WireImage, GateStateRetainedFlagMustMatchOnlyWithGateState) {
  std::mt19937 rng(9);
  for (int64_t gate_bytes : {int64_t{0}, int64_t{16}}) {
    SCOPED_TRACE("gate bytes " + std::to_string(gate_bytes));
    const KvLayout cache_ctx = make_layout(*BlockMap::uniform(4, 2, 2), 8, 2, 3, gate_bytes, true);
    KvLayout window_ctx = cache_ctx;
    window_ctx.gate_state_retained = false;
    const History hist(window_ctx, 30, 0.7, rng);
    auto pool = make_pool(64, 64 * 4096);
    auto built = CompressedKvCache::build_from_dense(window_ctx, pool.get(), 30, hist.dense(),
                                                     hist.prefix_flags(30), hist.dense_gate());
    ASSERT_TRUE(built.ok()) << built.status().to_string();
    auto image = export_wire_image(*built);
    ASSERT_TRUE(image.ok());
    EXPECT_EQ(get_u32(image->descriptor, Offsets{}.gate_retained), 0u);
    auto same = check_wire_descriptor(image->descriptor, window_ctx, 64);
    ASSERT_TRUE(same.ok()) << same.status().to_string();
    EXPECT_EQ(*same, built->n_pages());
    auto other = check_wire_descriptor(image->descriptor, cache_ctx, 64);
    if (gate_bytes == 0) {
      EXPECT_TRUE(other.ok()) << other.status().to_string();
    } else {
      ASSERT_FALSE(other.ok());
      EXPECT_EQ(other.status().code(), StatusCode::kInvalidArgument);
      EXPECT_NE(other.status().message().find("gate_state_retained"), std::string::npos)
          << other.status().message();
      // And the other way round.
      auto cache_built = CompressedKvCache::build_from_dense(
          cache_ctx, pool.get(), 30, hist.dense(), hist.prefix_flags(30), hist.dense_gate());
      ASSERT_TRUE(cache_built.ok());
      EXPECT_GT(cache_built->n_pages(), built->n_pages());  // the retained gate rows' pages
      auto cache_image = export_wire_image(*cache_built);
      ASSERT_TRUE(cache_image.ok());
      EXPECT_EQ(check_wire_descriptor(cache_image->descriptor, window_ctx, 64).status().code(),
                StatusCode::kInvalidArgument);
    }
  }
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
      {"gate_state_retained 0", patched(o.gate_retained, 0, 4)},
      {"gate_state_retained 2", patched(o.gate_retained, 2, 4)},
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
                                        cs.n_sink, cs.n_window, cs.gate_bytes, cs.gate_retained);
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

// A layer-major prefill: after "computing" layer l (the K/V and gate rows
// given to fill_slot hold values for layers <= l only, NaN beyond), the
// slots of the group ending at l are filled and their pages listed at
// once. The lists, concatenated, are the finished cache's export pages and
// segments; the image round-trips to the cache build_from_dense gives.
TEST(WireImage, StagedBuildListsEachSegmentAfterItsLastLayer) {
  std::mt19937 rng(77);
  int nonempty = 0;
  for (int iter = 0; iter < 120; ++iter) {
    const Case cs = random_case(rng, iter);
    const KvLayout layout = make_layout(random_block_map(cs.n_layers, cs.n_heads, rng), cs.head_dim,
                                        cs.n_sink, cs.n_window, cs.gate_bytes, cs.gate_retained);
    SCOPED_TRACE("iter " + std::to_string(iter) + ": " + layout.blocks.to_string() + " tokens " +
                 std::to_string(cs.n_tokens));
    const BlockMap& map = layout.blocks;
    const int64_t n = cs.n_tokens;
    const History hist(layout, n, cs.keep, rng);
    const std::vector<WireSlotGroup> groups = wire_slot_groups(layout);
    // Every slot once; last_layer increasing; by head within a group.
    std::vector<int> seen(map.n_slots(), 0);
    for (size_t g = 0; g < groups.size(); ++g) {
      if (g > 0) {
        EXPECT_GT(groups[g].last_layer, groups[g - 1].last_layer);
      }
      for (size_t i = 0; i < groups[g].slots.size(); ++i) {
        const int64_t s = groups[g].slots[i];
        ++seen[s];
        EXPECT_EQ(map.slot_block(s).end_layer() - 1, groups[g].last_layer);
        if (i > 0) {
          EXPECT_LT(map.slot_head(groups[g].slots[i - 1]), map.slot_head(s));
        }
      }
    }
    EXPECT_EQ(seen, std::vector<int>(map.n_slots(), 1));
    EXPECT_EQ(groups.back().last_layer, cs.n_layers - 1);

    auto pool = make_pool(cs.page_bytes, int64_t{1} << 22);
    auto staged = CompressedKvCache::begin_build(layout, pool.get(), n);
    ASSERT_TRUE(staged.ok()) << staged.status().to_string();
    std::vector<PageId> shipped;
    std::vector<WireSegment> segments;
    for (size_t g = 0; g < groups.size(); ++g) {
      const WireSlotGroup& group = groups[g];
      const testing::LayerMajorKv computed(
          hist, n, [&](int64_t l, int64_t) { return l <= group.last_layer; },
          [&](int64_t s) { return map.slot_block(s).end_layer() - 1 <= group.last_layer; });
      EXPECT_EQ(wire_group_pages(*staged, group).status().code(), StatusCode::kFailedPrecondition);
      std::vector<int64_t> order = group.slots;
      std::shuffle(order.begin(), order.end(), rng);
      for (int64_t s : order) {
        ASSERT_TRUE(staged
                        ->fill_slot(s, computed.dense(), testing::slot_flags(hist, s, n),
                                    computed.dense_gate())
                        .ok());
      }
      if (g + 1 < groups.size()) {
        EXPECT_EQ(wire_group_pages(*staged, groups[g + 1]).status().code(),
                  StatusCode::kFailedPrecondition);
        EXPECT_EQ(export_wire_image(*staged).status().code(), StatusCode::kFailedPrecondition);
      }
      auto pages = wire_group_pages(*staged, group);
      ASSERT_TRUE(pages.ok()) << pages.status().to_string();
      if (!pages->empty()) {
        segments.push_back({static_cast<int64_t>(shipped.size()),
                            static_cast<int64_t>(pages->size()), group.last_layer});
      }
      shipped.insert(shipped.end(), pages->begin(), pages->end());
    }
    ASSERT_TRUE(staged->finish_build().ok());
    auto image = export_wire_image(*staged);
    ASSERT_TRUE(image.ok()) << image.status().to_string();
    EXPECT_EQ(shipped, image->pages);
    EXPECT_EQ(segments, image->segments);
    expect_documented_image(*staged, *pool, *image);

    // The shipped image is the cache a one-pass build gives.
    auto other = make_pool(cs.page_bytes, int64_t{1} << 22);
    auto built = CompressedKvCache::build_from_dense(layout, other.get(), n, hist.dense(),
                                                     hist.prefix_flags(n), hist.dense_gate());
    ASSERT_TRUE(built.ok());
    const int64_t n_img = static_cast<int64_t>(image->pages.size());
    Receiver rx(cs.page_bytes, n_img + 64, n_img + 32);
    const std::vector<PageId> ids = rx.land(*image, *pool, n_img);
    auto adopted = adopt_wire_image(layout, rx.pages.get(), image->descriptor, ids);
    ASSERT_TRUE(adopted.ok()) << adopted.status().to_string();
    expect_same_state(*built, *adopted);
    expect_same_attention(*built, *adopted, rng);
    nonempty += n_img > 0;
  }
  EXPECT_GT(nonempty, 90);
}

TEST(WireImage, GroupPagesErrors) {
  // head 0: layers 0-1, 2-3; head 1: 0-0, 1-3 (slots 0, 1 | 2, 3).
  const BlockMap map = *BlockMap::create(4, {{{0, 2}, {2, 2}}, {{0, 1}, {1, 3}}});
  const std::vector<WireSlotGroup> want = {{0, {2}}, {1, {0}}, {3, {1, 3}}};
  const KvLayout layout = make_layout(map, 8, 2, 3, 16);
  EXPECT_EQ(wire_slot_groups(layout), want);
  std::mt19937 rng(78);
  const History hist(layout, 20, 0.5, rng);
  auto pool = make_pool(64, 1 << 20);
  auto cache = CompressedKvCache::begin_build(layout, pool.get(), 20);
  ASSERT_TRUE(cache.ok());
  auto fill = [&](int64_t s) {
    ASSERT_TRUE(
        cache->fill_slot(s, hist.dense(), testing::slot_flags(hist, s, 20), hist.dense_gate())
            .ok());
  };
  auto expect_error = [](const Status& st, StatusCode code, const std::string& text) {
    EXPECT_EQ(st.code(), code) << st.to_string();
    EXPECT_NE(st.message().find(text), std::string::npos) << st.message();
  };
  fill(2);
  EXPECT_TRUE(wire_group_pages(*cache, want[0]).ok());
  fill(1);
  expect_error(wire_group_pages(*cache, want[2]).status(), StatusCode::kFailedPrecondition,
               "slot 3 (KV head 1, layers 1-3) is not filled yet");
  expect_error(wire_group_pages(*cache, {3, {1, 4}}).status(), StatusCode::kInvalidArgument,
               "slot 4 not in [0, 4)");
  expect_error(wire_group_pages(*cache, {2, {1}}).status(), StatusCode::kInvalidArgument,
               "not a block ending at the group's last layer 2");
  EXPECT_EQ(wire_group_pages(*cache, {1, {-1}}).status().code(), StatusCode::kInvalidArgument);
  // Pages listed mid-build stay the cache's pages after it is finished.
  fill(0);
  fill(3);
  const std::vector<PageId> mid = *wire_group_pages(*cache, want[2]);
  ASSERT_TRUE(cache->finish_build().ok());
  EXPECT_EQ(*wire_group_pages(*cache, want[2]), mid);
  std::vector<WireSegment> segments;
  const auto image = export_wire_image(*cache);
  ASSERT_TRUE(image.ok());
  EXPECT_EQ(listed_by_groups(*cache, &segments), image->pages);
  EXPECT_EQ(segments, image->segments);
  CompressedKvCache taken = std::move(*cache);
  expect_error(wire_group_pages(*cache, want[0]).status(), StatusCode::kFailedPrecondition,
               "moved-from");
  EXPECT_EQ(wire_group_pages(taken, want[0]).status().code(), StatusCode::kOk);
}

}  // namespace
}  // namespace kvgate::kvstore
