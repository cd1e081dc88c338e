// The glue of CudaForward's layer stack: embedding lookup, K/V rows into the
// dense cache, residual adds, and the two tiny kernels that keep a decode
// step's token and position in device memory (so a captured step replays).
//
// Embedding rows are dequantized as engine/cpu/quant.cpp's dequantize_row
// does (q * d + m in float, no FMA), so x starts from the CPU's bits.
#include <cuda_fp16.h>

#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda::kernels {
namespace {

__global__ void embed_kernel(const uint8_t* __restrict__ table, EmbedType type, int64_t row_bytes,
                             const int32_t* __restrict__ tokens, int64_t n_embd,
                             float* __restrict__ out) {
  const uint8_t* row = table + static_cast<int64_t>(tokens[blockIdx.x]) * row_bytes;
  float* o = out + static_cast<int64_t>(blockIdx.x) * n_embd;
  for (int64_t i = threadIdx.x; i < n_embd; i += blockDim.x) {
    float v;
    switch (type) {
      case EmbedType::kF32:
        v = reinterpret_cast<const float*>(row)[i];
        break;
      case EmbedType::kF16:
        v = __half2float(__ushort_as_half(reinterpret_cast<const uint16_t*>(row)[i]));
        break;
      case EmbedType::kQ4_1: {
        const uint8_t* blk = row + (i / kQuantBlock) * 20;
        const int j = static_cast<int>(i % kQuantBlock);
        const float d = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk)));
        const float m = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk + 2)));
        const uint8_t byte = blk[4 + (j & 15)];
        const int q = j < 16 ? (byte & 0x0f) : (byte >> 4);
        v = __fadd_rn(__fmul_rn(static_cast<float>(q), d), m);
        break;
      }
      default: {  // kQ8_0
        const uint8_t* blk = row + (i / kQuantBlock) * 34;
        const float d = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk)));
        v = __fmul_rn(static_cast<float>(static_cast<int8_t>(blk[2 + i % kQuantBlock])), d);
        break;
      }
    }
    o[i] = v;
  }
}

__global__ void store_kv_kernel(const float* __restrict__ k, const float* __restrict__ v,
                                int64_t n_rows, int64_t kv_dim, int64_t head_dim,
                                const int32_t* __restrict__ positions, int64_t head_stride,
                                __half* __restrict__ k_cache, __half* __restrict__ v_cache) {
  const int64_t total = n_rows * kv_dim;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / kv_dim, c = i % kv_dim;
    const int64_t h = c / head_dim, e = c % head_dim;
    const int64_t dst = h * head_stride + static_cast<int64_t>(positions[r]) * head_dim + e;
    k_cache[dst] = __float2half_rn(k[i]);
    v_cache[dst] = __float2half_rn(v[i]);
  }
}

__global__ void add_kernel(float* y, const float* __restrict__ x, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = __fadd_rn(y[i], x[i]);
  }
}

__global__ void set_task_lengths_kernel(AttnTask* tasks, int64_t n_tasks, const DecodeStep* step) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n_tasks) tasks[i].near_tokens = step->pos + 1;
}

__global__ void finish_step_kernel(const int32_t* next_token, DecodeStep* step, int32_t pos) {
  step->token = *next_token;
  step->pos = pos >= 0 ? pos : step->pos + 1;
}

unsigned grid_for(int64_t n) {
  int64_t g = (n + kEltThreads - 1) / kEltThreads;
  if (g > 65535) g = 65535;  // grid-stride beyond
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace

cudaError_t embed_rows(const void* table, EmbedType type, int64_t row_bytes, const int32_t* tokens,
                       int64_t n_rows, int64_t n_embd, float* out, cudaStream_t stream) {
  embed_kernel<<<static_cast<unsigned>(n_rows), kEltThreads, 0, stream>>>(
      static_cast<const uint8_t*>(table), type, row_bytes, tokens, n_embd, out);
  return cudaGetLastError();
}

cudaError_t store_kv(const float* k, const float* v, int64_t n_rows, int64_t n_kv_heads,
                     int64_t head_dim, const int32_t* positions, int64_t head_stride,
                     uint16_t* k_cache, uint16_t* v_cache, cudaStream_t stream) {
  const int64_t kv_dim = n_kv_heads * head_dim;
  store_kv_kernel<<<grid_for(n_rows * kv_dim), kEltThreads, 0, stream>>>(
      k, v, n_rows, kv_dim, head_dim, positions, head_stride, reinterpret_cast<__half*>(k_cache),
      reinterpret_cast<__half*>(v_cache));
  return cudaGetLastError();
}

cudaError_t add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream) {
  add_kernel<<<grid_for(n), kEltThreads, 0, stream>>>(y, x, n);
  return cudaGetLastError();
}

cudaError_t set_task_lengths(AttnTask* tasks, int64_t n_tasks, const DecodeStep* step,
                             cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((n_tasks + kEltThreads - 1) / kEltThreads);
  set_task_lengths_kernel<<<grid, kEltThreads, 0, stream>>>(tasks, n_tasks, step);
  return cudaGetLastError();
}

cudaError_t finish_step(const int32_t* next_token, DecodeStep* step, int32_t pos,
                        cudaStream_t stream) {
  finish_step_kernel<<<1, 1, 0, stream>>>(next_token, step, pos);
  return cudaGetLastError();
}

}  // namespace kvgate::engine::cuda::kernels
