#include "kvstore/compressed_cache.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <string>
#include <utility>

namespace kvgate::kvstore {
CompressedKvCache::CompressedKvCache(const KvLayout& layout, PageSource* pool,
                                     const PageGeometry& geometry)
    : layout_(layout),
      pool_(pool),
      host_pages_(pool->host_accessible()),
      page_bytes_(geometry.page_bytes),
      page_tokens_(geometry.page_tokens),
      positions_per_page_(geometry.positions_per_page),
      gate_rows_per_page_(geometry.gate_rows_per_page),
      retained_gate_rows_per_page_(geometry.retained_gate_rows_per_page),
      gate_row_elems_(layout.gate_row_elems()) {
  const BlockMap& map = layout_.blocks;
  distant_.resize(map.n_slots());
  for (int64_t s = 0; s < map.n_slots(); ++s) {
    distant_[s].v_pages.resize(map.slot_block(s).n_layers);
  }
  pending_flags_.assign(layout_.n_window_tokens * map.n_slots(), 0);
}

Result<CompressedKvCache> CompressedKvCache::create(const KvLayout& layout, PageSource* pool) {
  KVGATE_RETURN_IF_ERROR(validate_layout(layout));
  if (pool == nullptr) return invalid_argument("compressed cache: no page source");
  Result<PageGeometry> geometry = page_geometry(layout, pool->page_bytes());
  if (!geometry.ok()) {
    return invalid_argument("compressed cache: " + geometry.status().message());
  }
  return CompressedKvCache(layout, pool, *geometry);
}

CompressedKvCache::CompressedKvCache(CompressedKvCache&& other) noexcept {
  *this = std::move(other);
}

CompressedKvCache& CompressedKvCache::operator=(CompressedKvCache&& other) noexcept {
  if (this == &other) return *this;
  release();
  layout_ = std::move(other.layout_);
  pool_ = std::exchange(other.pool_, nullptr);
  host_pages_ = other.host_pages_;
  page_bytes_ = other.page_bytes_;
  page_tokens_ = other.page_tokens_;
  positions_per_page_ = other.positions_per_page_;
  gate_rows_per_page_ = other.gate_rows_per_page_;
  retained_gate_rows_per_page_ = other.retained_gate_rows_per_page_;
  gate_row_elems_ = other.gate_row_elems_;
  n_tokens_ = std::exchange(other.n_tokens_, 0);
  n_pages_held_ = std::exchange(other.n_pages_held_, 0);
  n_ring_pages_ = std::exchange(other.n_ring_pages_, 0);
  ring_k_pages_ = std::move(other.ring_k_pages_);
  ring_v_pages_ = std::move(other.ring_v_pages_);
  gate_ring_pages_ = std::move(other.gate_ring_pages_);
  n_gate_ring_pages_ = std::exchange(other.n_gate_ring_pages_, 0);
  distant_ = std::move(other.distant_);
  pending_flags_ = std::move(other.pending_flags_);
  building_ = std::exchange(other.building_, false);
  slot_filled_ = std::move(other.slot_filled_);
  return *this;
}

CompressedKvCache::~CompressedKvCache() {
  release();
}

void CompressedKvCache::release() {
  if (pool_ == nullptr) return;
  auto give_back = [this](const std::vector<PageId>& pages) {
    for (PageId p : pages) {
      [[maybe_unused]] const Status st = pool_->free(p);
      assert(st.ok() && "compressed cache freed a page it did not hold");
    }
  };
  give_back(ring_k_pages_);
  give_back(ring_v_pages_);
  give_back(gate_ring_pages_);
  for (const DistantList& d : distant_) {
    give_back(d.k_pages);
    for (const auto& v : d.v_pages) give_back(v);
    give_back(d.pos_pages);
    give_back(d.gate_pages);
  }
  ring_k_pages_.clear();
  ring_v_pages_.clear();
  gate_ring_pages_.clear();
  distant_.clear();
  n_pages_held_ = 0;
  n_ring_pages_ = 0;
  n_gate_ring_pages_ = 0;
  n_tokens_ = 0;
  building_ = false;
  slot_filled_.clear();
}

PageId CompressedKvCache::take_page() {
  Result<PageId> page = pool_->allocate();
  // Callers check free_pages() first and the source has one owner thread.
  assert(page.ok() && "page source ran dry after the free-page check");
  ++n_pages_held_;
  return *page;
}

Status CompressedKvCache::validate_flags(std::span<const uint8_t> flags, int64_t n_tokens) const {
  const int64_t n_slots = layout_.blocks.n_slots();
  if (static_cast<int64_t>(flags.size()) != n_slots * n_tokens) {
    return invalid_argument("compressed cache: " + std::to_string(flags.size()) +
                            " flags given, expected " + std::to_string(n_slots * n_tokens) + " (" +
                            std::to_string(n_slots) + " (block, head) slots x " +
                            std::to_string(n_tokens) + " tokens)");
  }
  for (size_t i = 0; i < flags.size(); ++i) {
    if (flags[i] > 1) {
      return invalid_argument("compressed cache: flag of slot " + std::to_string(i / n_tokens) +
                              ", token " + std::to_string(i % n_tokens) + " is " +
                              std::to_string(flags[i]) + ", expected 0 or 1");
    }
  }
  return Status();
}

int64_t CompressedKvCache::ring_row(int64_t position) const {
  const int64_t s = layout_.n_sink_tokens;
  return position < s ? position : s + (position - s) % layout_.n_window_tokens;
}

int64_t CompressedKvCache::retain_pages_needed(int64_t slot) const {
  const int64_t r = distant_[slot].n_tokens;
  const int64_t g = layout_.blocks.slot_block(slot).n_layers;
  return (r % page_tokens_ == 0 ? 1 + g : 0) + (r % positions_per_page_ == 0 ? 1 : 0) +
         (retained_gate_rows_per_page_ > 0 && r % retained_gate_rows_per_page_ == 0 ? 1 : 0);
}

void CompressedKvCache::grow_ring() {
  const int64_t lh = layout_.n_layers() * layout_.n_kv_heads();
  for (int64_t i = 0; i < lh; ++i) ring_k_pages_.push_back(take_page());
  for (int64_t i = 0; i < lh; ++i) ring_v_pages_.push_back(take_page());
  ++n_ring_pages_;
}

void CompressedKvCache::grow_gate_ring() {
  const int64_t n_slots = layout_.blocks.n_slots();
  for (int64_t s = 0; s < n_slots; ++s) gate_ring_pages_.push_back(take_page());
  ++n_gate_ring_pages_;
}

fp16_t* CompressedKvCache::gate_ring_row_ptr(int64_t slot, int64_t row) {
  const PageId id = gate_ring_pages_[(row / gate_rows_per_page_) * layout_.blocks.n_slots() + slot];
  return reinterpret_cast<fp16_t*>(pool_->data(id)) + (row % gate_rows_per_page_) * gate_row_elems_;
}

fp16_t* CompressedKvCache::ring_row_ptr(std::vector<PageId>& pages, int64_t layer, int64_t head,
                                        int64_t row) {
  const int64_t lh = layout_.n_layers() * layout_.n_kv_heads();
  const PageId id = pages[(row / page_tokens_) * lh + layer * layout_.n_kv_heads() + head];
  return reinterpret_cast<fp16_t*>(pool_->data(id)) + (row % page_tokens_) * layout_.head_dim;
}

template <typename KRowFn, typename VRowFn, typename GateRowFn>
void CompressedKvCache::retain(int64_t slot, KRowFn k_base, VRowFn v_of_layer, GateRowFn gate_row,
                               int64_t position, bool rows_in_pages) {
  DistantList& d = distant_[slot];
  const int64_t r = d.n_tokens;
  if (r % page_tokens_ == 0) {
    d.k_pages.push_back(take_page());
    for (auto& v : d.v_pages) v.push_back(take_page());
  }
  if (r % positions_per_page_ == 0) d.pos_pages.push_back(take_page());
  const int64_t row_bytes = kKvElementBytes * layout_.head_dim;
  const int64_t offset = (r % page_tokens_) * row_bytes;
  // One branch per row: the rows come from pages (page -> page) or from
  // the host (a write); either way through the ops of a device source.
  auto row_in = [&](std::byte* dst, const void* src, int64_t bytes) {
    if (rows_in_pages) {
      move_in_pages(dst, src, bytes);
    } else {
      put(dst, src, bytes);
    }
  };
  row_in(pool_->data(d.k_pages[r / page_tokens_]) + offset, k_base(), row_bytes);
  for (size_t i = 0; i < d.v_pages.size(); ++i) {
    row_in(pool_->data(d.v_pages[i][r / page_tokens_]) + offset,
           v_of_layer(static_cast<int64_t>(i)), row_bytes);
  }
  const int32_t pos = static_cast<int32_t>(position);
  put(pool_->data(d.pos_pages[r / positions_per_page_]) +
          (r % positions_per_page_) * kPositionBytes,
      &pos, sizeof(pos));
  // Without retained gate rows (gate context `window`) the token's gate
  // row is dropped with its ring row.
  if (retained_gate_rows_per_page_ > 0) {
    const int64_t per_page = retained_gate_rows_per_page_;
    if (r % per_page == 0) d.gate_pages.push_back(take_page());
    row_in(pool_->data(d.gate_pages[r / per_page]) +
               (r % per_page) * layout_.gate_state_bytes_per_token,
           gate_row(), layout_.gate_state_bytes_per_token);
  }
  ++d.n_tokens;
}

Status CompressedKvCache::append(int64_t position, const TokenKv& kv,
                                 std::span<const uint8_t> flags) {
  if (kv.k == nullptr || kv.v == nullptr) {
    return invalid_argument("compressed cache: append without K or V rows");
  }
  if (layout_.has_gate_state() != (kv.gate != nullptr)) {
    return invalid_argument(layout_.has_gate_state()
                                ? "compressed cache: append without gate state rows"
                                : "compressed cache: gate state rows given for a layout without "
                                  "gate state");
  }
  KVGATE_RETURN_IF_ERROR(begin_append(position, flags));
  const int64_t row_bytes = kKvElementBytes * layout_.head_dim;
  for (int64_t l = 0; l < layout_.n_layers(); ++l) {
    for (int64_t h = 0; h < layout_.n_kv_heads(); ++h) {
      const int64_t off = l * kv.layer_stride + h * kv.head_stride;
      put(new_k_row(l, h), kv.k + off, row_bytes);
      put(new_v_row(l, h), kv.v + off, row_bytes);
    }
  }
  if (kv.gate != nullptr) {
    for (int64_t s = 0; s < layout_.blocks.n_slots(); ++s) {
      put(new_gate_row(s), kv.gate + s * kv.gate_slot_stride, layout_.gate_state_bytes_per_token);
    }
  }
  return Status();
}

fp16_t* CompressedKvCache::new_k_row(int64_t layer, int64_t head) {
  return ring_row_ptr(ring_k_pages_, layer, head, ring_row(n_tokens_ - 1));
}

fp16_t* CompressedKvCache::new_v_row(int64_t layer, int64_t head) {
  return ring_row_ptr(ring_v_pages_, layer, head, ring_row(n_tokens_ - 1));
}

fp16_t* CompressedKvCache::new_gate_row(int64_t slot) {
  if (gate_rows_per_page_ == 0) return nullptr;
  return gate_ring_row_ptr(slot, ring_row(n_tokens_ - 1));
}

Status CompressedKvCache::set_flags(int64_t position, std::span<const uint8_t> flags) {
  KVGATE_RETURN_IF_ERROR(check_built("set_flags"));
  if (position < 0 || position >= n_tokens_) {
    return invalid_argument("compressed cache: set flags of token " + std::to_string(position) +
                            ", which does not exist (" + std::to_string(n_tokens_) + " tokens)");
  }
  KVGATE_RETURN_IF_ERROR(validate_flags(flags, 1));
  const int64_t n_sink = layout_.n_sink_tokens;
  if (position < n_sink) return Status();  // sinks never leave: flags unused
  if (position < n_tokens_ - layout_.n_window_tokens) {
    return invalid_argument("compressed cache: set flags of token " + std::to_string(position) +
                            ", which already left the window (it holds positions from " +
                            std::to_string(std::max(n_sink, n_tokens_ - layout_.n_window_tokens)) +
                            ")");
  }
  const int64_t n_slots = layout_.blocks.n_slots();
  std::memcpy(pending_flags_.data() + (ring_row(position) - n_sink) * n_slots, flags.data(),
              n_slots);
  return Status();
}

void CompressedKvCache::set_flag_unchecked(int64_t slot, uint8_t flag) {
  const int64_t position = n_tokens_ - 1;
  const int64_t n_sink = layout_.n_sink_tokens;
  if (position < n_sink) return;
  pending_flags_[(ring_row(position) - n_sink) * layout_.blocks.n_slots() + slot] = flag;
}

Status CompressedKvCache::begin_append(int64_t position, std::span<const uint8_t> flags) {
  KVGATE_RETURN_IF_ERROR(check_built("append"));
  if (position != n_tokens_) {
    return invalid_argument("compressed cache: append at position " + std::to_string(position) +
                            ", expected the next position " + std::to_string(n_tokens_));
  }
  if (n_tokens_ >= kMaxTokens) {
    return out_of_range("compressed cache: positions past 2^31 cannot be stored");
  }
  // Empty flags: given later by set_flags() (dropped until then).
  const bool deferred = flags.empty();
  if (!deferred) KVGATE_RETURN_IF_ERROR(validate_flags(flags, 1));

  const BlockMap& map = layout_.blocks;
  const int64_t n_slots = map.n_slots();
  const int64_t n_sink = layout_.n_sink_tokens;
  const int64_t row = ring_row(position);
  // The token `n_window` back leaves the window now; it sat in the row the
  // new token takes, so it is moved out first.
  const int64_t leaving = position - layout_.n_window_tokens;
  const uint8_t* leaving_flags =
      leaving >= n_sink ? pending_flags_.data() + (row - n_sink) * n_slots : nullptr;

  // Count the pages first so a full pool leaves the cache unchanged.
  const bool grow = row >= n_ring_pages_ * page_tokens_;
  const bool grow_gate = gate_rows_per_page_ > 0 && row >= n_gate_ring_pages_ * gate_rows_per_page_;
  int64_t need = grow ? 2 * layout_.n_layers() * layout_.n_kv_heads() : 0;
  if (grow_gate) need += n_slots;
  if (leaving_flags != nullptr) {
    for (int64_t s = 0; s < n_slots; ++s) {
      if (leaving_flags[s]) need += retain_pages_needed(s);
    }
  }
  if (need > pool_->free_pages()) {
    return resource_exhausted("compressed cache: token " + std::to_string(position) + " needs " +
                              std::to_string(need) + " pages, the page source has " +
                              std::to_string(pool_->free_pages()) + " free");
  }

  if (grow) grow_ring();
  if (grow_gate) grow_gate_ring();
  if (leaving_flags != nullptr) {
    for (int64_t s = 0; s < n_slots; ++s) {
      if (!leaving_flags[s]) continue;  // flag 0: K, V and gate row dropped everywhere
      const int64_t h = map.slot_head(s);
      const int64_t first = map.slot_block(s).first_layer;
      retain(
          s, [&] { return ring_row_ptr(ring_k_pages_, first, h, row); },
          [&](int64_t i) { return ring_row_ptr(ring_v_pages_, first + i, h, row); },
          [&] { return gate_ring_row_ptr(s, row); }, leaving, /*rows_in_pages=*/true);
    }
  }
  if (position >= n_sink) {
    uint8_t* pending = pending_flags_.data() + (row - n_sink) * n_slots;
    if (deferred) {
      std::memset(pending, 0, n_slots);
    } else {
      std::memcpy(pending, flags.data(), n_slots);
    }
  }
  ++n_tokens_;
  return Status();
}

Status CompressedKvCache::check_built(const char* call) const {
  if (pool_ == nullptr) return failed_precondition("compressed cache: used after move");
  if (building_) {
    return failed_precondition(std::string("compressed cache: ") + call +
                               " during a staged build (finish_build() first)");
  }
  return Status();
}

Status CompressedKvCache::check_dense_inputs(int64_t n_tokens, const DenseKv& kv,
                                             const DenseGate& gate) const {
  if (n_tokens > 0 && (kv.k == nullptr || kv.v == nullptr)) {
    return invalid_argument("compressed cache: build without K or V rows");
  }
  if (!layout_.has_gate_state() && gate.rows != nullptr) {
    return invalid_argument(
        "compressed cache: gate state rows given for a layout without gate state");
  }
  if (layout_.has_gate_state() && n_tokens > 0 && gate.rows == nullptr) {
    return invalid_argument("compressed cache: build without gate state rows (the layout has " +
                            std::to_string(layout_.gate_state_bytes_per_token) +
                            " bytes per token and slot)");
  }
  return Status();
}

int64_t CompressedKvCache::ring_pages_needed(int64_t n_tokens) const {
  const PageGeometry geo = geometry();
  const int64_t p = layout_.proximal_tokens(n_tokens);
  return geo.ring_pages(p) * 2 * layout_.n_layers() * layout_.n_kv_heads() +
         geo.gate_ring_pages(p) * layout_.blocks.n_slots();
}

int64_t CompressedKvCache::slot_retained_pages(int64_t slot,
                                               std::span<const uint8_t> slot_flags) const {
  const auto n_tokens = static_cast<int64_t>(slot_flags.size());
  const int64_t n_sink = layout_.n_sink_tokens;
  const int64_t window_begin = std::max(n_sink, n_tokens - layout_.n_window_tokens);
  int64_t r = 0;
  for (int64_t j = n_sink; j < window_begin; ++j) r += slot_flags[j];
  return geometry().retained_pages(r, layout_.blocks.slot_block(slot).n_layers);
}

Status CompressedKvCache::start_build(int64_t n_tokens) {
  if (n_tokens < 0 || n_tokens > kMaxTokens) {
    return invalid_argument("compressed cache: n_tokens " + std::to_string(n_tokens) +
                            " not in [0, 2^31]");
  }
  const int64_t need = ring_pages_needed(n_tokens);
  if (need > pool_->free_pages()) {
    return resource_exhausted("compressed cache: the K/V and gate rings of " +
                              std::to_string(n_tokens) + " tokens need " + std::to_string(need) +
                              " pages, the page source has " + std::to_string(pool_->free_pages()) +
                              " free");
  }
  const PageGeometry geo = geometry();
  const int64_t p = layout_.proximal_tokens(n_tokens);
  for (int64_t i = 0; i < geo.ring_pages(p); ++i) grow_ring();
  for (int64_t i = 0; i < geo.gate_ring_pages(p); ++i) grow_gate_ring();
  n_tokens_ = n_tokens;
  building_ = true;
  slot_filled_.assign(static_cast<size_t>(layout_.blocks.n_slots()), 0);
  return Status();
}

Result<CompressedKvCache> CompressedKvCache::begin_build(const KvLayout& layout, PageSource* pool,
                                                         int64_t n_tokens) {
  KVGATE_ASSIGN_OR_RETURN(CompressedKvCache cache, create(layout, pool));
  KVGATE_RETURN_IF_ERROR(cache.start_build(n_tokens));
  return cache;
}

Status CompressedKvCache::fill_slot(int64_t slot, const DenseKv& kv,
                                    std::span<const uint8_t> slot_flags, const DenseGate& gate) {
  if (pool_ == nullptr) return failed_precondition("compressed cache: used after move");
  if (!building_) {
    return failed_precondition(
        "compressed cache: fill_slot outside a staged build (begin_build() starts one)");
  }
  const BlockMap& map = layout_.blocks;
  const int64_t n_slots = map.n_slots();
  if (slot < 0 || slot >= n_slots) {
    return invalid_argument("compressed cache: fill of slot " + std::to_string(slot) +
                            ", not in [0, " + std::to_string(n_slots) + ")");
  }
  const int64_t h = map.slot_head(slot);
  const LayerBlock blk = map.slot_block(slot);
  // Built on error only: fill_slot runs once per slot of every prefill.
  auto name = [&] {
    return "slot " + std::to_string(slot) + " (KV head " + std::to_string(h) + ", layers " +
           std::to_string(blk.first_layer) + "-" + std::to_string(blk.end_layer() - 1) + ")";
  };
  if (slot_filled_[slot]) return invalid_argument("compressed cache: " + name() + " filled twice");
  const int64_t n_tokens = n_tokens_;
  if (static_cast<int64_t>(slot_flags.size()) != n_tokens) {
    return invalid_argument("compressed cache: " + name() + ": " +
                            std::to_string(slot_flags.size()) + " flags given, expected " +
                            std::to_string(n_tokens) + " (one per token)");
  }
  for (int64_t j = 0; j < n_tokens; ++j) {
    if (slot_flags[j] > 1) {
      return invalid_argument("compressed cache: " + name() + ": flag of token " +
                              std::to_string(j) + " is " + std::to_string(slot_flags[j]) +
                              ", expected 0 or 1");
    }
  }
  KVGATE_RETURN_IF_ERROR(check_dense_inputs(n_tokens, kv, gate));
  // This slot's retained pages, checked before any is taken.
  const int64_t need = slot_retained_pages(slot, slot_flags);
  if (need > pool_->free_pages()) {
    return resource_exhausted("compressed cache: " + name() + " needs " + std::to_string(need) +
                              " pages for its retained tokens, the page source has " +
                              std::to_string(pool_->free_pages()) + " free");
  }

  const int64_t n_sink = layout_.n_sink_tokens;
  const int64_t window_begin = std::max(n_sink, n_tokens - layout_.n_window_tokens);
  const int64_t row_bytes = kKvElementBytes * layout_.head_dim;
  const int64_t gate_row_bytes = layout_.gate_state_bytes_per_token;
  auto gate_row = [&](int64_t j) {
    return gate.rows + j * gate.token_stride + slot * gate.slot_stride;
  };
  // Own-layer rows of the slot's layers and head only (later layers may
  // not be computed yet), and the slot's gate row.
  auto copy_proximal = [&](int64_t j) {
    const int64_t row = ring_row(j);
    for (int64_t l = blk.first_layer; l < blk.end_layer(); ++l) {
      const int64_t off = j * kv.token_stride + l * kv.layer_stride + h * kv.head_stride;
      put(ring_row_ptr(ring_k_pages_, l, h, row), kv.k + off, row_bytes);
      put(ring_row_ptr(ring_v_pages_, l, h, row), kv.v + off, row_bytes);
    }
    if (gate_rows_per_page_ > 0) {
      put(gate_ring_row_ptr(slot, row), gate_row(j), gate_row_bytes);
    }
  };
  for (int64_t j = 0; j < std::min(n_sink, n_tokens); ++j) copy_proximal(j);
  for (int64_t j = window_begin; j < n_tokens; ++j) {
    copy_proximal(j);
    pending_flags_[(ring_row(j) - n_sink) * n_slots + slot] = slot_flags[j];
  }
  // Distant tokens with flag 1, in position order, as append() retains them.
  for (int64_t j = n_sink; j < window_begin; ++j) {
    if (!slot_flags[j]) continue;
    const int64_t off = j * kv.token_stride + h * kv.head_stride;
    retain(
        slot, [&] { return kv.k + off + blk.first_layer * kv.layer_stride; },
        [&](int64_t i) { return kv.v + off + (blk.first_layer + i) * kv.layer_stride; },
        [&] { return gate_row(j); }, j, /*rows_in_pages=*/false);
  }
  slot_filled_[slot] = 1;
  return Status();
}

Status CompressedKvCache::finish_build() {
  if (pool_ == nullptr) return failed_precondition("compressed cache: used after move");
  if (!building_) {
    return failed_precondition("compressed cache: finish_build without a staged build in progress");
  }
  const BlockMap& map = layout_.blocks;
  const auto first = std::find(slot_filled_.begin(), slot_filled_.end(), uint8_t{0});
  if (first != slot_filled_.end()) {
    const auto slot = static_cast<int64_t>(first - slot_filled_.begin());
    const int64_t left = std::count(first, slot_filled_.end(), uint8_t{0});
    const LayerBlock blk = map.slot_block(slot);
    return failed_precondition(
        "compressed cache: finish_build before slot " + std::to_string(slot) + " (KV head " +
        std::to_string(map.slot_head(slot)) + ", layers " + std::to_string(blk.first_layer) + "-" +
        std::to_string(blk.end_layer() - 1) + ") was filled (" + std::to_string(left) + " of " +
        std::to_string(map.n_slots()) + " slots unfilled)");
  }
  building_ = false;
  slot_filled_.clear();
  return Status();
}

Result<CompressedKvCache> CompressedKvCache::build_from_dense(const KvLayout& layout,
                                                              PageSource* pool, int64_t n_tokens,
                                                              const DenseKv& kv,
                                                              std::span<const uint8_t> flags,
                                                              const DenseGate& gate) {
  KVGATE_ASSIGN_OR_RETURN(CompressedKvCache cache, create(layout, pool));
  if (n_tokens < 0 || n_tokens > kMaxTokens) {
    return invalid_argument("compressed cache: n_tokens " + std::to_string(n_tokens) +
                            " not in [0, 2^31]");
  }
  KVGATE_RETURN_IF_ERROR(cache.check_dense_inputs(n_tokens, kv, gate));
  KVGATE_RETURN_IF_ERROR(cache.validate_flags(flags, n_tokens));
  const int64_t n_slots = layout.blocks.n_slots();
  auto slot_flags = [&](int64_t s) {
    return flags.subspan(static_cast<size_t>(s * n_tokens), static_cast<size_t>(n_tokens));
  };
  // Pages of the final state, checked up front (as append() does per
  // token), so the whole build fails before taking any page.
  int64_t need = cache.ring_pages_needed(n_tokens);
  for (int64_t s = 0; s < n_slots; ++s) need += cache.slot_retained_pages(s, slot_flags(s));
  if (need > pool->free_pages()) {
    return resource_exhausted("compressed cache: " + std::to_string(n_tokens) + " tokens need " +
                              std::to_string(need) + " pages, the page source has " +
                              std::to_string(pool->free_pages()) + " free");
  }
  KVGATE_RETURN_IF_ERROR(cache.start_build(n_tokens));
  for (int64_t s = 0; s < n_slots; ++s) {
    KVGATE_RETURN_IF_ERROR(cache.fill_slot(s, kv, slot_flags(s), gate));
  }
  KVGATE_RETURN_IF_ERROR(cache.finish_build());
  return cache;
}

Result<SegmentView> CompressedKvCache::proximal(int64_t layer, int64_t head) const {
  KVGATE_RETURN_IF_ERROR(check_layer_head(layer, head));
  const int64_t idx = layer * layout_.n_kv_heads() + head;
  const bool any = !ring_k_pages_.empty();
  return SegmentView(
      pool_, any ? ring_k_pages_.data() + idx : nullptr, any ? ring_v_pages_.data() + idx : nullptr,
      layout_.n_layers() * layout_.n_kv_heads(), proximal_tokens(), page_tokens_, layout_.head_dim);
}

Result<SegmentView> CompressedKvCache::distant(int64_t layer, int64_t head) const {
  KVGATE_RETURN_IF_ERROR(check_layer_head(layer, head));
  const BlockMap& map = layout_.blocks;
  const int64_t slot = map.slot_of_layer(layer, head);
  const DistantList& d = distant_[slot];
  const int64_t i = layer - map.slot_block(slot).first_layer;
  return SegmentView(pool_, d.k_pages.data(), d.v_pages[i].data(), 1, d.n_tokens, page_tokens_,
                     layout_.head_dim);
}

Result<GateRowsView> CompressedKvCache::gate_proximal(int64_t slot) const {
  KVGATE_RETURN_IF_ERROR(check_slot(slot));
  if (gate_rows_per_page_ == 0) return GateRowsView();
  const bool any = !gate_ring_pages_.empty();  // no rows before the first token
  return GateRowsView(pool_, any ? gate_ring_pages_.data() + slot : nullptr,
                      layout_.blocks.n_slots(), proximal_tokens(), gate_rows_per_page_,
                      gate_row_elems_);
}

Result<GateRowsView> CompressedKvCache::gate_distant(int64_t slot) const {
  KVGATE_RETURN_IF_ERROR(check_slot(slot));
  if (retained_gate_rows_per_page_ == 0) return GateRowsView();
  const DistantList& d = distant_[slot];
  return GateRowsView(pool_, d.gate_pages.data(), 1, d.n_tokens, retained_gate_rows_per_page_,
                      gate_row_elems_);
}

Status CompressedKvCache::check_slot(int64_t slot) const {
  KVGATE_RETURN_IF_ERROR(check_built("a gate state view"));
  if (slot < 0 || slot >= layout_.blocks.n_slots()) {
    return out_of_range("compressed cache: slot " + std::to_string(slot) + " not in [0, " +
                        std::to_string(layout_.blocks.n_slots()) + ")");
  }
  return Status();
}

Status CompressedKvCache::check_layer_head(int64_t layer, int64_t head) const {
  KVGATE_RETURN_IF_ERROR(check_built("a K/V view"));
  if (layer < 0 || layer >= layout_.n_layers()) {
    return out_of_range("compressed cache: layer " + std::to_string(layer) + " not in [0, " +
                        std::to_string(layout_.n_layers()) + ")");
  }
  if (head < 0 || head >= layout_.n_kv_heads()) {
    return out_of_range("compressed cache: KV head " + std::to_string(head) + " not in [0, " +
                        std::to_string(layout_.n_kv_heads()) + ")");
  }
  return Status();
}

int64_t CompressedKvCache::proximal_row_position(int64_t row) const {
  const int64_t n_sink = layout_.n_sink_tokens;
  const int64_t w = layout_.n_window_tokens;
  if (row < n_sink || n_tokens_ <= n_sink + w) return row;
  // The window holds positions [t - w, t); the one in this row is
  // congruent to row's first occupant, n_sink + (row - n_sink), mod w.
  const int64_t begin = n_tokens_ - w;
  return begin + ((row - begin) % w + w) % w;
}

int32_t CompressedKvCache::retained_position(int64_t slot, int64_t i) const {
  const DistantList& d = distant_[slot];
  int32_t pos;
  const std::byte* src = pool_->data(d.pos_pages[i / positions_per_page_]) +
                         (i % positions_per_page_) * kPositionBytes;
  if (host_pages_) {
    std::memcpy(&pos, src, sizeof(pos));
  } else {
    pool_->read(&pos, src, sizeof(pos));  // may synchronize (a device source)
  }
  return pos;
}

Footprint CompressedKvCache::footprint() const {
  const BlockMap& map = layout_.blocks;
  const int64_t p = proximal_tokens();
  int64_t rows = 0;
  int64_t retained = 0;
  for (int64_t s = 0; s < map.n_slots(); ++s) {
    const int64_t g = map.slot_block(s).n_layers;
    const int64_t r = distant_[s].n_tokens;
    rows += 2 * g * p + (g + 1) * r;
    retained += r;
  }
  Footprint f;
  f.kv_bytes = layout_.elem_bytes * layout_.head_dim * rows;
  f.position_bytes = kPositionBytes * retained;
  f.gate_bytes = layout_.gate_state_bytes_per_token * map.n_slots() * p +
                 layout_.retained_gate_bytes_per_token() * retained;
  return f;
}

}  // namespace kvgate::kvstore
