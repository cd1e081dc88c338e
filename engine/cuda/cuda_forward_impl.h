// Internal to engine/cuda: CudaForward's state, shared by cuda_forward.cpp
// (weights, dense prefill and decode, graphs) and
// cuda_forward_compressed.cpp (the compressed decode step). Not a public
// header: it includes CUDA's runtime API.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/cuda/compressed_step.h"
#include "engine/cuda/cuda_forward.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/launch_plan.h"

namespace kvgate::engine::cuda {
namespace detail {

// One weight matrix on the device: the GGUF rows as the GEMV reads them,
// and (quantized types only) fp16 rows for the prefill GEMM; an F16 matrix
// serves both from the same bytes.
struct Matrix {
  DeviceBuffer raw;
  DeviceBuffer f16;
  GemvPlan gemv;
  GemmPlan gemm;
  const void* f16_rows() const { return f16.data() != nullptr ? f16.data() : raw.data(); }
};

struct Layer {
  DeviceBuffer attn_norm, ffn_norm;
  Matrix wq, wk, wv, wo, w_gate, w_up, w_down;
};

}  // namespace detail

// The compressed decode step's device buffers, made on its first use (a
// forward that never decodes compressed caches does not pay for them).
struct CompressedScratch {
  int64_t capacity = 0;  // items per step (CudaForwardOptions::max_decode_batch)
  DeviceBuffer q_layers;  // [layer][capacity][q_dim]
  DeviceBuffer logits;    // [capacity][n_vocab]
  DeviceBuffer flags;     // [capacity][n_slots] of the largest layout seen
  DeviceBuffer gate_proj, gate_logits;
  DeviceBuffer table;     // the step's records (StepTables image)
  DeviceBuffer attn_ws;   // decode attention workspace
  StepTables tables;
  std::vector<uint8_t> host_flags;
};

struct CudaForward::Impl {
  LlamaConfig c;
  CudaForwardOptions opt;
  CudaStream stream;
  CublasHandle cublas;

  std::vector<detail::Layer> layers;
  DeviceBuffer embd;  // token_embd rows (GGUF)
  EmbedType embd_type = EmbedType::kF32;
  int64_t embd_row_bytes = 0;
  detail::Matrix output_own;  // when not tied
  const void* output_rows = nullptr;
  GemvPlan output_gemv;
  DeviceBuffer output_norm;

  DeviceBuffer kv;  // [layer][K|V][kv_head][max_context][head_dim] fp16, as engine::KvCache

  // Scratch for max_prefill_tokens rows (a decode step uses row 0).
  DeviceBuffer x, xn, q, k, v, attn, gate, up, logits;
  DeviceBuffer tokens, positions;  // int32 per chunk row
  DeviceBuffer step;               // DecodeStep
  DeviceBuffer next_token;         // int32: argmax of the last logits
  DeviceBuffer gemv_ws, gemm_ws, attn_ws;
  DeviceBuffer tasks;  // AttnTask [layer][kv_head]
  DeviceBuffer pages;  // per task: K row base, V row base
  AttentionPlan decode_plan;
  PrefillAttentionPlan prefill_plan;
  std::vector<int32_t> host_rows;  // staging for tokens / positions
  DecodeStep host_step;

  cudaGraphExec_t graph = nullptr;
  int64_t n_tokens = 0;
  bool have_logits = false;
  Status failed;  // the error that broke a step; cleared by reset()
  size_t gemv_bytes = 0, gemm_bytes = 0;

  ~Impl() {
    if (graph != nullptr) (void)cudaGraphExecDestroy(graph);
  }

  cudaStream_t s() const { return stream.get(); }
  float* f(const DeviceBuffer& b) const { return b.as<float>(); }
  uint16_t* k_cache(int64_t layer) const {
    return kv.as<uint16_t>() + layer * 2 * c.n_kv_heads * opt.max_context_tokens * c.head_dim;
  }
  // Fields of the device's DecodeStep, by offset (never dereferenced here).
  int32_t* step_token() const {
    return reinterpret_cast<int32_t*>(step.as<char>() + offsetof(DecodeStep, token));
  }
  int32_t* step_pos() const {
    return reinterpret_cast<int32_t*>(step.as<char>() + offsetof(DecodeStep, pos));
  }
  uint16_t* v_cache(int64_t layer) const {
    return k_cache(layer) + c.n_kv_heads * opt.max_context_tokens * c.head_dim;
  }

  Status build(const HostWeights& w);
  Status upload_matrix(const cpu::WeightView& view, int64_t rows, int64_t cols, bool need_gemm,
                       const std::string& name, detail::Matrix& m);
  Status matmul(const detail::Matrix& m, const float* x_in, int64_t n, float* y);
  Status run_layer(int64_t l, int64_t n, bool decode, int64_t past);
  Status output_and_mlp(const detail::Layer& w, int64_t n);
  // Tensor parallelism: the ranks' sum of n rows of partial products.
  Status reduce(float* rows_dev, int64_t n) {
    if (!opt.all_reduce) return Status();
    return opt.all_reduce(rows_dev, static_cast<size_t>(n * c.n_embd), s());
  }
  Status final_logits(int64_t row, int32_t next_pos);
  Status enqueue_decode_step();
  Status check_usable() const;
  Status begin_decode(int32_t token);
  Status finish(Status st, float* logits_out);

  PrefillObserver prefill_observer;

  // The compressed decode step (cuda_forward_compressed.cpp).
  int sm_count = 0;
  CompressedScratch cz;
  // Makes the step's buffers exist for n_slots layout slots.
  Status ensure_compressed(int64_t n_slots, const CudaGateWeights* gate);
  Status run_compressed_layer(int64_t l, int64_t n, const AttentionPlan& plan,
                              const CudaGateWeights* gw, const GateDecision& decision,
                              int64_t n_slots);
};

}  // namespace kvgate::engine::cuda
