// The cache operations that touch page bytes, run on one PageSource and
// recorded as a transcript of everything observable: every page's bytes
// (read through PageSource::read, so a source whose memory the host cannot
// touch is read the way kvstore reads it), every view's rows, positions,
// counts, bytes() and capacity_bytes(). Two sources given the same
// scenario must produce identical transcripts: a host PagePool (plain
// memcpy) and a source that defers or redirects its ops (the PROT_NONE
// source of page_source_ops_test.cpp, DevicePagePool in tests/gpu).
//
// Operations: append() and begin_append() (rows written through
// PageSource::write, as a kernel would write them) with tokens leaving the
// window under mixed flags (immediate, deferred + set_flags, deferred +
// set_flag_unchecked), build_from_dense, a staged build (fill_slot in
// reverse slot order), export of a wire image, its pages copied into fresh
// pages (PageSource::copy) and adopted, and appends continuing on the
// adopted cache.
//
// Both sources must allocate pages in the same order (PagePool's: lowest
// free page first, last freed first) and start zeroed, so that rows never
// written (stale ring rows) compare equal too.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kv_test_util.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/page_pool.h"
#include "kvstore/wire_image.h"

namespace kvgate::kvstore::testing {

// Named byte records, in the order they were taken.
struct Transcript {
  std::vector<std::pair<std::string, std::vector<uint8_t>>> records;

  void add(std::string name, const void* p, int64_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    records.emplace_back(std::move(name), std::vector<uint8_t>(b, b + n));
  }
  void add_i64(std::string name, int64_t v) { add(std::move(name), &v, sizeof(v)); }
};

// Reports the first differing record (a full dump would be unreadable).
inline void expect_same_transcript(const Transcript& a, const Transcript& b) {
  ASSERT_EQ(a.records.size(), b.records.size());
  for (size_t i = 0; i < a.records.size(); ++i) {
    ASSERT_EQ(a.records[i].first, b.records[i].first) << "record " << i;
    ASSERT_EQ(a.records[i].second, b.records[i].second)
        << "record " << i << " (" << a.records[i].first << ") differs";
  }
}

// Reads page memory through the source (never dereferences data()).
inline std::vector<uint8_t> read_bytes(PageSource& src, const void* p, int64_t n) {
  std::vector<uint8_t> out(static_cast<size_t>(n));
  if (n > 0) src.read(out.data(), static_cast<const std::byte*>(p), n);
  return out;
}

// Everything observable of `c`: counts, positions, every view's rows and
// every page's bytes in wire order (with the page ids).
inline void record_cache(PageSource& src, const CompressedKvCache& c, const std::string& tag,
                         Transcript& t) {
  const KvLayout& layout = c.layout();
  t.add_i64(tag + " n_tokens", c.n_tokens());
  t.add_i64(tag + " bytes", c.bytes());
  t.add_i64(tag + " capacity_bytes", c.capacity_bytes());
  t.add_i64(tag + " n_pages", c.n_pages());
  const int64_t row_bytes = kKvElementBytes * layout.head_dim;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    for (int64_t h = 0; h < layout.n_kv_heads(); ++h) {
      const std::string lh = tag + " l" + std::to_string(l) + "h" + std::to_string(h);
      for (int kind = 0; kind < 2; ++kind) {
        Result<SegmentView> seg = kind == 0 ? c.proximal(l, h) : c.distant(l, h);
        ASSERT_TRUE(seg.ok()) << seg.status().to_string();
        std::vector<uint8_t> rows;
        for (int64_t r = 0; r < seg->n_tokens(); ++r) {
          for (const fp16_t* p : {seg->k_row(r), seg->v_row(r)}) {
            const std::vector<uint8_t> b = read_bytes(src, p, row_bytes);
            rows.insert(rows.end(), b.begin(), b.end());
          }
        }
        t.add(lh + (kind == 0 ? " proximal" : " distant"), rows.data(),
              static_cast<int64_t>(rows.size()));
      }
    }
  }
  for (int64_t s = 0; s < layout.blocks.n_slots(); ++s) {
    const std::string st = tag + " slot" + std::to_string(s);
    std::vector<int32_t> pos;
    for (int64_t i = 0; i < c.retained_tokens(s); ++i) pos.push_back(c.retained_position(s, i));
    t.add(st + " positions", pos.data(), static_cast<int64_t>(pos.size() * sizeof(int32_t)));
    for (int kind = 0; kind < 2; ++kind) {
      Result<GateRowsView> g = kind == 0 ? c.gate_proximal(s) : c.gate_distant(s);
      ASSERT_TRUE(g.ok()) << g.status().to_string();
      std::vector<uint8_t> rows;
      for (int64_t r = 0; r < g->n_rows(); ++r) {
        const std::vector<uint8_t> b = read_bytes(src, g->row(r), g->row_elems() * 2);
        rows.insert(rows.end(), b.begin(), b.end());
      }
      t.add(st + (kind == 0 ? " gate proximal" : " gate distant"), rows.data(),
            static_cast<int64_t>(rows.size()));
    }
  }
  Result<WireImage> image = export_wire_image(c);
  ASSERT_TRUE(image.ok()) << image.status().to_string();
  t.add(tag + " wire descriptor", image->descriptor.data(),
        static_cast<int64_t>(image->descriptor.size()));
  for (size_t i = 0; i < image->pages.size(); ++i) {
    const PageId id = image->pages[i];
    t.add_i64(tag + " wire page id " + std::to_string(i), id.value);
    const std::vector<uint8_t> b = read_bytes(src, src.data(id), src.page_bytes());
    t.add(tag + " wire page " + std::to_string(i), b.data(), static_cast<int64_t>(b.size()));
  }
}

// After begin_append(j): token j's K/V rows and gate rows written into the
// new ring rows through the source (what the step's kernels do on a GPU).
inline void scenario_append_rows(PageSource& src, CompressedKvCache& c, const History& hist,
                                 int64_t j) {
  const KvLayout& layout = c.layout();
  const int64_t row_bytes = kKvElementBytes * layout.head_dim;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    for (int64_t h = 0; h < layout.n_kv_heads(); ++h) {
      src.write(reinterpret_cast<std::byte*>(c.new_k_row(l, h)), hist.k_row(j, l, h), row_bytes);
      src.write(reinterpret_cast<std::byte*>(c.new_v_row(l, h)), hist.v_row(j, l, h), row_bytes);
    }
  }
  for (int64_t s = 0; layout.has_gate_state() && s < layout.blocks.n_slots(); ++s) {
    src.write(reinterpret_cast<std::byte*>(c.new_gate_row(s)), hist.gate_row(j, s),
              layout.gate_state_bytes_per_token);
  }
}

// Appends token j of `hist`: mode 0 append() with flags, 1 begin_append()
// with flags + rows written through the source, 2 begin_append() deferred
// + set_flags(), 3 begin_append() deferred + set_flag_unchecked().
inline void scenario_append(PageSource& src, CompressedKvCache& c, const History& hist, int64_t j,
                            int mode) {
  const std::vector<uint8_t> flags = hist.token_flags(j);
  if (mode == 0) {
    ASSERT_TRUE(c.append(j, hist.token(j), flags).ok());
    return;
  }
  const Status st =
      c.begin_append(j, mode == 1 ? std::span<const uint8_t>(flags) : std::span<const uint8_t>());
  ASSERT_TRUE(st.ok()) << st.to_string();
  scenario_append_rows(src, c, hist, j);
  const KvLayout& layout = c.layout();
  if (mode == 2) {
    ASSERT_TRUE(c.set_flags(j, flags).ok());
  }
  if (mode == 3) {
    for (int64_t s = 0; s < layout.blocks.n_slots(); ++s) c.set_flag_unchecked(s, flags[s]);
  }
}

// The whole scenario on `src` for `layout`: returns its transcript.
// `between` runs after every operation (a device source flushes there on
// some calls, to mix flushed and pending ops); may be empty.
inline Transcript run_page_scenario(PageSource& src, const KvLayout& layout, uint32_t seed,
                                    const std::function<void(int64_t step)>& between = {}) {
  Transcript t;
  std::mt19937 rng(seed);
  const int64_t n_tokens = 3 * (layout.n_sink_tokens + layout.n_window_tokens) + 7;
  const History hist(layout, n_tokens, 0.6, rng);
  int64_t step = 0;
  auto tick = [&] {
    if (between) between(step);
    ++step;
  };

  // Token by token, every append mode, so tokens leave the window with
  // flags given every way.
  Result<CompressedKvCache> a = CompressedKvCache::create(layout, &src);
  EXPECT_TRUE(a.ok()) << a.status().to_string();
  if (!a.ok()) return t;
  for (int64_t j = 0; j < n_tokens; ++j) {
    scenario_append(src, *a, hist, j, static_cast<int>(j % 4));
    tick();
    if (j % 5 == 4) record_cache(src, *a, "append@" + std::to_string(j), t);
  }
  record_cache(src, *a, "append", t);

  // One pass.
  const int64_t n_dense = n_tokens - 3;
  const std::vector<uint8_t> flags = hist.prefix_flags(n_dense);
  Result<CompressedKvCache> b = CompressedKvCache::build_from_dense(
      layout, &src, n_dense, hist.dense(), flags, hist.dense_gate());
  EXPECT_TRUE(b.ok()) << b.status().to_string();
  if (!b.ok()) return t;
  tick();
  record_cache(src, *b, "dense", t);

  // Staged, slots in reverse order.
  Result<CompressedKvCache> c = CompressedKvCache::begin_build(layout, &src, n_dense);
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  if (!c.ok()) return t;
  for (int64_t s = layout.blocks.n_slots() - 1; s >= 0; --s) {
    const std::vector<uint8_t> sf = slot_flags(hist, s, n_dense);
    const Status st = c->fill_slot(s, hist.dense(), sf, hist.dense_gate());
    EXPECT_TRUE(st.ok()) << st.to_string();
    tick();
  }
  EXPECT_TRUE(c->finish_build().ok());
  record_cache(src, *c, "staged", t);
  // The staged cache goes on decoding.
  for (int64_t j = n_dense; j < n_tokens; ++j) {
    scenario_append(src, *c, hist, j, static_cast<int>(j % 4));
    tick();
  }
  record_cache(src, *c, "staged+append", t);

  // Wire image of the token-by-token cache, its pages copied (page to
  // page) into fresh pages and adopted there; then more tokens.
  Result<WireImage> image = export_wire_image(*a);
  EXPECT_TRUE(image.ok()) << image.status().to_string();
  if (!image.ok()) return t;
  std::vector<PageId> landed;
  for (PageId from : image->pages) {
    Result<PageId> to = src.allocate();
    EXPECT_TRUE(to.ok()) << to.status().to_string();
    if (!to.ok()) return t;
    src.copy(src.data(*to), src.data(from), src.page_bytes());
    landed.push_back(*to);
  }
  tick();
  const int64_t first_new = a->n_tokens();
  { CompressedKvCache gone = std::move(*a); }  // the exported cache's pages go back
  Result<CompressedKvCache> adopted = adopt_wire_image(layout, &src, image->descriptor, landed);
  EXPECT_TRUE(adopted.ok()) << adopted.status().to_string();
  if (!adopted.ok()) return t;
  record_cache(src, *adopted, "adopted", t);
  std::mt19937 rng2(seed + 1);
  const History more(layout, first_new + layout.n_window_tokens + 5, 0.5, rng2);
  for (int64_t j = first_new; j < more.n_tokens; ++j) {
    scenario_append(src, *adopted, more, j, static_cast<int>(j % 4));
    tick();
  }
  record_cache(src, *adopted, "adopted+append", t);
  return t;
}

// The layouts the scenario runs on: no gate state, gate state of context
// `cache` (retained tokens keep gate rows) and of context `window`; ragged
// block maps; small pages so lists span several pages.
inline std::vector<std::pair<std::string, KvLayout>> page_scenario_layouts() {
  std::mt19937 rng(7);
  std::vector<std::pair<std::string, KvLayout>> out;
  out.emplace_back("plain", make_layout(random_block_map(4, 2, rng), 8, 2, 5));
  out.emplace_back("gate_cache", make_layout(random_block_map(5, 2, rng), 8, 1, 4, 16, true));
  out.emplace_back("gate_window", make_layout(random_block_map(3, 3, rng), 16, 2, 3, 8, false));
  return out;
}

}  // namespace kvgate::kvstore::testing
