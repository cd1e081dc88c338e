#include "engine/cuda/compressed_step.h"

#include <cstring>
#include <string>

namespace kvgate::engine::cuda {
namespace {

std::string str(int64_t v) {
  return std::to_string(v);
}

size_t align64(size_t n) {
  return (n + 63) & ~size_t{63};
}

bool same_layout(const kvstore::KvLayout& a, const kvstore::KvLayout& b) {
  if (a.n_layers() != b.n_layers() || a.n_kv_heads() != b.n_kv_heads() ||
      a.head_dim != b.head_dim || a.n_sink_tokens != b.n_sink_tokens ||
      a.n_window_tokens != b.n_window_tokens ||
      a.gate_state_bytes_per_token != b.gate_state_bytes_per_token ||
      a.gate_state_retained != b.gate_state_retained || a.blocks.n_slots() != b.blocks.n_slots()) {
    return false;
  }
  for (int64_t s = 0; s < a.blocks.n_slots(); ++s) {
    const auto& x = a.blocks.slot_block(s);
    const auto& y = b.blocks.slot_block(s);
    if (x.first_layer != y.first_layer || x.n_layers != y.n_layers ||
        a.blocks.slot_head(s) != b.blocks.slot_head(s)) {
      return false;
    }
  }
  return true;
}

// Pages a segment's page list takes (0 for an empty segment).
int64_t pages_of(int64_t rows, int64_t per_page) {
  return rows == 0 ? 0 : (rows + per_page - 1) / per_page;
}

}  // namespace

Result<GateSchedule> make_gate_schedule(const GateModel& gate, const kvstore::KvLayout& layout) {
  if (gate.kind != GateKind::kAttention) {
    return unimplemented("cuda decode: only attention-kind gates run on the GPU (this gate is linear)");
  }
  if (gate.context != GateContext::kWindow) {
    return unimplemented(
        "cuda decode: gate context 'cache' does not run on the GPU (its context includes the "
        "retained tokens' gate rows); calibrate with --gate-context window");
  }
  if (!layout.has_gate_state() || layout.gate_row_elems() != 2 * gate.gate_dim()) {
    return invalid_argument("cuda decode: the layout's gate rows (" + str(layout.gate_row_elems()) +
                            " values) are not the gate's K and V (" + str(2 * gate.gate_dim()) + ")");
  }
  if (gate.blocks.n_layers() != layout.n_layers() || gate.blocks.n_kv_heads() != layout.n_kv_heads()) {
    return invalid_argument("cuda decode: the gate's block map (" + str(gate.blocks.n_layers()) +
                            " layers, " + str(gate.blocks.n_kv_heads()) +
                            " KV heads) does not match the layout's");
  }
  GateSchedule out;
  const kvstore::BlockMap& map = layout.blocks;
  out.by_layer.resize(static_cast<size_t>(layout.n_layers()));
  out.gate_slot.resize(static_cast<size_t>(map.n_slots()));
  for (int64_t s = 0; s < map.n_slots(); ++s) {
    const int64_t g = gate.blocks.slot_of_layer(map.slot_block(s).first_layer, map.slot_head(s));
    if (g < 0 || g >= static_cast<int64_t>(gate.slots.size())) {
      return invalid_argument("cuda decode: layout slot " + str(s) + " has no gate slot");
    }
    out.gate_slot[s] = static_cast<int32_t>(g);
    const int64_t at = gate.blocks.slot_block(g).first_layer;
    out.by_layer[static_cast<size_t>(at)].push_back(static_cast<int32_t>(s));
  }
  return out;
}

Result<StepTableOffsets> StepTables::measure(const StepModelShape& shape,
                                             std::span<kvstore::CompressedKvCache* const> caches,
                                             const GateSchedule* gate,
                                             const StepBuffers& buffers) const {
  const auto n = static_cast<int64_t>(caches.size());
  if (n == 0) return invalid_argument("cuda decode: a step needs at least one item");
  if (n > buffers.batch_capacity) {
    return invalid_argument("cuda decode: " + str(n) + " items exceed the batch capacity " +
                            str(buffers.batch_capacity));
  }
  if (shape.n_layers < 1 || shape.n_kv_heads < 1 || shape.n_heads % shape.n_kv_heads != 0) {
    return invalid_argument("cuda decode: inconsistent model shape");
  }
  int64_t page_ptrs = 0;
  for (int64_t i = 0; i < n; ++i) {
    const kvstore::CompressedKvCache* c = caches[i];
    if (c == nullptr) return invalid_argument("cuda decode: item " + str(i) + " has no cache");
    const kvstore::KvLayout& lay = c->layout();
    if (lay.n_layers() != shape.n_layers || lay.n_kv_heads() != shape.n_kv_heads ||
        lay.head_dim != shape.head_dim) {
      return invalid_argument("cuda decode: item " + str(i) + ": cache layout does not match the model");
    }
    if (i > 0 && !same_layout(lay, caches[0]->layout())) {
      return invalid_argument("cuda decode: item " + str(i) +
                              "'s layout differs from item 0's (group items by policy plan)");
    }
    if (c->building() || c->n_tokens() < 1) {
      return invalid_argument("cuda decode: item " + str(i) +
                              " has no appended token (begin_append first)");
    }
    const int64_t pt = c->page_tokens();
    const int64_t near = pages_of(c->proximal_tokens(), pt);
    for (int64_t s = 0; s < lay.blocks.n_slots(); ++s) {
      // Every layer of the slot's block: proximal K and V, distant K and V.
      const int64_t far = pages_of(c->retained_tokens(s), pt);
      page_ptrs += lay.blocks.slot_block(s).n_layers * 2 * (near + far);
    }
    if (gate != nullptr) {
      if (gate->n_slots() != lay.blocks.n_slots()) {
        return invalid_argument("cuda decode: the gate schedule's slots do not match item " + str(i));
      }
      page_ptrs += gate->n_slots() * pages_of(c->proximal_tokens(), c->gate_rows_per_page());
    }
  }
  StepTableOffsets o;
  const auto L = static_cast<size_t>(shape.n_layers);
  const auto rows = L * static_cast<size_t>(n * shape.n_kv_heads);
  size_t at = 0;
  o.tasks = at;
  at = align64(at + rows * sizeof(AttnTask));
  o.k_rows = at;
  at = align64(at + rows * sizeof(void*));
  o.v_rows = at;
  at = align64(at + rows * sizeof(void*));
  o.tokens = at;
  at = align64(at + static_cast<size_t>(n) * 4);
  o.positions = at;
  at = align64(at + static_cast<size_t>(n) * 4);
  if (gate != nullptr) {
    o.gate_tasks.assign(L, 0);
    for (size_t l = 0; l < L; ++l) {
      o.gate_tasks[l] = at;
      at = align64(at + static_cast<size_t>(n) * gate->by_layer[l].size() * sizeof(GateRowTask));
    }
  }
  o.pages = at;
  o.total = align64(at + static_cast<size_t>(page_ptrs) * sizeof(void*));
  return o;
}

Status StepTables::build(const StepModelShape& shape,
                         std::span<kvstore::CompressedKvCache* const> caches,
                         std::span<const int32_t> tokens, const GateSchedule* gate,
                         const StepBuffers& buffers, std::uintptr_t device_base) {
  KVGATE_ASSIGN_OR_RETURN(offsets_, measure(shape, caches, gate, buffers));
  const auto n = static_cast<int64_t>(caches.size());
  if (static_cast<int64_t>(tokens.size()) != n) {
    return invalid_argument("cuda decode: " + str(static_cast<int64_t>(tokens.size())) +
                            " tokens for " + str(n) + " items");
  }
  if (device_base % 64 != 0) return invalid_argument("cuda decode: device table not 64-byte aligned");
  if (buffers.q_layers == nullptr || buffers.attn_out == nullptr) {
    return invalid_argument("cuda decode: step buffers are not set");
  }
  n_items_ = n;
  n_kv_heads_ = shape.n_kv_heads;
  image_.assign(offsets_.total, std::byte{0});
  std::byte* img = image_.data();
  // Host slot of a record, and the device address it will have.
  const auto dev = [&](size_t off) { return device_base + off; };
  size_t page_at = offsets_.pages;
  // Appends a page list; returns its device address.
  const auto put_pages = [&](auto&& page_addr, int64_t count) -> uintptr_t {
    const uintptr_t addr = dev(page_at);
    for (int64_t i = 0; i < count; ++i) {
      const void* p = page_addr(i);
      std::memcpy(img + page_at, &p, sizeof(p));
      page_at += sizeof(p);
    }
    return addr;
  };
  const int64_t H = shape.n_kv_heads;
  const int64_t group = shape.n_heads / H;
  const int64_t qd = shape.q_dim();
  auto* tasks = reinterpret_cast<AttnTask*>(img + offsets_.tasks);
  auto* k_rows = reinterpret_cast<uint16_t**>(img + offsets_.k_rows);
  auto* v_rows = reinterpret_cast<uint16_t**>(img + offsets_.v_rows);
  auto* tok = reinterpret_cast<int32_t*>(img + offsets_.tokens);
  auto* pos = reinterpret_cast<int32_t*>(img + offsets_.positions);
  for (int64_t i = 0; i < n; ++i) {
    kvstore::CompressedKvCache& c = *caches[i];
    tok[i] = tokens[i];
    pos[i] = static_cast<int32_t>(c.n_tokens() - 1);
    for (int64_t l = 0; l < shape.n_layers; ++l) {
      for (int64_t h = 0; h < H; ++h) {
        const size_t r = static_cast<size_t>((l * n + i) * H + h);
        k_rows[r] = reinterpret_cast<uint16_t*>(c.new_k_row(l, h));
        v_rows[r] = reinterpret_cast<uint16_t*>(c.new_v_row(l, h));
        KVGATE_ASSIGN_OR_RETURN(const kvstore::SegmentView near, c.proximal(l, h));
        KVGATE_ASSIGN_OR_RETURN(const kvstore::SegmentView far, c.distant(l, h));
        AttnTask& t = tasks[r];
        t.near_tokens = static_cast<int32_t>(near.n_tokens());
        t.far_tokens = static_cast<int32_t>(far.n_tokens());
        const auto addr = [](const fp16_t* p) { return static_cast<const void*>(p); };
        t.near_k = reinterpret_cast<const uint16_t* const*>(
            put_pages([&](int64_t p) { return addr(near.page(p).k); }, near.n_pages()));
        t.near_v = reinterpret_cast<const uint16_t* const*>(
            put_pages([&](int64_t p) { return addr(near.page(p).v); }, near.n_pages()));
        if (far.n_tokens() > 0) {
          t.far_k = reinterpret_cast<const uint16_t* const*>(
              put_pages([&](int64_t p) { return addr(far.page(p).k); }, far.n_pages()));
          t.far_v = reinterpret_cast<const uint16_t* const*>(
              put_pages([&](int64_t p) { return addr(far.page(p).v); }, far.n_pages()));
        }
        const int64_t base = c.layout().blocks.base_layer(l, h);
        const int64_t head0 = h * group * shape.head_dim;
        t.q = buffers.q_layers + (l * buffers.batch_capacity + i) * qd + head0;
        t.q_base = buffers.q_layers + (base * buffers.batch_capacity + i) * qd + head0;
        t.out = buffers.attn_out + i * qd + head0;
      }
    }
  }
  if (gate != nullptr) {
    for (int64_t l = 0; l < shape.n_layers; ++l) {
      const auto& slots = gate->by_layer[static_cast<size_t>(l)];
      auto* g = reinterpret_cast<GateRowTask*>(img + offsets_.gate_tasks[static_cast<size_t>(l)]);
      const auto per = static_cast<int64_t>(slots.size());
      for (int64_t i = 0; i < n && per > 0; ++i) {
        kvstore::CompressedKvCache& c = *caches[i];
        for (int64_t j = 0; j < per; ++j) {
          const int64_t s = slots[static_cast<size_t>(j)];
          KVGATE_ASSIGN_OR_RETURN(const kvstore::GateRowsView rows, c.gate_proximal(s));
          GateRowTask& t = g[i * per + j];
          t.own_row = reinterpret_cast<uint16_t*>(c.new_gate_row(s));
          t.n_rows = static_cast<int32_t>(rows.n_rows());
          t.rows_per_page = static_cast<int32_t>(c.gate_rows_per_page());
          t.pages = reinterpret_cast<const uint16_t* const*>(put_pages(
              [&](int64_t p) { return static_cast<const void*>(rows.page(p).rows); },
              rows.n_pages()));
        }
      }
    }
  }
  if (page_at > offsets_.total) {
    return internal_error("cuda decode: step tables overran their measured size");
  }
  return Status();
}

const AttnTask* StepTables::host_tasks(int64_t layer) const {
  return reinterpret_cast<const AttnTask*>(image_.data() + offsets_.tasks) +
         layer * n_items_ * n_kv_heads_;
}

const GateRowTask* StepTables::host_gate_tasks(int64_t layer) const {
  if (offsets_.gate_tasks.empty()) return nullptr;
  return reinterpret_cast<const GateRowTask*>(image_.data() +
                                              offsets_.gate_tasks[static_cast<size_t>(layer)]);
}

}  // namespace kvgate::engine::cuda
