// The device records of one compressed decode step (CudaForward::
// decode_compressed): what the kernels read to attend over, and write into,
// the block-gated PoD caches of a batch (kvstore/compressed_cache.h) whose
// pages live in device memory. Plain C++ — built and tested without a GPU:
// it only does arithmetic on page addresses, never dereferences them.
//
// One step of n sequences (items), all of one KV layout (one policy plan:
// the caller groups a mixed batch by plan, as engine::BatchDecoder does),
// each cache after begin_append() of its new token:
//   - AttnTask [layer][item][KV head]: the proximal segment (own-layer K/V
//     ring pages, sinks + window, the new token's row included) and the
//     distant segment (the block base layer's K pages, this layer's V pages)
//     as arrays of page addresses; q = the item's queries of this layer,
//     q_base = those of the block's base layer for this KV head
//     (StepBuffers::q_layers keeps every layer's queries for the step), out
//     = the item's attention output. Exactly what kvstore::attend() reads.
//   - K/V destination rows [layer][item][KV head]: new_k_row()/new_v_row(),
//     where the step's K/V (fp16) are stored before that layer's attention.
//   - Gate work per layer (attention-kind, window-context gates only): for
//     each layout slot whose gate runs at this layer (the first layer of the
//     gate block holding the slot's layers, as GateDecoder), a GateRowTask
//     per item: the new token's gate row to write and the slot's proximal
//     gate rows (sinks + window in ring order, the new row included) to
//     attend over.
//   - tokens and positions (int32 per item).
// All records go into one host image whose pointers address where the
// image will sit on the device (device_base): one upload per step.
//
// Threading: one owner thread. Not synchronized.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/cuda/kernel_params.h"
#include "engine/gate.h"
#include "kvstore/compressed_cache.h"

namespace kvgate::engine::cuda {

struct StepModelShape {
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t q_dim() const { return n_heads * head_dim; }
};

// Which layout slots the gate computes at each layer, and with which gate
// model slot (GateDecoder's mapping: a layout slot's gate is the gate slot
// of the gate block holding the slot's first layer, run at that gate
// block's first layer).
struct GateSchedule {
  // by_layer[l]: the layout slots gated at layer l, ascending.
  std::vector<std::vector<int32_t>> by_layer;
  // gate_slot[s]: the gate model slot of layout slot s.
  std::vector<int32_t> gate_slot;
  int64_t n_slots() const { return static_cast<int64_t>(gate_slot.size()); }
};

// The schedule for caches of `layout` under `gate`. UNIMPLEMENTED for what
// the GPU decode does not cover (a linear gate, the cache context — its
// context includes retained rows, whose gate rows it would have to keep);
// INVALID_ARGUMENT when the gate's block map does not match the layout's
// layers and heads, or the layout has no gate state.
Result<GateSchedule> make_gate_schedule(const GateModel& gate, const kvstore::KvLayout& layout);

// Device addresses of the forward's step buffers the records point at.
struct StepBuffers {
  const float* q_layers = nullptr;  // [n_layers][batch_capacity][q_dim]
  float* attn_out = nullptr;        // [batch_capacity][q_dim]
  int64_t batch_capacity = 0;
};

// Byte offsets of the record arrays in the image (and so on the device).
struct StepTableOffsets {
  size_t tasks = 0;      // AttnTask [n_layers][n][n_kv_heads]
  size_t k_rows = 0;     // uint16_t* [n_layers][n][n_kv_heads]
  size_t v_rows = 0;     // likewise
  size_t tokens = 0;     // int32 [n]
  size_t positions = 0;  // int32 [n]
  // GateRowTask [n][by_layer[l].size()] at gate_tasks[l] (absent without a
  // schedule; meaningless for layers with no gated slot).
  std::vector<size_t> gate_tasks;
  size_t pages = 0;  // page address arrays the records point into
  size_t total = 0;
};

class StepTables {
 public:
  // Sizes the image for these caches (each after begin_append) without
  // writing it, so the caller can make room on the device first. Errors
  // (INVALID_ARGUMENT, naming the item): no item, a null cache, a cache
  // whose layout does not match `shape` or the first item's layout, a
  // cache still building, more items than buffers.batch_capacity.
  Result<StepTableOffsets> measure(const StepModelShape& shape,
                                   std::span<kvstore::CompressedKvCache* const> caches,
                                   const GateSchedule* gate, const StepBuffers& buffers) const;

  // Writes the image for the image's future device address `device_base`
  // (64-byte aligned). tokens: one per item. Errors as measure().
  Status build(const StepModelShape& shape, std::span<kvstore::CompressedKvCache* const> caches,
               std::span<const int32_t> tokens, const GateSchedule* gate,
               const StepBuffers& buffers, std::uintptr_t device_base);

  std::span<const std::byte> image() const { return image_; }
  const StepTableOffsets& offsets() const { return offsets_; }
  // The image's records of layer l (host copies, e.g. for check_attn_tasks).
  const AttnTask* host_tasks(int64_t layer) const;
  const GateRowTask* host_gate_tasks(int64_t layer) const;
  int64_t n_items() const { return n_items_; }

 private:
  std::vector<std::byte> image_;
  StepTableOffsets offsets_;
  int64_t n_items_ = 0;
  int64_t n_kv_heads_ = 0;
};

}  // namespace kvgate::engine::cuda
