// Fuzz target for the KV wire image descriptor (kvstore/wire_image.h): what
// a decode node parses from a peer's TransferManifest before it adopts the
// landed pages. libFuzzer binary wire_image_fuzz (clang, KVGATE_FUZZ=ON):
//   wire_image_fuzz -max_total_time=120 [CORPUS_DIR]
// (tests/unit/kvstore/wire_image_test.cpp runs seeded random mutations of
// valid descriptors through the same checks with any compiler.)
//
// Input: byte 0 picks the receiver and the mode, the rest is a descriptor:
//   bits 0-1  one of four fixed caches (ragged blocks with gate state and a
//             wrapped window; uniform blocks without gate state; a dense map
//             holding only sinks; an empty cache), each exported once
//   bit 2     the rest is XORed onto that cache's valid descriptor (zero
//             bytes = the valid one, so the fuzzer starts next to it
//             without a corpus); otherwise taken as is
//   bit 3     the trailing CRC32C is recomputed, so mutations reach the
//             field checks
// The descriptor goes through check_wire_descriptor() and, on a lease
// holding the exported pages landed in wire order plus two, through
// adopt_wire_image(). Checked: no crash or sanitizer report; errors carry
// a documented code and "wire image: "; check and adopt agree; a failed
// adopt keeps and returns no page; an adopted cache holds exactly the
// pages check announced, matches the footprint formula, re-exports the
// same descriptor, takes one more token and, destroyed, gives every page
// back to the lease.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "common/crc32c.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/footprint.h"
#include "kvstore/lease_manager.h"
#include "kvstore/wire_image.h"

namespace {

using namespace kvgate;
using namespace kvgate::kvstore;

#define FUZZ_CHECK(cond)                                                                   \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "wire_image_fuzz: check failed: %s (%s:%d)\n", #cond, __FILE__, \
                   __LINE__);                                                              \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)

constexpr int64_t kPageBytes = 64;

// A cache in its own pool, its image, and K/V for one more token.
struct Sender {
  KvLayout layout;
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<CompressedKvCache> cache;
  WireImage image;
  std::vector<fp16_t> row;  // one token's K (= V, = gate) rows, all zero-ish
};

// Deterministic fp16 values (no RNG: the target must be reproducible).
fp16_t value(int64_t i) {
  return static_cast<fp16_t>(0x3000 + (i * 37) % 0x0800);  // in [0.125, 0.5)
}

Sender make_sender(int which) {
  Sender s;
  int64_t n_layers = 4, n_heads = 2, head_dim = 8, n_tokens = 30;
  Result<BlockMap> map = BlockMap::uniform(n_layers, n_heads, 2);
  s.layout.n_sink_tokens = 2;
  s.layout.n_window_tokens = 3;
  switch (which) {
    case 0:
      map = BlockMap::create(n_layers, {{{0, 2}, {2, 2}}, {{0, 1}, {1, 3}}});
      s.layout.gate_state_bytes_per_token = 16;
      break;
    case 1:
      head_dim = 16;
      break;
    case 4:  // gates of context `window`: no gate rows for retained tokens
      map = BlockMap::create(n_layers, {{{0, 2}, {2, 2}}, {{0, 1}, {1, 3}}});
      s.layout.gate_state_bytes_per_token = 16;
      s.layout.gate_state_retained = false;
      break;
    case 2:
      map = BlockMap::dense(n_layers, n_heads);
      n_tokens = 2;
      break;
    default:
      n_tokens = 0;
      break;
  }
  FUZZ_CHECK(map.ok());
  s.layout.blocks = *map;
  s.layout.head_dim = head_dim;
  auto pool = PagePool::create(kPageBytes, kPageBytes * 4096);
  FUZZ_CHECK(pool.ok());
  s.pool = std::move(*pool);
  const int64_t per_token = n_layers * n_heads * head_dim;
  const int64_t n_slots = s.layout.blocks.n_slots();
  std::vector<fp16_t> kv(std::max<int64_t>(n_tokens, 1) * per_token);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = value(static_cast<int64_t>(i));
  std::vector<fp16_t> gate(std::max<int64_t>(n_tokens, 1) * n_slots * s.layout.gate_row_elems());
  for (size_t i = 0; i < gate.size(); ++i) gate[i] = value(static_cast<int64_t>(i) + 5);
  std::vector<uint8_t> flags(n_slots * n_tokens);
  for (size_t i = 0; i < flags.size(); ++i) flags[i] = (i * 7 % 5) < 3 ? 1 : 0;
  const DenseKv dense{kv.data(), kv.data(), per_token, n_heads * head_dim, head_dim};
  DenseGate dense_gate;
  if (s.layout.has_gate_state()) {
    dense_gate = {gate.data(), n_slots * s.layout.gate_row_elems(), s.layout.gate_row_elems()};
  }
  auto built = CompressedKvCache::build_from_dense(s.layout, s.pool.get(), n_tokens, dense, flags,
                                                   dense_gate);
  FUZZ_CHECK(built.ok());
  s.cache = std::make_unique<CompressedKvCache>(std::move(*built));
  auto image = export_wire_image(*s.cache);
  FUZZ_CHECK(image.ok());
  s.image = std::move(*image);
  s.row.assign(std::max(per_token, n_slots * std::max<int64_t>(s.layout.gate_row_elems(), 1)),
               value(3));
  return s;
}

struct World {
  Sender senders[5];
  std::unique_ptr<PagePool> pool;  // the decode node's
  std::unique_ptr<LeaseManager> leases;
  uint64_t next_request = 1;

  World() {
    for (int i = 0; i < 5; ++i) senders[i] = make_sender(i);
    auto pool_b = PagePool::create(kPageBytes, kPageBytes * 8192);
    FUZZ_CHECK(pool_b.ok());
    pool = std::move(*pool_b);
    auto m = LeaseManager::create(pool.get());
    FUZZ_CHECK(m.ok());
    leases = std::move(*m);
  }
};

World& world() {
  static World* w = new World();  // never destroyed: no exit-time order issues
  return *w;
}

void check_error(const Status& s) {
  FUZZ_CHECK(!s.ok());
  FUZZ_CHECK(s.message().rfind("wire image: ", 0) == 0);
  const StatusCode c = s.code();
  FUZZ_CHECK(c == StatusCode::kDataLoss || c == StatusCode::kInvalidArgument ||
             c == StatusCode::kUnimplemented || c == StatusCode::kResourceExhausted);
}

std::vector<int64_t> retained_counts(const CompressedKvCache& c) {
  std::vector<int64_t> r(static_cast<size_t>(c.layout().blocks.n_slots()));
  for (size_t s = 0; s < r.size(); ++s) r[s] = c.retained_tokens(static_cast<int64_t>(s));
  return r;
}

void run(const Sender& sender, std::span<const std::byte> descriptor) {
  World& w = world();
  const auto n = static_cast<int64_t>(sender.image.pages.size());
  auto checked = check_wire_descriptor(descriptor, sender.layout, kPageBytes);
  if (!checked.ok()) check_error(checked.status());

  // A lease with the image landed in wire order, two surplus pages, and
  // room for one more token.
  const auto lease = w.leases->grant(RequestId{w.next_request++}, (n + 64) * kPageBytes,
                                     std::chrono::seconds(10), LeaseClock::time_point{});
  FUZZ_CHECK(lease.ok());
  auto ids = w.leases->take_pages(*lease, n + 2);
  FUZZ_CHECK(ids.ok());
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(w.pool->data((*ids)[i]), sender.pool->data(sender.image.pages[i]), kPageBytes);
  }
  bool kept = false;
  {
    LeasePages source(w.leases.get(), *lease);
    auto adopted = adopt_wire_image(sender.layout, &source, descriptor, *ids);
    kept = adopted.ok();
    const int64_t taken = w.leases->info(*lease)->taken_pages;
    if (!checked.ok()) {
      FUZZ_CHECK(!adopted.ok() && adopted.status().code() == checked.status().code());
    }
    if (!adopted.ok()) {
      check_error(adopted.status());
      FUZZ_CHECK(taken == n + 2);  // nothing kept, nothing returned
      FUZZ_CHECK(checked.ok() || adopted.status().code() == checked.status().code());
      if (checked.ok()) {
        FUZZ_CHECK(adopted.status().code() == StatusCode::kDataLoss ||
                   (adopted.status().code() == StatusCode::kResourceExhausted && *checked > n + 2));
      }
    } else {
      FUZZ_CHECK(checked.ok() && *checked <= n + 2);
      CompressedKvCache& c = *adopted;
      FUZZ_CHECK(c.n_pages() == *checked && taken == *checked);
      const std::vector<int64_t> r = retained_counts(c);
      auto pages = state_pages(sender.layout, kPageBytes, c.n_tokens(), r);
      FUZZ_CHECK(pages.ok() && *pages == *checked);
      auto f = footprint(sender.layout, c.n_tokens(), r);
      FUZZ_CHECK(f.ok() && f->total_bytes() == c.bytes());
      auto again = export_wire_image(c);
      FUZZ_CHECK(again.ok() && again->descriptor.size() == descriptor.size() &&
                 std::equal(descriptor.begin(), descriptor.end(), again->descriptor.begin()));
      for (int64_t s = 0; s < sender.layout.blocks.n_slots(); ++s) {
        for (int64_t i = 1; i < c.retained_tokens(s); ++i) {
          FUZZ_CHECK(c.retained_position(s, i - 1) < c.retained_position(s, i));
        }
      }
      if (c.n_tokens() < kMaxTokens) {
        const int64_t d = sender.layout.head_dim;
        TokenKv kv{sender.row.data(), sender.row.data(), sender.layout.n_kv_heads() * d, d};
        if (sender.layout.has_gate_state()) {
          kv.gate = sender.row.data();
          kv.gate_slot_stride = sender.layout.gate_row_elems();
        }
        const std::vector<uint8_t> one(static_cast<size_t>(sender.layout.blocks.n_slots()), 1);
        const Status st = c.append(c.n_tokens(), kv, one);
        FUZZ_CHECK(st.ok() || st.code() == StatusCode::kResourceExhausted);
        FUZZ_CHECK(w.leases->info(*lease)->taken_pages == c.n_pages());
      }
    }
  }
  // Destroyed, an adopted cache gave every page back to the lease; after a
  // failed adopt the caller still holds all of them.
  FUZZ_CHECK(w.leases->info(*lease)->taken_pages == (kept ? 0 : n + 2));
  FUZZ_CHECK(w.leases->release(*lease).ok());
  FUZZ_CHECK(w.pool->used_pages() == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // Bits 0-1 pick the sender, bit 4 the window-context gate sender instead.
  const Sender& sender = world().senders[(data[0] & 16) != 0 ? 4 : (data[0] & 3)];
  std::vector<std::byte> d(size - 1);
  if (size > 1) std::memcpy(d.data(), data + 1, size - 1);
  if ((data[0] & 4) != 0) {
    const auto& valid = sender.image.descriptor;
    for (size_t i = 0; i < d.size() && i < valid.size(); ++i) d[i] ^= valid[i];
  }
  if ((data[0] & 8) != 0 && d.size() >= 4) {
    const uint32_t crc = crc32c(d.data(), d.size() - 4);
    for (int i = 0; i < 4; ++i) d[d.size() - 4 + i] = static_cast<std::byte>(crc >> (8 * i));
  }
  run(sender, d);
  return 0;
}
