// The Attention-Gate's kernels (gate_plan.h says what each computes and
// how it matches engine/gate_math.h). Shapes are checked by the host API.
#include <cuda_fp16.h>

#include <cstdint>

#include "engine/cuda/gate_attend.cuh"
#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda::kernels {
namespace {

// proj[t][s][r] = w[s][r] · x[t], one warp per (t, s, r).
__global__ void gate_project_kernel(const float* __restrict__ w, const float* __restrict__ x,
                                    int64_t n_rows_total, int64_t n_slots, int64_t rows,
                                    int64_t n_embd, float* __restrict__ proj) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n_rows_total) return;
  const int64_t r = warp % rows;
  const int64_t pair = warp / rows;  // t * n_slots + s
  const int64_t s = pair % n_slots;
  const int64_t t = pair / n_slots;
  const float* wr = w + (s * rows + r) * n_embd;
  const float* xt = x + t * n_embd;
  float sum = 0.0f;
  for (int64_t i = lane; i < n_embd; i += 32) sum += wr[i] * xt[i];
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) proj[warp] = sum;
}

__device__ __forceinline__ float round_fp16(float v) { return __half2float(__float2half_rn(v)); }

// One warp per (t, s); lane a (and a + 32) handles gate head a over the
// context rows in the CPU's order.
__global__ void gate_logits_window_kernel(const float* __restrict__ proj, int64_t n_tokens,
                                          int64_t n_slots, int heads, int head_dim,
                                          int64_t n_sink, int64_t n_window,
                                          const float* __restrict__ wo,
                                          const float* __restrict__ bias,
                                          float* __restrict__ logits) {
  __shared__ float contrib[kGateMaxHeads];
  const int64_t pair = blockIdx.x;  // t * n_slots + s
  const int64_t s = pair % n_slots;
  const int64_t t = pair / n_slots;
  const int dim = heads * head_dim;
  const int64_t width = 3 * static_cast<int64_t>(dim);
  const float* q = proj + pair * width;
  const int64_t sinks = n_sink < t + 1 ? n_sink : t + 1;
  const int64_t first = n_sink > t + 1 - n_window ? n_sink : t + 1 - n_window;
  // Context: sinks [0, sinks), then [first, t]; the second range starts
  // at or after n_sink, so nothing repeats.
  const int64_t n_ctx = sinks + (t >= first ? t - first + 1 : 0);
  for (int a = threadIdx.x; a < heads; a += 32) {
    const auto rows = [&](int64_t j) {
      const int64_t c = j < sinks ? j : first + (j - sinks);
      const float* kr = proj + (c * n_slots + s) * width + dim + a * head_dim;
      return GateRowPtrs<float>{kr, kr + dim};
    };
    contrib[a] = gate_head_contribution(q + a * head_dim, head_dim, n_ctx, wo + s * dim + a * head_dim,
                                        rows, [](float v) { return round_fp16(v); });
  }
  __syncwarp();
  if (threadIdx.x == 0) {
    float logit = bias[s];
    for (int a = 0; a < heads; ++a) logit += contrib[a];
    logits[s * n_tokens + t] = logit;
  }
}

__global__ void gate_flags_kernel(const float* __restrict__ logits, int64_t n_tokens,
                                  int64_t n_slots, int64_t n_sink,
                                  const float* __restrict__ threshold, float offset,
                                  uint8_t* __restrict__ flags) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_tokens * n_slots) return;
  const int64_t s = i / n_tokens;
  const int64_t t = i % n_tokens;
  // The CPU adds the offset in fp32 first, then compares.
  const float thr = threshold[s] + offset;
  flags[i] = (t < n_sink || logits[i] >= thr) ? 1 : 0;
}

}  // namespace

cudaError_t gate_project(const float* w, const float* x, int64_t n_tokens, int64_t n_slots,
                         int64_t dim, int64_t n_embd, float* proj, int64_t blocks, int threads,
                         cudaStream_t stream) {
  const int64_t rows = 3 * dim;
  gate_project_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      w, x, n_tokens * n_slots * rows, n_slots, rows, n_embd, proj);
  return cudaGetLastError();
}

cudaError_t gate_logits_window(const float* proj, int64_t n_tokens, int64_t n_slots, int heads,
                               int head_dim, int64_t n_sink, int64_t n_window, const float* wo,
                               const float* bias, float* logits, cudaStream_t stream) {
  gate_logits_window_kernel<<<static_cast<unsigned>(n_tokens * n_slots), kGateLogitThreads, 0,
                              stream>>>(proj, n_tokens, n_slots, heads, head_dim, n_sink,
                                        n_window, wo, bias, logits);
  return cudaGetLastError();
}

cudaError_t gate_flags(const float* logits, int64_t n_tokens, int64_t n_slots, int64_t n_sink,
                       const float* threshold, float offset, uint8_t* flags, int64_t blocks,
                       int threads, cudaStream_t stream) {
  gate_flags_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      logits, n_tokens, n_slots, n_sink, threshold, offset, flags);
  return cudaGetLastError();
}

}  // namespace kvgate::engine::cuda::kernels
