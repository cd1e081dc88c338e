// One tensor-parallel rank's weights, cut from a loaded LlamaModel by a
// TpPlan (tp_plan.h).
//
// Column-parallel matrices (wq, wk, wv, w_gate, w_up) keep the rank's output
// rows; row-parallel ones (wo, w_down) keep, of every row, the rank's input
// columns as whole quant blocks. Both are contiguous per-rank copies whose
// bytes are exactly the model's blocks (no requantization): a shard row is
// a GGUF row range, so cpu::matmul reads it like any model weight. Norms,
// token embedding and output projection are replicated: the shard points at
// the model's (immutable, shareable between ranks of one process; a GPU rank
// would upload them like the rest).
//
// Ownership: the shard owns its copies (64-byte aligned); the LlamaModel
// must outlive it. Immutable after build(), so it may be read from any
// thread.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "engine/cpu/matmul.h"
#include "engine/model.h"
#include "engine/tp/tp_plan.h"

namespace kvgate::engine::tp {

struct TpLayerShard {
  const float* attn_norm = nullptr;  // replicated, the model's
  const float* ffn_norm = nullptr;   // replicated, the model's
  cpu::WeightView wq, wk, wv;        // rows of the rank's heads
  cpu::WeightView wo;                // n_embd rows x the rank's attention-output columns
  cpu::WeightView w_gate, w_up;      // rows of the rank's MLP columns
  cpu::WeightView w_down;            // n_embd rows x the rank's MLP columns
};

class TpShard {
 public:
  // Copies rank `rank`'s slices of every layer. INVALID_ARGUMENT if the plan
  // was made for other shapes, the rank is outside it, or a row-parallel
  // split is not on the weight type's block boundary; UNIMPLEMENTED for a
  // weight type whose rows cannot be sliced (one cpu::matmul does not take).
  static Result<std::unique_ptr<TpShard>> build(const LlamaModel& model, const TpPlan& plan, int rank);

  const LlamaModel& model() const { return model_; }
  const LlamaConfig& config() const { return model_.config(); }
  const TpPlan& plan() const { return plan_; }
  int rank() const { return rank_; }
  const TpRankPlan& rank_plan() const { return plan_.ranks[static_cast<size_t>(rank_)]; }
  const std::vector<TpLayerShard>& layers() const { return layers_; }
  const cpu::WeightView& token_embd() const { return model_.token_embd(); }
  const cpu::WeightView& output() const { return model_.output(); }
  const float* output_norm() const { return model_.output_norm(); }
  // Bytes of the rank's own weight copies (the sharded matrices).
  int64_t owned_bytes() const { return owned_bytes_; }

  ~TpShard();
  TpShard(const TpShard&) = delete;
  TpShard& operator=(const TpShard&) = delete;

 private:
  TpShard(const LlamaModel& model, TpPlan plan, int rank) : model_(model), plan_(std::move(plan)), rank_(rank) {}
  Result<cpu::WeightView> slice(const cpu::WeightView& w, TpWeight which, int layer);
  void* allocate(size_t bytes);

  const LlamaModel& model_;
  const TpPlan plan_;
  const int rank_;
  std::vector<TpLayerShard> layers_;
  std::vector<void*> storage_;  // 64-byte aligned, freed by the destructor
  int64_t owned_bytes_ = 0;
};

}  // namespace kvgate::engine::tp
