// Row and elementwise ops (RMSNorm, RoPE, SwiGLU) and the KV page copies
// between scattered pages and a contiguous wire staging buffer.
//
// Arithmetic mirrors engine/cpu's scalar kernels operation for operation
// (explicit __fmul_rn/__fadd_rn where nvcc could otherwise contract into an
// FMA), so results differ from the CPU only by the device's expf/sinf/cosf
// (a few ulp) and by summation order.
#include <cuda_fp16.h>

#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda::kernels {
namespace {

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum of x^2 (float squares summed in double, as llama.cpp and the CPU
// backend do), then out = (x * scale) * weight.
__global__ void rms_norm_kernel(const float* x, const float* __restrict__ weight, float* out,
                                int64_t n, float eps) {
  __shared__ double partial[kEltThreads / kWarpSize];
  __shared__ float scale_sh;
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * n;
  float* yr = out + static_cast<int64_t>(blockIdx.x) * n;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = xr[i];
    sum += static_cast<double>(__fmul_rn(v, v));
  }
  sum = warp_sum_d(sum);
  if (threadIdx.x % kWarpSize == 0) partial[threadIdx.x / kWarpSize] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kEltThreads / kWarpSize; ++w) total += partial[w];
    const float mean = static_cast<float>(total / static_cast<double>(n));
    scale_sh = 1.0f / sqrtf(__fadd_rn(mean, eps));
  }
  __syncthreads();
  const float scale = scale_sh;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    yr[i] = __fmul_rn(__fmul_rn(xr[i], scale), weight[i]);
  }
}

// One block per row. Angles as engine/cpu/ops.cpp builds them: theta_0 =
// pos, theta_{i+1} = theta_i * theta_scale in float (a sequential chain,
// done by one thread: head_dim / 2 multiplications).
__global__ void rope_norm_kernel(float* x, int64_t n_heads, int64_t head_dim,
                                 const int32_t* __restrict__ positions, float theta_scale) {
  extern __shared__ float tab[];  // cos[n_pairs], sin[n_pairs]
  const int64_t n_pairs = head_dim / 2;
  float* cs = tab;
  float* sn = tab + n_pairs;
  if (threadIdx.x == 0) {
    float theta = static_cast<float>(positions[blockIdx.x]);
    for (int64_t i = 0; i < n_pairs; ++i) {
      cs[i] = theta;
      theta = __fmul_rn(theta, theta_scale);
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n_pairs; i += blockDim.x) {
    const float theta = cs[i];
    float s, c;
    sincosf(theta, &s, &c);
    cs[i] = c;
    sn[i] = s;
  }
  __syncthreads();
  float* row = x + static_cast<int64_t>(blockIdx.x) * n_heads * head_dim;
  for (int64_t p = threadIdx.x; p < n_heads * n_pairs; p += blockDim.x) {
    const int64_t h = p / n_pairs, i = p % n_pairs;
    float* v = row + h * head_dim + 2 * i;
    const float x0 = v[0], x1 = v[1], c = cs[i], s = sn[i];
    v[0] = __fadd_rn(__fmul_rn(x0, c), __fmul_rn(x1, -s));
    v[1] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
  }
}

__global__ void swiglu_kernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), up[i]);
  }
}

// Copies one page per block; 16-byte moves when both ends allow them.
__device__ void copy_page(const char* __restrict__ src, char* __restrict__ dst, int64_t bytes) {
  const bool vec = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                     static_cast<uintptr_t>(bytes)) &
                    15u) == 0;
  if (vec) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
  }
}

__global__ void gather_pages_kernel(const void* const* pages, int64_t page_bytes, char* staging) {
  const int64_t i = blockIdx.x;
  copy_page(static_cast<const char*>(pages[i]), staging + i * page_bytes, page_bytes);
}

__global__ void scatter_pages_kernel(const char* staging, int64_t page_bytes, void* const* pages) {
  const int64_t i = blockIdx.x;
  copy_page(staging + i * page_bytes, static_cast<char*>(pages[i]), page_bytes);
}

}  // namespace

cudaError_t rms_norm(const float* x, const float* weight, float* out, int64_t n_rows, int64_t n,
                     float eps, cudaStream_t stream) {
  rms_norm_kernel<<<static_cast<unsigned>(n_rows), kEltThreads, 0, stream>>>(x, weight, out, n,
                                                                             eps);
  return cudaGetLastError();
}

cudaError_t rope_norm(float* x, int64_t n_rows, int64_t n_heads, int64_t head_dim,
                      const int32_t* positions, float theta_scale, cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(head_dim / 2) * 2 * sizeof(float);
  rope_norm_kernel<<<static_cast<unsigned>(n_rows), 128, shared, stream>>>(x, n_heads, head_dim,
                                                                           positions, theta_scale);
  return cudaGetLastError();
}

cudaError_t swiglu(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream) {
  int64_t grid = (n + kEltThreads - 1) / kEltThreads;
  if (grid > 65535) grid = 65535;  // grid-stride beyond
  swiglu_kernel<<<static_cast<unsigned>(grid), kEltThreads, 0, stream>>>(gate, up, out, n);
  return cudaGetLastError();
}

cudaError_t gather_pages(const void* const* pages, int64_t n_pages, int64_t page_bytes,
                         void* staging, cudaStream_t stream) {
  if (n_pages == 0) return cudaSuccess;
  gather_pages_kernel<<<static_cast<unsigned>(n_pages), kCopyThreads, 0, stream>>>(
      pages, page_bytes, static_cast<char*>(staging));
  return cudaGetLastError();
}

cudaError_t scatter_pages(const void* staging, int64_t n_pages, int64_t page_bytes,
                          void* const* pages, cudaStream_t stream) {
  if (n_pages == 0) return cudaSuccess;
  scatter_pages_kernel<<<static_cast<unsigned>(n_pages), kCopyThreads, 0, stream>>>(
      static_cast<const char*>(staging), page_bytes, pages);
  return cudaGetLastError();
}

}  // namespace kvgate::engine::cuda::kernels
