// Decode GEMV reading GGUF weights directly: Q4_1 and Q8_0 against 8-bit
// quantized activations (integer dot per block with dp4a, as
// engine/cpu/matmul.h and llama.cpp do), F16 against fp16-rounded
// activations with fp32 accumulation.
//
// One warp per output row; lane j takes weight blocks j, j + 32, ... so a
// warp's loads of consecutive blocks are coalesced. Up to kGemvMaxTokens
// tokens share each weight load; larger batches take several passes.
#include <cuda_fp16.h>

#include "engine/cuda/kernels.h"
#include "engine/cuda/warp_reduce.cuh"

namespace kvgate::engine::cuda::kernels {
namespace {

__device__ __forceinline__ float round_fp16(float v) {
  return __half2float(__float2half_rn(v));
}

// One warp per block of 32 activations: amax, d = amax/127 (stored rounded
// to fp16), q = round-half-even(x * 127/amax), s = fp16(d * sum(q)) — the
// bits of engine/cpu/quant.cpp's quantize_row_q8_0/q8_1.
__global__ void quantize_q8_kernel(const float* __restrict__ x, int64_t n_blocks,
                                   int8_t* __restrict__ qs, float* __restrict__ d,
                                   float* __restrict__ s, bool with_sum) {
  const int64_t wb = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (wb >= n_blocks) return;  // uniform per warp
  const float v = x[wb * kQuantBlock + lane];
  const float amax = warp_max(fabsf(v));
  const float dd = amax / 127.0f;
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  const int q = __float2int_rn(__fmul_rn(v, id));
  qs[wb * kQuantBlock + lane] = static_cast<int8_t>(q);
  const int sum = warp_sum_int(q);
  if (lane == 0) {
    d[wb] = round_fp16(dd);
    if (with_sum) s[wb] = round_fp16(__fmul_rn(dd, static_cast<float>(sum)));
  }
}

// kQ41: 20-byte blocks {half d, half m, 16 bytes of nibbles (low = elements
// 0..15, high = 16..31)}, y += d_w d_x isum + m_w s_x. Otherwise Q8_0:
// 34-byte blocks {half d, 32 int8}, only 2-byte aligned: read as halves.
template <bool kQ41>
__global__ void gemv_q_kernel(const uint8_t* __restrict__ w, int64_t rows, int64_t nb,
                              int64_t row_bytes, const int8_t* __restrict__ qs,
                              const float* __restrict__ d, const float* __restrict__ s,
                              int64_t cols, int n, float* __restrict__ y) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  if (r >= rows) return;
  float acc[kGemvMaxTokens];
#pragma unroll
  for (int t = 0; t < kGemvMaxTokens; ++t) acc[t] = 0.0f;
  const uint8_t* row = w + r * row_bytes;
  for (int64_t b = lane; b < nb; b += kWarpSize) {
    float dw, mw = 0.0f;
    int wq[8];
    if constexpr (kQ41) {
      const uint8_t* blk = row + b * 20;
      const __half2 dm = *reinterpret_cast<const __half2*>(blk);
      dw = __low2float(dm);
      mw = __high2float(dm);
      const int* p = reinterpret_cast<const int*>(blk + 4);  // 4-byte aligned (20-byte blocks)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int v = __ldg(p + j);
        wq[j] = v & 0x0f0f0f0f;             // elements 4j .. 4j+3
        wq[j + 4] = (v >> 4) & 0x0f0f0f0f;  // elements 16+4j ..
      }
    } else {
      const uint16_t* blk = reinterpret_cast<const uint16_t*>(row + b * 34);
      dw = __half2float(__ushort_as_half(__ldg(blk)));
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        wq[j] = static_cast<int>(static_cast<uint32_t>(__ldg(blk + 1 + 2 * j)) |
                                 (static_cast<uint32_t>(__ldg(blk + 2 + 2 * j)) << 16));
      }
    }
#pragma unroll
    for (int t = 0; t < kGemvMaxTokens; ++t) {
      if (t < n) {
        const int4* xq = reinterpret_cast<const int4*>(qs + t * cols + b * kQuantBlock);
        const int4 x0 = __ldg(xq), x1 = __ldg(xq + 1);
        int isum = 0;
        isum = __dp4a(wq[0], x0.x, isum);
        isum = __dp4a(wq[1], x0.y, isum);
        isum = __dp4a(wq[2], x0.z, isum);
        isum = __dp4a(wq[3], x0.w, isum);
        isum = __dp4a(wq[4], x1.x, isum);
        isum = __dp4a(wq[5], x1.y, isum);
        isum = __dp4a(wq[6], x1.z, isum);
        isum = __dp4a(wq[7], x1.w, isum);
        const float dx = __ldg(d + t * nb + b);
        float blk = dw * dx * static_cast<float>(isum);
        if constexpr (kQ41) blk += mw * __ldg(s + t * nb + b);
        acc[t] += blk;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kGemvMaxTokens; ++t) {
    if (t < n) {
      const float v = warp_sum(acc[t]);
      if (lane == 0) y[t * rows + r] = v;
    }
  }
}

// Products of two fp16 values are exact in fp32, so fmaf rounds exactly as
// the CPU's multiply-then-add does; only the summation order differs.
__global__ void gemv_f16_kernel(const __half2* __restrict__ w, int64_t rows, int64_t cols,
                                const float* __restrict__ x, int n, float* __restrict__ y) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  if (r >= rows) return;
  const int64_t pairs = cols / 2;
  const __half2* row = w + r * pairs;
  float acc[kGemvMaxTokens];
#pragma unroll
  for (int t = 0; t < kGemvMaxTokens; ++t) acc[t] = 0.0f;
  for (int64_t i = lane; i < pairs; i += kWarpSize) {
    const float2 wf = __half22float2(row[i]);
#pragma unroll
    for (int t = 0; t < kGemvMaxTokens; ++t) {
      if (t < n) {
        const float2 xv = __ldg(reinterpret_cast<const float2*>(x + t * cols) + i);
        acc[t] = fmaf(wf.x, round_fp16(xv.x), acc[t]);
        acc[t] = fmaf(wf.y, round_fp16(xv.y), acc[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kGemvMaxTokens; ++t) {
    if (t < n) {
      const float v = warp_sum(acc[t]);
      if (lane == 0) y[t * rows + r] = v;
    }
  }
}

unsigned gemv_grid(int64_t rows) {
  return static_cast<unsigned>((rows + kGemvWarps - 1) / kGemvWarps);
}

}  // namespace

cudaError_t quantize_q8(const float* x, int64_t n_tokens, int64_t cols, int8_t* qs, float* d,
                        float* s, bool with_sum, cudaStream_t stream) {
  const int64_t n_blocks = n_tokens * (cols / kQuantBlock);
  constexpr int kThreads = 256;
  const int64_t grid = (n_blocks * kWarpSize + kThreads - 1) / kThreads;
  quantize_q8_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(x, n_blocks, qs, d, s,
                                                                           with_sum);
  return cudaGetLastError();
}

cudaError_t gemv_q4_1(const void* w, int64_t rows, int64_t cols, const int8_t* qs, const float* d,
                      const float* s, int64_t n_tokens, float* y, cudaStream_t stream) {
  const int64_t nb = cols / kQuantBlock;
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kGemvMaxTokens) {
    const int n = static_cast<int>(n_tokens - t0 < kGemvMaxTokens ? n_tokens - t0 : kGemvMaxTokens);
    gemv_q_kernel<true><<<gemv_grid(rows), kGemvWarps * kWarpSize, 0, stream>>>(
        static_cast<const uint8_t*>(w), rows, nb, nb * 20, qs + t0 * cols, d + t0 * nb, s + t0 * nb,
        cols, n, y + t0 * rows);
  }
  return cudaGetLastError();
}

cudaError_t gemv_q8_0(const void* w, int64_t rows, int64_t cols, const int8_t* qs, const float* d,
                      int64_t n_tokens, float* y, cudaStream_t stream) {
  const int64_t nb = cols / kQuantBlock;
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kGemvMaxTokens) {
    const int n = static_cast<int>(n_tokens - t0 < kGemvMaxTokens ? n_tokens - t0 : kGemvMaxTokens);
    gemv_q_kernel<false><<<gemv_grid(rows), kGemvWarps * kWarpSize, 0, stream>>>(
        static_cast<const uint8_t*>(w), rows, nb, nb * 34, qs + t0 * cols, d + t0 * nb, nullptr,
        cols, n, y + t0 * rows);
  }
  return cudaGetLastError();
}

cudaError_t gemv_f16(const void* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                     float* y, cudaStream_t stream) {
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kGemvMaxTokens) {
    const int n = static_cast<int>(n_tokens - t0 < kGemvMaxTokens ? n_tokens - t0 : kGemvMaxTokens);
    gemv_f16_kernel<<<gemv_grid(rows), kGemvWarps * kWarpSize, 0, stream>>>(
        static_cast<const __half2*>(w), rows, cols, x + t0 * cols, n, y + t0 * rows);
  }
  return cudaGetLastError();
}

}  // namespace kvgate::engine::cuda::kernels
