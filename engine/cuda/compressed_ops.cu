// Kernels of the compressed decode step (CudaForward::decode_compressed;
// records from compressed_step.h): the step's K/V rows into the caches'
// ring rows, and the window-context Attention-Gate of the new token — its
// gate row written into the cache, its logit over the slot's proximal gate
// rows (read from pages), its flag.
//
// The gate arithmetic is GateDecoder's (engine/gate_runtime.cpp) as
// gate.cu's prefill kernel does it: K/V rows are the cache's fp16 values,
// q is the float projection, per gate head an online softmax in the rows'
// order (ring order, as GateRowsView gives them), logit = bias + Σ_a
// (wo_a·o_a) / sum_a in head order. Only expf and summation details differ
// from the CPU (see gate_plan.h).
#include <cuda_fp16.h>

#include "engine/cuda/gate_attend.cuh"
#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda::kernels {
namespace {

// Block (item, KV head): the new token's K and V row of this layer.
__global__ void store_kv_rows_kernel(const float* __restrict__ k, const float* __restrict__ v,
                                     int64_t n_kv_heads, int64_t head_dim,
                                     uint16_t* const* __restrict__ k_rows,
                                     uint16_t* const* __restrict__ v_rows) {
  const int64_t task = blockIdx.x;  // item * n_kv_heads + head
  const float* kr = k + task * head_dim;
  const float* vr = v + task * head_dim;
  uint16_t* kd = k_rows[task];
  uint16_t* vd = v_rows[task];
  for (int64_t e = threadIdx.x; e < head_dim; e += blockDim.x) {
    kd[e] = __half_as_ushort(__float2half_rn(kr[e]));
    vd[e] = __half_as_ushort(__float2half_rn(vr[e]));
  }
}

// Block (item, slot j): the new token's gate row = fp16 of its projected
// K and V (proj [item][j][3D]: q, k, v).
__global__ void gate_store_rows_kernel(const float* __restrict__ proj, int64_t dim,
                                       const GateRowTask* __restrict__ tasks) {
  const int64_t pair = blockIdx.x;
  const float* kv = proj + pair * 3 * dim + dim;
  uint16_t* row = tasks[pair].own_row;
  for (int64_t e = threadIdx.x; e < 2 * dim; e += blockDim.x) {
    row[e] = __half_as_ushort(__float2half_rn(kv[e]));
  }
}

// One warp per (item, slot j), one lane per gate head.
__global__ void gate_decode_logits_kernel(const float* __restrict__ proj,
                                          const GateRowTask* __restrict__ tasks, int heads,
                                          int head_dim, const float* __restrict__ wo,
                                          const float* __restrict__ bias, int64_t n_slots,
                                          float* __restrict__ logits) {
  __shared__ float contrib[kGateMaxHeads];
  const int64_t pair = blockIdx.x;  // item * n_slots + j
  const int64_t j = pair % n_slots;
  const int dim = heads * head_dim;
  const float* q = proj + pair * 3 * static_cast<int64_t>(dim);
  const GateRowTask t = tasks[pair];
  for (int a = threadIdx.x; a < heads; a += 32) {
    const auto rows = [&](int64_t r) {
      const uint16_t* row = t.pages[r / t.rows_per_page] + (r % t.rows_per_page) * 2 * dim;
      return GateRowPtrs<uint16_t>{row + a * head_dim, row + dim + a * head_dim};
    };
    contrib[a] = gate_head_contribution(q + a * head_dim, head_dim, t.n_rows,
                                        wo + j * dim + a * head_dim, rows,
                                        [](uint16_t h) { return __half2float(__ushort_as_half(h)); });
  }
  __syncwarp();
  if (threadIdx.x == 0) {
    float logit = bias[j];
    for (int a = 0; a < heads; ++a) logit += contrib[a];
    logits[pair] = logit;
  }
}

// flags[item][slot_ids[j]] of the layout's n_total slots.
__global__ void gate_decode_flags_kernel(const float* __restrict__ logits, int64_t n_pairs,
                                         int64_t n_slots, const int32_t* __restrict__ slot_ids,
                                         int64_t n_total, const float* __restrict__ threshold,
                                         float offset, int never_retain,
                                         uint8_t* __restrict__ flags) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pair >= n_pairs) return;
  const int64_t item = pair / n_slots, j = pair % n_slots;
  const float thr = threshold[j] + offset;  // the CPU adds in fp32, then compares
  flags[item * n_total + slot_ids[j]] = (!never_retain && logits[pair] >= thr) ? 1 : 0;
}

}  // namespace

cudaError_t store_kv_rows(const float* k, const float* v, int64_t n_items, int64_t n_kv_heads,
                          int64_t head_dim, uint16_t* const* k_rows, uint16_t* const* v_rows,
                          cudaStream_t stream) {
  store_kv_rows_kernel<<<static_cast<unsigned>(n_items * n_kv_heads), kStoreRowThreads, 0,
                         stream>>>(k, v, n_kv_heads, head_dim, k_rows, v_rows);
  return cudaGetLastError();
}

cudaError_t gate_store_rows(const float* proj, int64_t n_pairs, int64_t dim,
                            const GateRowTask* tasks, cudaStream_t stream) {
  gate_store_rows_kernel<<<static_cast<unsigned>(n_pairs), kStoreRowThreads, 0, stream>>>(
      proj, dim, tasks);
  return cudaGetLastError();
}

cudaError_t gate_decode_logits(const float* proj, const GateRowTask* tasks, int64_t n_pairs,
                               int64_t n_slots, int heads, int head_dim, const float* wo,
                               const float* bias, float* logits, cudaStream_t stream) {
  gate_decode_logits_kernel<<<static_cast<unsigned>(n_pairs), kGateLogitThreads, 0, stream>>>(
      proj, tasks, heads, head_dim, wo, bias, n_slots, logits);
  return cudaGetLastError();
}

cudaError_t gate_decode_flags(const float* logits, int64_t n_pairs, int64_t n_slots,
                              const int32_t* slot_ids, int64_t n_total, const float* threshold,
                              float offset, bool never_retain, uint8_t* flags,
                              cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((n_pairs + kGateFlagThreads - 1) / kGateFlagThreads);
  gate_decode_flags_kernel<<<blocks, kGateFlagThreads, 0, stream>>>(
      logits, n_pairs, n_slots, slot_ids, n_total, threshold, offset, never_retain ? 1 : 0, flags);
  return cudaGetLastError();
}

}  // namespace kvgate::engine::cuda::kernels
