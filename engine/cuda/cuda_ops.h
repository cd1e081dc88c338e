// Host API of the CUDA backend: one call per kernel, validated, enqueued on
// a stream. Plain C++ (no CUDA header), usable from any .cpp file of a build
// with KVGATE_CUDA.
//
// Every pointer named *_dev is a device address (cudaMalloc, DeviceBuffer);
// the caller keeps it alive until the stream has run the work. Each call
// checks its sizes against the plan (launch_plan.h) and its pointers for
// null, enqueues asynchronously and returns without waiting: an OK Status
// means "launched"; errors the kernel meets later surface at the next
// synchronization (CudaStream::synchronize). No call allocates, so a
// sequence of them can be captured into a CUDA graph.
//
// Errors: INVALID_ARGUMENT for sizes the plan does not cover or null
// pointers (named in the message), and the launch's CUDA error (mapped by
// cuda_status in device_buffer.h) otherwise.
//
// Numerics (all checked by tests/gpu against the CPU backend): GEMV is the
// CPU matmul's arithmetic (Q8 activations, exact integer block dots; F16
// activations rounded to fp16, fp32 sums) up to summation order; RMSNorm,
// RoPE and SwiGLU repeat the CPU scalar kernels' operations (device
// expf/sincosf differ by a few ulp); attention rounds the queries to fp16
// and accumulates in fp32 like kvstore/attention.h; sampling is described
// in sampling_plan.h.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/gate_plan.h"
#include "engine/cuda/kernel_params.h"
#include "engine/cuda/launch_plan.h"
#include "engine/cuda/sampling_plan.h"

namespace kvgate::engine::cuda {

// y_dev[t * rows + r] = W[r] . x_dev[t] for t < n_tokens (<= plan.n_tokens).
// w_dev: plan.rows * plan.row_bytes bytes of GGUF weight rows. workspace_dev:
// plan.workspace_bytes (may be null for F16).
Status gemv(const GemvPlan& plan, const void* w_dev, const float* x_dev, int64_t n_tokens,
            float* y_dev, void* workspace_dev, cudaStream_t stream);

// Each of n_rows rows of n floats: out = x / sqrt(mean(x^2) + eps) * weight.
// out may alias x.
Status rms_norm(const float* x_dev, const float* weight_dev, float* out_dev, int64_t n_rows,
                int64_t n, float eps, cudaStream_t stream);

// In place on x_dev [n_rows][n_heads][head_dim]: llama's "normal" RoPE
// (pairs (2i, 2i+1), theta_i = pos * freq_base^(-2i/head_dim)) with row r at
// position positions_dev[r]. head_dim even.
Status rope_norm(float* x_dev, int64_t n_rows, int64_t n_heads, int64_t head_dim,
                 const int32_t* positions_dev, float freq_base, cudaStream_t stream);

// out = silu(gate) * up over n floats. out may alias either input.
Status swiglu(const float* gate_dev, const float* up_dev, float* out_dev, int64_t n,
              cudaStream_t stream);

// Decode attention of n_tasks (<= plan.shape.n_tasks) tasks (device array;
// check the host copy with check_attn_tasks first). workspace_dev:
// plan.workspace_bytes. Writes each task's out.
Status decode_attention(const AttentionPlan& plan, const AttnTask* tasks_dev, int64_t n_tasks,
                        float* workspace_dev, cudaStream_t stream);

// Causal prefill attention of n_queries (<= plan.shape.max_queries) rows of
// q_dev [n_queries][n_heads][head_dim] at positions [past, past + n_queries)
// over keys [0, past + n_queries) of k_dev / v_dev ([n_kv_heads]
// [max_context][head_dim] fp16: one layer of a dense cache, the new rows
// already stored). out_dev as q_dev. Queries are rounded to fp16; the
// probabilities are normalized and rounded to fp16 before V, as
// CpuForward::attention does (prefill_attention.cu lists the differences).
// INVALID_ARGUMENT when past + n_queries exceeds max_context.
Status prefill_attention(const PrefillAttentionPlan& plan, const float* q_dev, int64_t n_queries,
                         int64_t past, const uint16_t* k_dev, const uint16_t* v_dev, float* out_dev,
                         cudaStream_t stream);

// Wire staging: staging_dev[i * page_bytes ...] <-> *pages_dev[i].
Status gather_pages(const PageCopyPlan& plan, const void* const* pages_dev, void* staging_dev,
                    cudaStream_t stream);
Status scatter_pages(const PageCopyPlan& plan, const void* staging_dev, void* const* pages_dev,
                     cudaStream_t stream);

// Greedy ids of n_rows rows of vocab logits.
Status argmax(const float* logits_dev, int64_t n_rows, int64_t vocab, int32_t* out_dev,
              cudaStream_t stream);

// One token per row with that row's SampleRow (device array; check the host
// copies with check_sample_row first).
Status sample(const float* logits_dev, int64_t n_rows, int64_t vocab, const SampleRow* rows_dev,
              int32_t* out_dev, cudaStream_t stream);

// ---- the Attention-Gate (gate_plan.h documents semantics and layouts).
// proj_dev [plan.n_tokens][plan.n_slots][3D] (plan.proj_bytes) = each
// slot's [Wq;Wk;Wv] (w_dev [n_slots][3D][n_embd] floats) times x_dev
// [n_tokens][n_embd].
Status gate_project(const GatePlan& plan, const float* w_dev, const float* x_dev, float* proj_dev,
                    cudaStream_t stream);
// logits_dev [n_slots][n_tokens] (plan.logits_bytes) of the window-context
// attention gate from proj_dev; wo_dev [n_slots][D], bias_dev [n_slots].
Status gate_logits_window(const GatePlan& plan, const float* proj_dev, const float* wo_dev,
                          const float* bias_dev, float* logits_dev, cudaStream_t stream);
// flags_dev [n_slots][n_tokens] = 1 for sinks, else logit >= threshold[s] +
// offset (threshold_dev [n_slots]); offset must be finite.
Status gate_flags(const GatePlan& plan, const float* logits_dev, const float* threshold_dev,
                  float offset, uint8_t* flags_dev, cudaStream_t stream);

}  // namespace kvgate::engine::cuda
