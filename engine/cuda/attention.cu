// Decode attention over the compressed layout (kvstore/attention.h on the
// GPU): for each task (one KV head of one layer of one sequence), the
// group's query heads attend to one softmax over the proximal rows
// (own-layer K, scored with q) and the distant rows (base-layer K, scored
// with q_base), values from this layer's V rows.
//
// Pass 1, grid (n_splits, n_tasks): block (split, task) runs an online
// softmax over its chunk of the task's rows (proximal first, then distant),
// each warp over every kAttnWarps-th row, then merges its warps by
// log-sum-exp into one partial (max, sum, acc) per query head.
// Pass 2, grid (n_tasks * group): merges a task's partials by log-sum-exp
// and normalizes. Queries are rounded to fp16 first (as the CPU does), so
// each q . k product is exact in fp32.
#include <cuda_fp16.h>

#include <cmath>

#include "engine/cuda/kernels.h"
#include "engine/cuda/warp_reduce.cuh"

namespace kvgate::engine::cuda::kernels {
namespace {

__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

__global__ void __launch_bounds__(kAttnWarps* kWarpSize)
    attn_split_kernel(const AttnTask* __restrict__ tasks, int group, int head_dim, int page_tokens,
                      int n_splits, int rows_per_split, float scale, float* __restrict__ partials) {
  extern __shared__ float sh[];
  const int gd = group * head_dim;
  const int stride = head_dim + 2;
  float* q_sh = sh;              // [2][group][head_dim]: q, then q_base (fp16-rounded)
  float* warp_sh = sh + 2 * gd;  // [kAttnWarps][group][stride]
  const int split = blockIdx.x;
  const int task = blockIdx.y;
  const AttnTask t = tasks[task];
  const int total = t.near_tokens + t.far_tokens;
  const int r0 = split * rows_per_split;
  const int r1 = min(total, r0 + rows_per_split);
  float* out = partials + (static_cast<int64_t>(task) * n_splits + split) * group * stride;

  for (int i = threadIdx.x; i < gd; i += blockDim.x) {
    q_sh[i] = __half2float(__float2half_rn(t.q[i]));
    q_sh[gd + i] = __half2float(__float2half_rn(t.q_base[i]));
  }
  __syncthreads();

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  float m[kAttnMaxGroup], l[kAttnMaxGroup], acc[kAttnMaxGroup][kAttnMaxPerLane];
#pragma unroll
  for (int g = 0; g < kAttnMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < kAttnMaxPerLane; ++i) acc[g][i] = 0.0f;
  }

  for (int r = r0 + warp; r < r1; r += kAttnWarps) {
    const bool near = r < t.near_tokens;
    const int rr = near ? r : r - t.near_tokens;
    const int page = rr / page_tokens;
    const int64_t off = static_cast<int64_t>(rr % page_tokens) * head_dim;
    const uint16_t* k = (near ? t.near_k : t.far_k)[page] + off;
    const uint16_t* v = (near ? t.near_v : t.far_v)[page] + off;
    const float* q = near ? q_sh : q_sh + gd;
    float kr[kAttnMaxPerLane], vr[kAttnMaxPerLane];
#pragma unroll
    for (int i = 0; i < kAttnMaxPerLane; ++i) {
      const int e = lane + i * kWarpSize;
      const bool in = e < head_dim;
      kr[i] = in ? half_bits_to_float(k[e]) : 0.0f;
      vr[i] = in ? half_bits_to_float(v[e]) : 0.0f;
    }
#pragma unroll
    for (int g = 0; g < kAttnMaxGroup; ++g) {
      if (g < group) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kAttnMaxPerLane; ++i) {
          const int e = lane + i * kWarpSize;
          if (e < head_dim) dot = fmaf(kr[i], q[g * head_dim + e], dot);
        }
        const float score = warp_sum(dot) * scale;
        const float m_new = fmaxf(m[g], score);
        const float rescale = expf(m[g] - m_new);  // 0 for an empty state (m = -inf)
        const float p = expf(score - m_new);
        l[g] = l[g] * rescale + p;
#pragma unroll
        for (int i = 0; i < kAttnMaxPerLane; ++i) acc[g][i] = fmaf(p, vr[i], acc[g][i] * rescale);
        m[g] = m_new;
      }
    }
  }

  // Each warp's state to shared memory, then one partial per head.
#pragma unroll
  for (int g = 0; g < kAttnMaxGroup; ++g) {
    if (g < group) {
      float* ws = warp_sh + (warp * group + g) * stride;
      if (lane == 0) {
        ws[0] = m[g];
        ws[1] = l[g];
      }
#pragma unroll
      for (int i = 0; i < kAttnMaxPerLane; ++i) {
        const int e = lane + i * kWarpSize;
        if (e < head_dim) ws[2 + e] = acc[g][i];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * stride; idx += blockDim.x) {
    const int g = idx / stride, e = idx % stride;
    float mx = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) {
      const float* ws = warp_sh + (w * group + g) * stride;
      if (ws[1] > 0.0f) mx = fmaxf(mx, ws[0]);
    }
    float val = 0.0f;
    if (e == 0) {
      val = mx;
    } else {
      for (int w = 0; w < kAttnWarps; ++w) {
        const float* ws = warp_sh + (w * group + g) * stride;
        if (ws[1] > 0.0f) val = fmaf(ws[e], expf(ws[0] - mx), val);
      }
    }
    out[g * stride + e] = val;
  }
}

__global__ void attn_merge_kernel(const AttnTask* __restrict__ tasks, int group, int head_dim,
                                  int n_splits, int rows_per_split,
                                  const float* __restrict__ partials) {
  __shared__ float factor[kAttnMaxSplits];
  __shared__ float inv_sum;
  const int task = blockIdx.x / group;
  const int g = blockIdx.x % group;
  const AttnTask t = tasks[task];
  const int total = t.near_tokens + t.far_tokens;
  const int n_valid = min(n_splits, (total + rows_per_split - 1) / rows_per_split);
  const int stride = head_dim + 2;
  const float* base = partials + (static_cast<int64_t>(task) * n_splits * group + g) * stride;
  const int64_t split_stride = static_cast<int64_t>(group) * stride;
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int s = 0; s < n_valid; ++s) {
      const float* p = base + s * split_stride;
      if (p[1] > 0.0f) mx = fmaxf(mx, p[0]);
    }
    float sum = 0.0f;
    for (int s = 0; s < n_valid; ++s) {
      const float* p = base + s * split_stride;
      const float f = p[1] > 0.0f ? expf(p[0] - mx) : 0.0f;
      factor[s] = f;
      sum = fmaf(p[1], f, sum);
    }
    // A task with no row (not a state the cache produces) yields zeros.
    inv_sum = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < n_valid; ++s) a = fmaf(base[s * split_stride + 2 + e], factor[s], a);
    t.out[g * head_dim + e] = a * inv_sum;
  }
}

}  // namespace

cudaError_t decode_attention(const AttnTask* tasks, int64_t n_tasks, int64_t group,
                             int64_t head_dim, int64_t page_tokens, int64_t n_splits,
                             int64_t rows_per_split, float scale, float* partials,
                             size_t shared_bytes, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n_splits), static_cast<unsigned>(n_tasks));
  attn_split_kernel<<<grid, kAttnWarps * kWarpSize, shared_bytes, stream>>>(
      tasks, static_cast<int>(group), static_cast<int>(head_dim), static_cast<int>(page_tokens),
      static_cast<int>(n_splits), static_cast<int>(rows_per_split), scale, partials);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  attn_merge_kernel<<<static_cast<unsigned>(n_tasks * group), kAttnMergeThreads, 0, stream>>>(
      tasks, static_cast<int>(group), static_cast<int>(head_dim), static_cast<int>(n_splits),
      static_cast<int>(rows_per_split), partials);
  return cudaGetLastError();
}

}  // namespace kvgate::engine::cuda::kernels
