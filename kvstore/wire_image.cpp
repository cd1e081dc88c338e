#include "kvstore/wire_image.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common/crc32c.h"

namespace kvgate::kvstore {

// Friend of CompressedKvCache: walks its page lists in wire order and, for
// adoption, sizes them and fills them with landed page ids.
struct WireAccess {
  // Calls page(id) for every page id of slot s of `c` in wire order (id is
  // a PageId& or const PageId&).
  template <typename Cache, typename PageFn>
  static void visit_slot(Cache& c, int64_t s, PageFn page) {
    const BlockMap& map = c.layout_.blocks;
    const int64_t n_layers = map.n_layers();
    const int64_t n_heads = map.n_kv_heads();
    const int64_t n_slots = map.n_slots();
    const int64_t rounds = c.n_ring_pages_;
    const int64_t h = map.slot_head(s);
    const LayerBlock& blk = map.slot_block(s);
    for (int64_t l = blk.first_layer; l < blk.end_layer(); ++l) {
      for (int64_t r = 0; r < rounds; ++r) page(c.ring_k_pages_[(r * n_layers + l) * n_heads + h]);
      for (int64_t r = 0; r < rounds; ++r) page(c.ring_v_pages_[(r * n_layers + l) * n_heads + h]);
    }
    auto& d = c.distant_[s];
    for (auto& id : d.k_pages) page(id);
    for (auto& v : d.v_pages) {
      for (auto& id : v) page(id);
    }
    for (auto& id : d.pos_pages) page(id);
    for (auto& id : d.gate_pages) page(id);
    for (int64_t r = 0; r < c.n_gate_ring_pages_; ++r) page(c.gate_ring_pages_[r * n_slots + s]);
  }

  // The retained positions of slot s into `out` (resized), one read() per
  // position page: on a device source each read synchronizes, so a page at
  // a time rather than a position at a time.
  static void read_positions(const CompressedKvCache& c, int64_t s, std::vector<int32_t>& out) {
    const auto& d = c.distant_[s];
    out.resize(static_cast<size_t>(d.n_tokens));
    const int64_t per_page = c.positions_per_page_;
    for (int64_t i = 0; i < d.n_tokens; i += per_page) {
      const int64_t n = std::min(per_page, d.n_tokens - i);
      c.pool_->read(out.data() + i, c.pool_->data(d.pos_pages[i / per_page]), n * kPositionBytes);
    }
  }

  static int64_t n_ring_pages(const CompressedKvCache& c) { return c.n_ring_pages_; }
  static int64_t n_gate_ring_pages(const CompressedKvCache& c) { return c.n_gate_ring_pages_; }
  static PageSource* source(const CompressedKvCache& c) { return c.pool_; }
  static std::span<const uint8_t> pending(const CompressedKvCache& c, int64_t n_rows) {
    return std::span<const uint8_t>(c.pending_flags_)
        .first(static_cast<size_t>(n_rows * c.layout_.blocks.n_slots()));
  }

  // Sizes every list of the empty cache `c` for the state (rounds, R per
  // slot) and sets its counts; the ids are filled by visit_slot() next.
  static void shape(CompressedKvCache& c, int64_t n_tokens, int64_t rounds, int64_t gate_rounds,
                    std::span<const int64_t> retained, std::span<const uint8_t> pending,
                    int64_t n_pages) {
    const BlockMap& map = c.layout_.blocks;
    const PageGeometry geo = c.geometry();
    const auto lh = static_cast<size_t>(map.n_layers() * map.n_kv_heads());
    c.ring_k_pages_.resize(rounds * lh);
    c.ring_v_pages_.resize(rounds * lh);
    c.n_ring_pages_ = rounds;
    c.gate_ring_pages_.resize(static_cast<size_t>(gate_rounds * map.n_slots()));
    c.n_gate_ring_pages_ = gate_rounds;
    for (int64_t s = 0; s < map.n_slots(); ++s) {
      auto& d = c.distant_[s];
      const int64_t r = retained[s];
      d.k_pages.resize(static_cast<size_t>(PageGeometry::pages_for(r, geo.page_tokens)));
      for (auto& v : d.v_pages) v.resize(d.k_pages.size());
      d.pos_pages.resize(static_cast<size_t>(PageGeometry::pages_for(r, geo.positions_per_page)));
      d.gate_pages.resize(static_cast<size_t>(geo.retained_gate_pages(r)));
      d.n_tokens = r;
    }
    std::copy(pending.begin(), pending.end(), c.pending_flags_.begin());
    c.n_tokens_ = n_tokens;
    c.n_pages_held_ = n_pages;
  }

  // Forgets every page without returning any (they stay the caller's).
  static void disown(CompressedKvCache& c) {
    c.ring_k_pages_.clear();
    c.ring_v_pages_.clear();
    c.gate_ring_pages_.clear();
    for (auto& d : c.distant_) {
      d.k_pages.clear();
      for (auto& v : d.v_pages) v.clear();
      d.pos_pages.clear();
      d.gate_pages.clear();
      d.n_tokens = 0;
    }
    c.n_ring_pages_ = 0;
    c.n_gate_ring_pages_ = 0;
    c.n_pages_held_ = 0;
    c.n_tokens_ = 0;
  }
};

namespace {

constexpr char kMagic[4] = {'K', 'V', 'G', 'W'};
constexpr size_t kHeaderBytes = 8;  // magic + version
constexpr size_t kCrcBytes = 4;

std::string num(int64_t v) {
  return std::to_string(v);
}

void put_u32(std::vector<std::byte>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::byte>(v >> (8 * i)));
}

void put_u64(std::vector<std::byte>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>(v >> (8 * i)));
}

uint32_t load_u32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(std::to_integer<uint8_t>(p[i])) << (8 * i);
  return v;
}

// Bounds-checked little-endian reads; running off the end is DATA_LOSS.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes) : bytes_(bytes) {}

  Status u32(uint32_t& v, const char* what) {
    KVGATE_RETURN_IF_ERROR(need(4, what));
    v = load_u32(bytes_.data() + at_);
    at_ += 4;
    return Status();
  }
  Status u64(uint64_t& v, const char* what) {
    KVGATE_RETURN_IF_ERROR(need(8, what));
    v = static_cast<uint64_t>(load_u32(bytes_.data() + at_)) |
        static_cast<uint64_t>(load_u32(bytes_.data() + at_ + 4)) << 32;
    at_ += 8;
    return Status();
  }
  Status bytes(size_t n, std::span<const std::byte>& out, const char* what) {
    KVGATE_RETURN_IF_ERROR(need(n, what));
    out = bytes_.subspan(at_, n);
    at_ += n;
    return Status();
  }
  size_t left() const { return bytes_.size() - at_; }

 private:
  Status need(size_t n, const char* what) const {
    if (left() < n) {
      return data_loss(std::string("wire image: descriptor truncated in ") + what + " (" +
                       std::to_string(left()) + " bytes left, " + std::to_string(n) + " needed)");
    }
    return Status();
  }

  std::span<const std::byte> bytes_;
  size_t at_ = 0;
};

// A field that must equal the receiver's.
Status expect_equal(uint64_t got, int64_t want, const char* what) {
  if (got != static_cast<uint64_t>(want)) {
    return invalid_argument(std::string("wire image: ") + what + " " + std::to_string(got) +
                            ", the receiver's is " + num(want));
  }
  return Status();
}

// The descriptor's gate_state_retained: 1 iff retained tokens keep gate rows
// (only meaningful with gate state, so a layout without any writes 0
// whatever its flag says).
uint32_t retained_gate_flag(const KvLayout& layout) {
  return layout.retained_gate_bytes_per_token() > 0 ? 1 : 0;
}

// Window rows holding pending flags at length t: [0, n_rows) of the ring
// rows past the sinks.
int64_t pending_rows(const KvLayout& layout, int64_t n_tokens) {
  return std::clamp<int64_t>(n_tokens - layout.n_sink_tokens, 0, layout.n_window_tokens);
}

// A descriptor checked against the receiver's layout and page size.
struct Parsed {
  PageGeometry geometry;
  int64_t n_tokens = 0;
  std::vector<int64_t> retained;  // by slot (the receiver's n_slots)
  std::span<const uint8_t> pending;
  int64_t ring_rounds = 0;
  int64_t gate_rounds = 0;
  int64_t n_pages = 0;
};

Result<Parsed> parse(std::span<const std::byte> d, const KvLayout& layout, int64_t page_bytes) {
  KVGATE_RETURN_IF_ERROR(validate_layout(layout));
  Parsed out;
  {
    Result<PageGeometry> geo = page_geometry(layout, page_bytes);
    if (!geo.ok()) return invalid_argument("wire image: receiver's " + geo.status().message());
    out.geometry = *geo;
  }
  // Header, version and CRC before any field: a version we do not know may
  // lay out everything after its header differently.
  if (d.size() < kHeaderBytes) {
    return data_loss("wire image: descriptor truncated (" + std::to_string(d.size()) +
                     " bytes, the header alone takes " + std::to_string(kHeaderBytes) + ")");
  }
  if (std::memcmp(d.data(), kMagic, sizeof(kMagic)) != 0) {
    return data_loss("wire image: bad magic (not a KV wire image descriptor)");
  }
  const uint32_t version = load_u32(d.data() + 4);
  if (version != kWireImageVersion) {
    return unimplemented("wire image: descriptor version " + std::to_string(version) +
                         ", this node reads version " + std::to_string(kWireImageVersion));
  }
  if (d.size() < kHeaderBytes + kCrcBytes) {
    return data_loss("wire image: descriptor truncated (" + std::to_string(d.size()) +
                     " bytes, no room for its CRC)");
  }
  const size_t body_end = d.size() - kCrcBytes;
  const uint32_t want_crc = load_u32(d.data() + body_end);
  const uint32_t got_crc = crc32c(d.data(), body_end);
  if (want_crc != got_crc) {
    return data_loss("wire image: descriptor CRC32C mismatch (truncated or corrupted)");
  }

  Reader in(d.subspan(kHeaderBytes, body_end - kHeaderBytes));
  const BlockMap& map = layout.blocks;
  uint32_t u32 = 0;
  uint64_t u64 = 0;
  KVGATE_RETURN_IF_ERROR(in.u32(u32, "n_layers"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u32, layout.n_layers(), "n_layers"));
  KVGATE_RETURN_IF_ERROR(in.u32(u32, "n_kv_heads"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u32, layout.n_kv_heads(), "n_kv_heads"));
  KVGATE_RETURN_IF_ERROR(in.u32(u32, "head_dim"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u32, layout.head_dim, "head_dim"));
  KVGATE_RETURN_IF_ERROR(in.u32(u32, "elem_bytes"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u32, layout.elem_bytes, "elem_bytes"));
  KVGATE_RETURN_IF_ERROR(in.u32(u32, "gate_state_bytes_per_token"));
  KVGATE_RETURN_IF_ERROR(
      expect_equal(u32, layout.gate_state_bytes_per_token, "gate_state_bytes_per_token"));
  KVGATE_RETURN_IF_ERROR(in.u32(u32, "gate_state_retained"));
  if (u32 != retained_gate_flag(layout)) {
    return invalid_argument(
        "wire image: gate_state_retained " + std::to_string(u32) + ", the receiver's is " +
        std::to_string(retained_gate_flag(layout)) +
        " (the gates' context differs: 1 keeps gate rows of retained tokens, context 'cache'; "
        "0 does not, context 'window')");
  }
  KVGATE_RETURN_IF_ERROR(in.u64(u64, "n_sink_tokens"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u64, layout.n_sink_tokens, "n_sink_tokens"));
  KVGATE_RETURN_IF_ERROR(in.u64(u64, "n_window_tokens"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u64, layout.n_window_tokens, "n_window_tokens"));
  KVGATE_RETURN_IF_ERROR(in.u64(u64, "page_bytes"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u64, page_bytes, "page_bytes"));
  // The block map, head by head; the counts are checked against the
  // receiver's before the blocks are read, so reading is bounded by it.
  for (int64_t h = 0; h < map.n_kv_heads(); ++h) {
    KVGATE_RETURN_IF_ERROR(in.u32(u32, "block map"));
    if (u32 != static_cast<uint64_t>(map.n_blocks(h))) {
      return invalid_argument("wire image: KV head " + num(h) + " has " + std::to_string(u32) +
                              " blocks, the receiver's block map has " + num(map.n_blocks(h)));
    }
    for (int64_t b = 0; b < map.n_blocks(h); ++b) {
      uint32_t first = 0;
      uint32_t n = 0;
      KVGATE_RETURN_IF_ERROR(in.u32(first, "block map"));
      KVGATE_RETURN_IF_ERROR(in.u32(n, "block map"));
      const LayerBlock& want = map.block(h, b);
      if (first != static_cast<uint32_t>(want.first_layer) ||
          n != static_cast<uint32_t>(want.n_layers)) {
        return invalid_argument("wire image: KV head " + num(h) + " block " + num(b) +
                                " is layers " + std::to_string(first) + "+" + std::to_string(n) +
                                ", the receiver's is " + num(want.first_layer) + "+" +
                                num(want.n_layers));
      }
    }
  }

  KVGATE_RETURN_IF_ERROR(in.u64(u64, "n_tokens"));
  if (u64 > static_cast<uint64_t>(kMaxTokens)) {
    return invalid_argument("wire image: n_tokens " + std::to_string(u64) + " past 2^31");
  }
  out.n_tokens = static_cast<int64_t>(u64);
  const int64_t distant = layout.distant_tokens(out.n_tokens);
  const int64_t n_slots = map.n_slots();
  out.retained.resize(static_cast<size_t>(n_slots));
  for (int64_t s = 0; s < n_slots; ++s) {
    KVGATE_RETURN_IF_ERROR(in.u64(u64, "retained counts"));
    if (u64 > static_cast<uint64_t>(distant)) {
      return invalid_argument("wire image: slot " + num(s) + " retains " + std::to_string(u64) +
                              " tokens, more than the " + num(distant) + " distant ones of " +
                              num(out.n_tokens) + " tokens");
    }
    out.retained[s] = static_cast<int64_t>(u64);
  }
  const int64_t n_rows = pending_rows(layout, out.n_tokens);
  KVGATE_RETURN_IF_ERROR(in.u64(u64, "pending flag rows"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u64, n_rows, "pending flag rows (window tokens past sinks)"));
  std::span<const std::byte> flags;
  KVGATE_RETURN_IF_ERROR(in.bytes(static_cast<size_t>(n_rows * n_slots), flags, "pending flags"));
  out.pending = {reinterpret_cast<const uint8_t*>(flags.data()), flags.size()};
  for (size_t i = 0; i < out.pending.size(); ++i) {
    if (out.pending[i] > 1) {
      return invalid_argument("wire image: pending flag of window row " +
                              std::to_string(i / n_slots) + ", slot " +
                              std::to_string(i % n_slots) + " is " +
                              std::to_string(out.pending[i]) + ", expected 0 or 1");
    }
  }

  // Page counts: recomputed from the state, the descriptor's must agree.
  const PageGeometry& geo = out.geometry;
  const int64_t p = layout.proximal_tokens(out.n_tokens);
  out.ring_rounds = geo.ring_pages(p);
  out.gate_rounds = geo.gate_ring_pages(p);
  out.n_pages =
      2 * layout.n_layers() * layout.n_kv_heads() * out.ring_rounds + n_slots * out.gate_rounds;
  for (int64_t s = 0; s < n_slots; ++s) {
    out.n_pages += geo.retained_pages(out.retained[s], map.slot_block(s).n_layers);
  }
  KVGATE_RETURN_IF_ERROR(in.u64(u64, "ring pages"));
  KVGATE_RETURN_IF_ERROR(
      expect_equal(u64, out.ring_rounds, "pages per K/V ring (the state needs)"));
  KVGATE_RETURN_IF_ERROR(in.u64(u64, "gate ring pages"));
  KVGATE_RETURN_IF_ERROR(
      expect_equal(u64, out.gate_rounds, "pages per gate ring (the state needs)"));
  KVGATE_RETURN_IF_ERROR(in.u64(u64, "page count"));
  KVGATE_RETURN_IF_ERROR(expect_equal(u64, out.n_pages, "page count (the state needs)"));
  if (in.left() != 0) {
    return data_loss("wire image: " + std::to_string(in.left()) +
                     " trailing bytes after the descriptor's fields");
  }
  return out;
}

// Appends the pages of `group`'s slots to `out`, in wire order; on error
// `out` is unchanged.
Status append_group_pages(const CompressedKvCache& cache, const WireSlotGroup& group,
                          std::vector<PageId>& out) {
  if (WireAccess::source(cache) == nullptr) {
    return failed_precondition("wire image: pages of a moved-from cache");
  }
  const BlockMap& map = cache.layout().blocks;
  for (int64_t s : group.slots) {
    if (s < 0 || s >= map.n_slots()) {
      return invalid_argument("wire image: slot " + num(s) + " not in [0, " + num(map.n_slots()) +
                              ")");
    }
    const LayerBlock& blk = map.slot_block(s);
    if (blk.end_layer() - 1 != group.last_layer) {
      return invalid_argument("wire image: slot " + num(s) + " (KV head " + num(map.slot_head(s)) +
                              ") has layers " + num(blk.first_layer) + "-" +
                              num(blk.end_layer() - 1) + ", not a block ending at the group's " +
                              "last layer " + num(group.last_layer));
    }
    if (!cache.slot_filled(s)) {
      return failed_precondition("wire image: slot " + num(s) + " (KV head " +
                                 num(map.slot_head(s)) + ", layers " + num(blk.first_layer) + "-" +
                                 num(blk.end_layer() - 1) + ") is not filled yet");
    }
  }
  for (int64_t s : group.slots) {
    WireAccess::visit_slot(cache, s, [&](const PageId& id) { out.push_back(id); });
  }
  return Status();
}

}  // namespace

std::vector<WireSlotGroup> wire_slot_groups(const KvLayout& layout) {
  const BlockMap& map = layout.blocks;
  // Slots by their block's last layer (a segment is ready as soon as that
  // layer is computed), then by head.
  std::vector<int64_t> order(static_cast<size_t>(map.n_slots()));
  for (int64_t s = 0; s < map.n_slots(); ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t ea = map.slot_block(a).end_layer();
    const int64_t eb = map.slot_block(b).end_layer();
    return ea != eb ? ea < eb : map.slot_head(a) < map.slot_head(b);
  });
  std::vector<WireSlotGroup> groups;
  for (int64_t s : order) {
    const int64_t last = map.slot_block(s).end_layer() - 1;
    if (groups.empty() || groups.back().last_layer != last) groups.push_back({last, {}});
    groups.back().slots.push_back(s);
  }
  return groups;
}

Result<std::vector<PageId>> wire_group_pages(const CompressedKvCache& cache,
                                             const WireSlotGroup& group) {
  std::vector<PageId> pages;
  KVGATE_RETURN_IF_ERROR(append_group_pages(cache, group, pages));
  return pages;
}

Result<WireImage> export_wire_image(const CompressedKvCache& cache) {
  PageSource* source = WireAccess::source(cache);
  if (source == nullptr) return failed_precondition("wire image: export of a moved-from cache");
  if (cache.building()) {
    return failed_precondition(
        "wire image: export of a cache whose staged build is not finished (finish_build())");
  }
  const KvLayout& layout = cache.layout();
  const BlockMap& map = layout.blocks;
  const int64_t n_slots = map.n_slots();
  const int64_t n_tokens = cache.n_tokens();

  WireImage image;
  image.page_bytes = source->page_bytes();
  std::vector<std::byte>& out = image.descriptor;
  out.insert(out.end(), reinterpret_cast<const std::byte*>(kMagic),
             reinterpret_cast<const std::byte*>(kMagic) + sizeof(kMagic));
  put_u32(out, kWireImageVersion);
  put_u32(out, static_cast<uint32_t>(layout.n_layers()));
  put_u32(out, static_cast<uint32_t>(layout.n_kv_heads()));
  put_u32(out, static_cast<uint32_t>(layout.head_dim));
  put_u32(out, static_cast<uint32_t>(layout.elem_bytes));
  put_u32(out, static_cast<uint32_t>(layout.gate_state_bytes_per_token));
  put_u32(out, retained_gate_flag(layout));
  put_u64(out, static_cast<uint64_t>(layout.n_sink_tokens));
  put_u64(out, static_cast<uint64_t>(layout.n_window_tokens));
  put_u64(out, static_cast<uint64_t>(image.page_bytes));
  for (int64_t h = 0; h < map.n_kv_heads(); ++h) {
    put_u32(out, static_cast<uint32_t>(map.n_blocks(h)));
    for (int64_t b = 0; b < map.n_blocks(h); ++b) {
      put_u32(out, static_cast<uint32_t>(map.block(h, b).first_layer));
      put_u32(out, static_cast<uint32_t>(map.block(h, b).n_layers));
    }
  }
  put_u64(out, static_cast<uint64_t>(n_tokens));
  for (int64_t s = 0; s < n_slots; ++s)
    put_u64(out, static_cast<uint64_t>(cache.retained_tokens(s)));
  const int64_t n_rows = pending_rows(layout, n_tokens);
  put_u64(out, static_cast<uint64_t>(n_rows));
  for (uint8_t f : WireAccess::pending(cache, n_rows)) out.push_back(static_cast<std::byte>(f));
  put_u64(out, static_cast<uint64_t>(WireAccess::n_ring_pages(cache)));
  put_u64(out, static_cast<uint64_t>(WireAccess::n_gate_ring_pages(cache)));
  put_u64(out, static_cast<uint64_t>(cache.n_pages()));
  put_u32(out, crc32c(out.data(), out.size()));

  image.pages.reserve(static_cast<size_t>(cache.n_pages()));
  for (const WireSlotGroup& group : wire_slot_groups(layout)) {
    const auto begin = static_cast<int64_t>(image.pages.size());
    KVGATE_RETURN_IF_ERROR(append_group_pages(cache, group, image.pages));
    const auto end = static_cast<int64_t>(image.pages.size());
    if (end > begin) image.segments.push_back({begin, end - begin, group.last_layer});
  }
  if (static_cast<int64_t>(image.pages.size()) != cache.n_pages()) {
    return internal_error("wire image: listed " + std::to_string(image.pages.size()) +
                          " pages of a cache holding " + num(cache.n_pages()));
  }
  return image;
}

int64_t wire_image_pages(const CompressedKvCache& cache) {
  return cache.n_pages();
}

Result<int64_t> check_wire_descriptor(std::span<const std::byte> descriptor, const KvLayout& layout,
                                      int64_t page_bytes) {
  KVGATE_ASSIGN_OR_RETURN(const Parsed parsed, parse(descriptor, layout, page_bytes));
  return parsed.n_pages;
}

Result<CompressedKvCache> adopt_wire_image(const KvLayout& layout, PageSource* source,
                                           std::span<const std::byte> descriptor,
                                           std::span<const PageId> pages) {
  if (source == nullptr) return invalid_argument("wire image: no page source to adopt into");
  KVGATE_ASSIGN_OR_RETURN(const Parsed parsed, parse(descriptor, layout, source->page_bytes()));
  const auto given = static_cast<int64_t>(pages.size());
  if (given < parsed.n_pages) {
    return resource_exhausted("wire image: the image needs " + num(parsed.n_pages) + " pages of " +
                              num(source->page_bytes()) + " bytes, " + num(given) + " given");
  }
  // Every page id once (a repeated id would be freed twice later). Copies
  // the ids first: `pages` may be the source's own list (a lease's pages),
  // which returning surplus pages below reorders.
  std::vector<PageId> ids(pages.begin(), pages.end());
  {
    std::vector<int32_t> sorted(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) sorted[i] = ids[i].value;
    std::sort(sorted.begin(), sorted.end());
    if (!sorted.empty() && sorted.front() < 0) {
      return invalid_argument("wire image: page id " + std::to_string(sorted.front()) +
                              " is not a page");
    }
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      return invalid_argument("wire image: page " + std::to_string(*dup) + " given twice");
    }
  }

  KVGATE_ASSIGN_OR_RETURN(CompressedKvCache cache, CompressedKvCache::create(layout, source));
  WireAccess::shape(cache, parsed.n_tokens, parsed.ring_rounds, parsed.gate_rounds, parsed.retained,
                    parsed.pending, parsed.n_pages);
  int64_t next = 0;
  for (const WireSlotGroup& group : wire_slot_groups(layout)) {
    for (int64_t s : group.slots) {
      WireAccess::visit_slot(cache, s, [&](PageId& id) { id = ids[static_cast<size_t>(next++)]; });
    }
  }
  if (next != parsed.n_pages) {
    WireAccess::disown(cache);
    return internal_error("wire image: placed " + num(next) + " pages of " + num(parsed.n_pages));
  }
  // The positions are the only landed content the cache interprets: each
  // slot's must increase within the distant range, or the pages did not
  // land in wire order (or were corrupted past the segment CRCs).
  const int64_t n_sink = layout.n_sink_tokens;
  const int64_t window_begin = std::max(n_sink, parsed.n_tokens - layout.n_window_tokens);
  std::vector<int32_t> positions;
  for (int64_t s = 0; s < layout.blocks.n_slots(); ++s) {
    WireAccess::read_positions(cache, s, positions);
    int64_t prev = n_sink - 1;
    for (int64_t i = 0; i < cache.retained_tokens(s); ++i) {
      const int64_t pos = positions[static_cast<size_t>(i)];
      if (pos <= prev || pos >= window_begin) {
        WireAccess::disown(cache);
        return data_loss("wire image: slot " + num(s) + " retained token " + num(i) +
                         " has position " + num(pos) + ", expected increasing positions in [" +
                         num(n_sink) + ", " + num(window_begin) +
                         ") (pages out of wire order or corrupted)");
      }
      prev = pos;
    }
  }
  // Surplus pages back to the source, last first (a lease moves its last
  // page into a returned page's place, so this keeps its order).
  for (int64_t i = given - 1; i >= parsed.n_pages; --i) {
    const Status st = source->free(ids[static_cast<size_t>(i)]);
    if (!st.ok()) {
      WireAccess::disown(cache);
      return invalid_argument("wire image: surplus page " + std::to_string(ids[i].value) +
                              " is not the page source's: " + st.message());
    }
  }
  return cache;
}

}  // namespace kvgate::kvstore
