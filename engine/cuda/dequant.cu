// Conversions feeding the prefill GEMM (gemm.h): GGUF weight rows
// dequantized once to fp16 rows, and fp32 activations rounded to fp16.
//
// Dequantization repeats engine/cpu/quant.cpp's dequantize_row in float
// (q * d + m, no FMA) before the one rounding to fp16, so a weight is
// fp32_to_fp16(cpu value) bit for bit.
#include <cuda_fp16.h>

#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda::kernels {
namespace {

constexpr int kThreads = 256;

// One thread per element; blocks of 32 elements as in ggml_types.h.
__global__ void dequant_q4_1_kernel(const uint8_t* __restrict__ w, int64_t n_blocks,
                                    __half* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_blocks * kQuantBlock) return;
  const int64_t b = i / kQuantBlock;
  const int j = static_cast<int>(i % kQuantBlock);
  const uint8_t* blk = w + b * 20;
  const float d = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk)));
  const float m = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk + 2)));
  const uint8_t byte = blk[4 + (j & 15)];
  const int q = j < 16 ? (byte & 0x0f) : (byte >> 4);
  out[i] = __float2half_rn(__fadd_rn(__fmul_rn(static_cast<float>(q), d), m));
}

__global__ void dequant_q8_0_kernel(const uint8_t* __restrict__ w, int64_t n_blocks,
                                    __half* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_blocks * kQuantBlock) return;
  const int64_t b = i / kQuantBlock;
  const int j = static_cast<int>(i % kQuantBlock);
  const uint8_t* blk = w + b * 34;
  const float d = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk)));
  const int q = static_cast<int8_t>(blk[2 + j]);
  out[i] = __float2half_rn(__fmul_rn(static_cast<float>(q), d));
}

__global__ void f32_to_f16_kernel(const float* __restrict__ x, int64_t n,
                                  __half* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2half_rn(x[i]);
  }
}

unsigned grid_for(int64_t n) {
  const int64_t g = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace

cudaError_t dequantize_to_f16(bool q4_1, const void* w, int64_t n_elems, void* out,
                              cudaStream_t stream) {
  const int64_t n_blocks = n_elems / kQuantBlock;
  if (q4_1) {
    dequant_q4_1_kernel<<<grid_for(n_elems), kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(w), n_blocks, static_cast<__half*>(out));
  } else {
    dequant_q8_0_kernel<<<grid_for(n_elems), kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(w), n_blocks, static_cast<__half*>(out));
  }
  return cudaGetLastError();
}

cudaError_t f32_to_f16(const float* x, int64_t n, void* out, cudaStream_t stream) {
  int64_t grid = (n + kThreads - 1) / kThreads;
  if (grid > 65535) grid = 65535;
  if (grid < 1) grid = 1;
  f32_to_f16_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      x, n, static_cast<__half*>(out));
  return cudaGetLastError();
}

}  // namespace kvgate::engine::cuda::kernels
