// HostWeights: the host-resident weights a CudaForward uploads — views of a
// LlamaModel's file mapping, of one tensor-parallel rank's shard, or buffers
// a benchmark made up. Plain C++ (built and tested without CUDA).
#pragma once

#include <vector>

#include "engine/model.h"
#include "engine/tp/tp_shard.h"

namespace kvgate::engine::cuda {

// Pointers are borrowed for the duration of CudaForward::create only.
struct HostWeights {
  LlamaConfig config;
  std::vector<LayerWeights> layers;
  cpu::WeightView token_embd;
  cpu::WeightView output;  // may be token_embd (tied): uploaded once
  const float* output_norm = nullptr;

  static HostWeights of(const LlamaModel& model);
};

// One tensor-parallel rank's weights as a CudaForward of that rank takes
// them: the model's config narrowed to the rank's query heads, KV heads and
// MLP columns (n_heads, n_kv_heads, n_ff), its column-parallel slices as
// wq/wk/wv/w_gate/w_up, its row-parallel ones (n_embd rows x its columns)
// as wo/w_down — so the rank's forward is the forward of a narrower model
// whose wo and w_down products are partial sums, to be all-reduced across
// the ranks before each residual add (CudaForwardOptions::all_reduce) —
// and the replicated norms, embedding and output of the model. The shard
// must outlive the CudaForward's creation.
HostWeights shard_host_weights(const tp::TpShard& shard);

}  // namespace kvgate::engine::cuda
