// Internal to engine/cuda: the kernel launchers, one per kernel, defined in
// the .cu files. Raw device pointers, sizes and a stream; no validation
// (cuda_ops.cpp validates through the plans first) and no synchronization:
// each returns the launch error (cudaGetLastError) and the work runs
// asynchronously on `stream`. C++17 (nvcc), nothing from the serving code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/kernel_params.h"

namespace kvgate::engine::cuda::kernels {

// ---- gemv.cu
// Activations x [n_tokens][cols] to 8-bit blocks (Q8_0 rule, plus Q8_1's s
// when with_sum): qs [n_tokens][cols], d and s [n_tokens][cols / 32].
cudaError_t quantize_q8(const float* x, int64_t n_tokens, int64_t cols, int8_t* qs, float* d,
                        float* s, bool with_sum, cudaStream_t stream);
// y[t * rows + r] = W[r] . x[t]. Q4_1 uses qs, d, s; Q8_0 uses qs, d.
cudaError_t gemv_q4_1(const void* w, int64_t rows, int64_t cols, const int8_t* qs, const float* d,
                      const float* s, int64_t n_tokens, float* y, cudaStream_t stream);
cudaError_t gemv_q8_0(const void* w, int64_t rows, int64_t cols, const int8_t* qs, const float* d,
                      int64_t n_tokens, float* y, cudaStream_t stream);
cudaError_t gemv_f16(const void* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                     float* y, cudaStream_t stream);

// ---- dequant.cu
// n_elems (multiple of 32) weights of Q4_1 (q4_1) or Q8_0 rows to fp16.
cudaError_t dequantize_to_f16(bool q4_1, const void* w, int64_t n_elems, void* out,
                              cudaStream_t stream);
// out[i] = fp16(x[i]), round to nearest even.
cudaError_t f32_to_f16(const float* x, int64_t n, void* out, cudaStream_t stream);

// ---- ops.cu
// Row-wise: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight. out may alias x.
cudaError_t rms_norm(const float* x, const float* weight, float* out, int64_t n_rows, int64_t n,
                     float eps, cudaStream_t stream);
// In place on x [n_rows][n_heads][head_dim]: row r rotated at positions[r]
// (device int32 array), theta_i = pos * theta_scale^i built by repeated
// float multiplication as engine/cpu/ops.cpp builds it.
cudaError_t rope_norm(float* x, int64_t n_rows, int64_t n_heads, int64_t head_dim,
                      const int32_t* positions, float theta_scale, cudaStream_t stream);
// out = gate / (1 + e^-gate) * up. out may alias either.
cudaError_t swiglu(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream);
// Gather: dst + i * page_bytes <- pages[i]; scatter: pages[i] <- src + i * page_bytes.
cudaError_t gather_pages(const void* const* pages, int64_t n_pages, int64_t page_bytes,
                         void* staging, cudaStream_t stream);
cudaError_t scatter_pages(const void* staging, int64_t n_pages, int64_t page_bytes,
                          void* const* pages, cudaStream_t stream);

// ---- attention.cu
// Split pass then merge pass; layout of `partials` in launch_plan.h.
cudaError_t decode_attention(const AttnTask* tasks, int64_t n_tasks, int64_t group,
                             int64_t head_dim, int64_t page_tokens, int64_t n_splits,
                             int64_t rows_per_split, float scale, float* partials,
                             size_t shared_bytes, cudaStream_t stream);

// ---- prefill_attention.cu
// q, out [n_queries][n_heads][head_dim] fp32; k_cache / v_cache: KV head h's
// rows at h * kv_head_stride (fp16, head_dim each). Queries at positions
// past + i see keys 0..past + i. queries_per_warp and shared_bytes from
// plan_prefill_attention (other combinations: cudaErrorInvalidValue).
cudaError_t prefill_attention(const float* q, int64_t n_queries, int64_t n_heads, int64_t head_dim,
                              const uint16_t* k_cache, const uint16_t* v_cache,
                              int64_t kv_head_stride, int64_t group, int64_t past, float scale,
                              float* out, int queries_per_warp, size_t shared_bytes,
                              cudaStream_t stream);

// ---- forward_ops.cu (CudaForward's glue; token ids are checked by the caller)
// out[r] = dequantized row tokens[r] of the table (row_bytes apart).
cudaError_t embed_rows(const void* table, EmbedType type, int64_t row_bytes, const int32_t* tokens,
                       int64_t n_rows, int64_t n_embd, float* out, cudaStream_t stream);
// k/v [n_rows][n_kv_heads * head_dim] fp32 -> fp16 cache rows positions[r]
// of each KV head (head h at h * head_stride elements).
cudaError_t store_kv(const float* k, const float* v, int64_t n_rows, int64_t n_kv_heads,
                     int64_t head_dim, const int32_t* positions, int64_t head_stride,
                     uint16_t* k_cache, uint16_t* v_cache, cudaStream_t stream);
// y += x elementwise (one rounding per element, as the CPU's add).
cudaError_t add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream);
// tasks[i].near_tokens = step->pos + 1 for i < n_tasks (the dense cache's
// decode attention covers every token so far and the new one).
cudaError_t set_task_lengths(AttnTask* tasks, int64_t n_tasks, const DecodeStep* step,
                             cudaStream_t stream);
// step->token = *next_token; step->pos = pos if pos >= 0, else step->pos + 1.
cudaError_t finish_step(const int32_t* next_token, DecodeStep* step, int32_t pos,
                        cudaStream_t stream);

// ---- sampling.cu
cudaError_t argmax_rows(const float* logits, int64_t n_rows, int64_t vocab, int32_t* out,
                        cudaStream_t stream);
cudaError_t sample_rows(const float* logits, int64_t n_rows, int64_t vocab, const SampleRow* rows,
                        int32_t* out, size_t shared_bytes, cudaStream_t stream);

// ---- gate.cu (the Attention-Gate; gate_plan.h documents the semantics)
// proj [n_tokens][n_slots][3 * dim] = per slot [Wq;Wk;Wv] (w: [n_slots]
// [3 * dim][n_embd]) times x [n_tokens][n_embd].
cudaError_t gate_project(const float* w, const float* x, int64_t n_tokens, int64_t n_slots,
                         int64_t dim, int64_t n_embd, float* proj, int64_t blocks, int threads,
                         cudaStream_t stream);
// logits [n_slots][n_tokens] of the window-context attention gate.
cudaError_t gate_logits_window(const float* proj, int64_t n_tokens, int64_t n_slots, int heads,
                               int head_dim, int64_t n_sink, int64_t n_window, const float* wo,
                               const float* bias, float* logits, cudaStream_t stream);
// flags [n_slots][n_tokens] = t < n_sink || logit >= threshold[s] + offset.
cudaError_t gate_flags(const float* logits, int64_t n_tokens, int64_t n_slots, int64_t n_sink,
                       const float* threshold, float offset, uint8_t* flags, int64_t blocks,
                       int threads, cudaStream_t stream);

// ---- compressed_ops.cu (the compressed decode step; compressed_step.h)
// K/V [n_items][n_kv_heads][head_dim] floats to fp16 rows at the
// addresses k_rows / v_rows [n_items][n_kv_heads] (device arrays).
cudaError_t store_kv_rows(const float* k, const float* v, int64_t n_items, int64_t n_kv_heads,
                          int64_t head_dim, uint16_t* const* k_rows, uint16_t* const* v_rows,
                          cudaStream_t stream);
// Each of n_pairs (item, slot) tasks: own_row = fp16(proj[pair][D..3D)).
cudaError_t gate_store_rows(const float* proj, int64_t n_pairs, int64_t dim,
                            const GateRowTask* tasks, cudaStream_t stream);
// logits[pair] of the window-context gate over the task's rows (pair =
// item * n_slots + j; wo [n_slots][D], bias [n_slots]).
cudaError_t gate_decode_logits(const float* proj, const GateRowTask* tasks, int64_t n_pairs,
                               int64_t n_slots, int heads, int head_dim, const float* wo,
                               const float* bias, float* logits, cudaStream_t stream);
// flags[item * n_total + slot_ids[j]] = !never_retain && logit >= threshold[j] + offset.
cudaError_t gate_decode_flags(const float* logits, int64_t n_pairs, int64_t n_slots,
                              const int32_t* slot_ids, int64_t n_total, const float* threshold,
                              float offset, bool never_retain, uint8_t* flags,
                              cudaStream_t stream);

}  // namespace kvgate::engine::cuda::kernels
