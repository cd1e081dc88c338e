// Running calibrated Attention-Gates (engine/gate.h) for requests: the
// prompt's flags after a full-attention prefill, and each new token's flag
// during compressed decode (DESIGN.md §4).
//
// Semantics (prefill and decode alike): token t's gate, for slot s, attends
// over the gate K/V of its context (GateModel::context, engine/gate.h):
//   kCache   the tokens the slot holds when t is created — sinks, the window
//            [t + 1 - n_window, t] and the retained distant tokens (flag 1)
//            — exactly the set the cache keeps;
//   kWindow  sinks and the window only (the cache keeps no gate rows for
//            retained tokens); t's logit then depends on no flag, and equals
//            the training logit (gate_training_logits, band mask) up to the
//            fp16 rounding of stored rows.
// Either way a prompt's flags equal those of decoding it token by token
// (n_sink and n_window are the layout's, i.e. the policy's).
//
// Threads: a GatePrefill / GateDecoder is owned by the engine thread that
// drives the CpuForward it observes.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/cpu/isa.h"
#include "engine/gate.h"
#include "engine/model.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/layout.h"

namespace kvgate::engine {

// The cache layout of the gate policies: the gate's block map (`gate+pod`)
// or blocks of one layer (`gate`: eviction without key sharing — then the
// gate of (layer l, head h) is the calibrated gate of the block holding l),
// with the gate's state bytes, kept for retained tokens only for context
// kCache (gate_state_retained). n_sink/n_window from the policy.
Result<kvstore::KvLayout> make_gate_layout(const LlamaConfig& config, const GateModel& gate,
                                           bool share_keys, int64_t n_sink_tokens,
                                           int64_t n_window_tokens);

// How flags are chosen from gate logits.
struct GateDecision {
  // threshold: flag = logit >= slot threshold + threshold_offset.
  double threshold_offset = 0.0;
  // budget: > 0 keeps, per slot, the retained_budget_tokens non-sink prompt
  // tokens with the highest logits, and no token generated later, so a
  // slot never retains more than the budget and the footprint is known
  // before prefill. The logits ranked are those of threshold mode (for
  // context kCache their gate context is the threshold-mode retained set,
  // so in budget mode the prompt flags are not those of a token-by-token
  // decode; kWindow logits depend on no flag). 0: threshold mode.
  int64_t retained_budget_tokens = 0;
};

// Observes a single-sequence full-attention prefill (set it as the
// forward's layer observer), then computes the prompt's flags and gate rows.
class GatePrefill final : public LayerInputObserver {
 public:
  // `gate` and `layout` (from make_gate_layout) must outlive this object.
  GatePrefill(const GateModel& gate, const kvstore::KvLayout& layout, int64_t n_tokens,
              cpu::Isa isa);
  void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                      std::span<const int64_t> row_pos, std::span<const int32_t> row_item) override;
  // After the prefill of n_tokens: flags[slot * n_tokens + j] and the gate
  // rows (fp16 K then V, [token][slot][2·D]) for build_from_dense; logits of
  // every (slot, token) for inspection.
  Status finish(const GateDecision& decision, std::vector<uint8_t>& flags,
                std::vector<fp16_t>& gate_rows);
  // Streaming form of finish() for a layer-major prefill: fills in the
  // flags, logits and gate rows of `layout_slots` only (and of every slot
  // sharing their gates), valid once the base layer of each of their gates
  // has been observed for every token. The first call sizes `flags` and
  // `gate_rows` as finish() does; pass the same vectors to later calls.
  // Each slot's result equals finish()'s (the slots are independent).
  // INVALID_ARGUMENT for a slot outside the layout.
  Status finish_slots(const GateDecision& decision, std::span<const int64_t> layout_slots,
                      std::vector<uint8_t>& flags, std::vector<fp16_t>& gate_rows);
  kvstore::DenseGate dense_gate(const std::vector<fp16_t>& gate_rows) const;
  const std::vector<float>& logits() const { return logits_; }  // [slot][token]

 private:
  void size_outputs(std::vector<uint8_t>& flags, std::vector<fp16_t>& gate_rows);
  void compute_gate_slot(int64_t gate_slot, const GateDecision& decision,
                         std::vector<uint8_t>& flags, std::vector<fp16_t>& gate_rows);

  const GateModel& gate_;
  const kvstore::KvLayout& layout_;
  int64_t n_tokens_;
  cpu::Isa isa_;
  std::vector<int32_t> gate_slot_;  // layout slot -> gate model slot
  std::vector<float> proj_;         // [token][slot][3·D] q, k, v (attention) or [token][slot] logit (linear)
  std::vector<float> logits_;
  std::vector<uint8_t> computed_;   // per gate slot: flags computed (finish_slots)
  struct SlotWork {                 // compute_gate_slot's buffers, reused per slot
    std::vector<float> logits, kv32, scratch;
    std::vector<uint8_t> flags;
    std::vector<fp16_t> kv16;
    std::vector<int32_t> context;
  } work_;
};

// Observes compressed decode steps: at each slot's base layer it computes
// the new token's gate K/V (written to the cache's new gate row) and logit,
// and sets the token's deferred flags. Bind the batch's caches before each
// forward_compressed call (item i of the step uses caches[i]).
class GateDecoder final : public LayerInputObserver {
 public:
  GateDecoder(const GateModel& gate, const kvstore::KvLayout& layout, cpu::Isa isa);
  void bind(std::span<kvstore::CompressedKvCache* const> caches, const GateDecision& decision);
  void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                      std::span<const int64_t> row_pos, std::span<const int32_t> row_item) override;
  // The first error met during the last step (a cache that refused a flag).
  Status status() const { return status_; }

 private:
  const GateModel& gate_;
  const kvstore::KvLayout& layout_;
  cpu::Isa isa_;
  bool with_retained_;  // context kCache: retained tokens' gate rows join the context
  std::vector<int32_t> gate_slot_;
  std::vector<kvstore::CompressedKvCache*> caches_;
  GateDecision decision_;
  std::vector<float> scratch_;
  Status status_;
};

}  // namespace kvgate::engine
