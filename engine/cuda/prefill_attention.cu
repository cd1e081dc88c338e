// Causal prefill attention over a dense fp16 K/V cache, flash-attention
// style: a block per (query tile, query head), K/V tiles streamed through
// shared memory, fp32 accumulation, nothing materialized per (query, key).
//
// Numerics follow CpuForward::attention (engine/model.cpp) rather than a
// single-pass online softmax, because the CPU normalizes the probabilities
// and rounds them to fp16 before they meet V (as llama.cpp does): a
// probability can only be rounded once its denominator is known. So each
// block makes two passes over its keys:
//   pass 1: scores, running max m and denominator l (online, per query);
//   pass 2: the same scores again (bit-identical), p = fp16(exp(s - m) / l)
//           rounded exactly as the CPU rounds it, acc += p * v.
// Scores are the CPU scalar kernel's: queries rounded to fp16, products of
// two fp16 values (exact in fp32) summed in head-dim order, then * scale.
// The fp16 p times fp16 v products are exact too and are summed in key
// order, as the CPU's axpy loop does. Left as differences: the device's
// expf (<= 2 ulp) and l summed with online rescaling instead of after the
// max (a few ulp), which can move a p across an fp16 rounding boundary.
// The price is a third (Q.K) product per key; a tensor-core kernel with a
// single pass would give up the CPU's rounding of p.
#include <cuda_fp16.h>

#include <cmath>

#include "engine/cuda/kernels.h"
#include "engine/cuda/warp_reduce.cuh"

namespace kvgate::engine::cuda::kernels {
namespace {

// Rows [k0, k0 + kPrefillKeyTile) of one KV head's slice to shared memory
// as pairs of halves (row stride `row_words`); rows at or past n_keys are
// zero, so masked keys never bring a NaN from unwritten cache rows.
__device__ __forceinline__ void load_tile(uint32_t* dst, const uint32_t* __restrict__ src, int k0,
                                          int n_keys, int d2, int row_words) {
  for (int idx = threadIdx.x; idx < kPrefillKeyTile * d2; idx += blockDim.x) {
    const int j = idx / d2, p = idx % d2;
    const int key = k0 + j;
    dst[j * row_words + p] = key < n_keys ? src[static_cast<int64_t>(key) * d2 + p] : 0u;
  }
}

// Lane j's key (row j of the K tile) against the warp's kQpw queries:
// products in head-dim order with fmaf (exact products, so the CPU's
// multiply-then-add rounding), then * scale.
template <int kQpw>
__device__ __forceinline__ void tile_scores(float (&s)[kQpw], const uint32_t* krow,
                                            const float* q_rows, int d, float scale) {
#pragma unroll
  for (int i = 0; i < kQpw; ++i) s[i] = 0.0f;
  const int d2 = d / 2;
  for (int p = 0; p < d2; ++p) {
    const float2 kf = __half22float2(*reinterpret_cast<const __half2*>(krow + p));
#pragma unroll
    for (int i = 0; i < kQpw; ++i) {
      const float2 qf = *reinterpret_cast<const float2*>(q_rows + i * d + 2 * p);
      s[i] = fmaf(kf.x, qf.x, s[i]);
      s[i] = fmaf(kf.y, qf.y, s[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kQpw; ++i) s[i] *= scale;
}

// kPerLane: head-dim elements per lane (head_dim <= 32 * kPerLane);
// kQpw: queries per warp.
template <int kPerLane, int kQpw>
__global__ void __launch_bounds__(kPrefillWarps* kWarpSize)
    prefill_attn_kernel(const float* __restrict__ q, int n, int n_heads, int d,
                        const uint16_t* __restrict__ k_cache, const uint16_t* __restrict__ v_cache,
                        int64_t kv_head_stride, int group, int past, float scale,
                        float* __restrict__ out) {
  constexpr int kQTile = kPrefillWarps * kQpw;
  extern __shared__ float sh[];
  const int d2 = d / 2;
  const int k_row_words = d2 + 1;  // head_dim + 2 halves: lane j's row starts in bank j
  float* q_sh = sh;                // [kQTile][d], fp16-rounded
  uint32_t* k_sh = reinterpret_cast<uint32_t*>(q_sh + kQTile * d);  // [tile][d2 + 1]
  uint32_t* v_sh = k_sh + kPrefillKeyTile * k_row_words;            // [tile][d2]
  const uint16_t* v_half = reinterpret_cast<const uint16_t*>(v_sh);

  const int head = blockIdx.y;
  const int kvh = head / group;
  const int q0 = blockIdx.x * kQTile;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t q_stride = static_cast<int64_t>(n_heads) * d;
  const auto* kh = reinterpret_cast<const uint32_t*>(k_cache + kvh * kv_head_stride);
  const auto* vh = reinterpret_cast<const uint32_t*>(v_cache + kvh * kv_head_stride);

  for (int i = threadIdx.x; i < kQTile * d; i += blockDim.x) {
    const int r = i / d, e = i % d;
    q_sh[i] =
        q0 + r < n ? __half2float(__float2half_rn(q[(q0 + r) * q_stride + head * d + e])) : 0.0f;
  }
  // The warp's queries: tile rows warp * kQpw + i, at absolute positions
  // past + q0 + row; each sees keys 0..its position (-1: past the chunk).
  const float* my_q = q_sh + warp * kQpw * d;
  int last_key[kQpw];
  int warp_last = -1;
#pragma unroll
  for (int i = 0; i < kQpw; ++i) {
    const int qi = q0 + warp * kQpw + i;
    last_key[i] = qi < n ? past + qi : -1;
    warp_last = max(warp_last, last_key[i]);
  }
  const int n_keys = past + min(n, q0 + kQTile);  // keys any query of the block sees
  const int n_tiles = (n_keys + kPrefillKeyTile - 1) / kPrefillKeyTile;

  // Pass 1: max and denominator.
  float m[kQpw], l[kQpw];
#pragma unroll
  for (int i = 0; i < kQpw; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kPrefillKeyTile;
    __syncthreads();  // the previous tile is consumed (at t == 0: q_sh is written)
    load_tile(k_sh, kh, k0, n_keys, d2, k_row_words);
    __syncthreads();
    if (k0 > warp_last) continue;  // warp-uniform: no key of this tile for any of its queries
    float s[kQpw];
    tile_scores<kQpw>(s, k_sh + lane * k_row_words, my_q, d, scale);
#pragma unroll
    for (int i = 0; i < kQpw; ++i) {
      if (k0 > last_key[i]) continue;  // warp-uniform
      const bool valid = k0 + lane <= last_key[i];
      const float sv = valid ? s[i] : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(sv));  // finite: key k0 is valid
      const float p = valid ? expf(sv - m_new) : 0.0f;
      l[i] = l[i] * expf(m[i] - m_new) + warp_sum(p);  // expf(-inf) = 0 on the first tile
      m[i] = m_new;
    }
  }
  float inv[kQpw];
#pragma unroll
  for (int i = 0; i < kQpw; ++i) inv[i] = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;

  // Pass 2: normalized fp16 probabilities against V.
  float acc[kQpw][kPerLane];
#pragma unroll
  for (int i = 0; i < kQpw; ++i) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) acc[i][c] = 0.0f;
  }
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kPrefillKeyTile;
    __syncthreads();
    load_tile(k_sh, kh, k0, n_keys, d2, k_row_words);
    load_tile(v_sh, vh, k0, n_keys, d2, d2);
    __syncthreads();
    if (k0 > warp_last) continue;
    float s[kQpw];
    tile_scores<kQpw>(s, k_sh + lane * k_row_words, my_q, d, scale);
    float p[kQpw];
#pragma unroll
    for (int i = 0; i < kQpw; ++i) {
      const bool valid = k0 + lane <= last_key[i];
      // As the CPU: exp(s - max) * (1 / sum), then rounded to fp16.
      p[i] = valid ? __half2float(__float2half_rn(expf(s[i] - m[i]) * inv[i])) : 0.0f;
    }
    const int j_end = min(kPrefillKeyTile, warp_last + 1 - k0);
    for (int j = 0; j < j_end; ++j) {
      float pj[kQpw];
#pragma unroll
      for (int i = 0; i < kQpw; ++i) pj[i] = __shfl_sync(0xffffffffu, p[i], j);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int e = lane + c * kWarpSize;
        if (e < d) {
          const float v = __half2float(__ushort_as_half(v_half[j * d + e]));
#pragma unroll
          for (int i = 0; i < kQpw; ++i) acc[i][c] = fmaf(pj[i], v, acc[i][c]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kQpw; ++i) {
    if (last_key[i] < 0) continue;
    float* o = out + static_cast<int64_t>(q0 + warp * kQpw + i) * q_stride + head * d;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int e = lane + c * kWarpSize;
      if (e < d) o[e] = acc[i][c];
    }
  }
}

template <int kPerLane, int kQpw>
cudaError_t launch(const float* q, int64_t n, int64_t n_heads, int64_t head_dim, const uint16_t* k,
                   const uint16_t* v, int64_t kv_head_stride, int64_t group, int64_t past,
                   float scale, float* out, size_t shared_bytes, cudaStream_t stream) {
  constexpr int64_t kQTile = kPrefillWarps * kQpw;
  const dim3 grid(static_cast<unsigned>((n + kQTile - 1) / kQTile), static_cast<unsigned>(n_heads));
  prefill_attn_kernel<kPerLane, kQpw><<<grid, kPrefillWarps * kWarpSize, shared_bytes, stream>>>(
      q, static_cast<int>(n), static_cast<int>(n_heads), static_cast<int>(head_dim), k, v,
      kv_head_stride, static_cast<int>(group), static_cast<int>(past), scale, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t prefill_attention(const float* q, int64_t n_queries, int64_t n_heads, int64_t head_dim,
                              const uint16_t* k_cache, const uint16_t* v_cache,
                              int64_t kv_head_stride, int64_t group, int64_t past, float scale,
                              float* out, int queries_per_warp, size_t shared_bytes,
                              cudaStream_t stream) {
  // The instantiations launch_plan.cpp's plan_prefill_attention chooses.
  if (head_dim <= 64 && queries_per_warp == 4) {
    return launch<2, 4>(q, n_queries, n_heads, head_dim, k_cache, v_cache, kv_head_stride, group,
                        past, scale, out, shared_bytes, stream);
  }
  if (head_dim <= 128 && queries_per_warp == 4) {
    return launch<4, 4>(q, n_queries, n_heads, head_dim, k_cache, v_cache, kv_head_stride, group,
                        past, scale, out, shared_bytes, stream);
  }
  if (head_dim <= kPrefillMaxHeadDim && queries_per_warp == 2) {
    return launch<8, 2>(q, n_queries, n_heads, head_dim, k_cache, v_cache, kv_head_stride, group,
                        past, scale, out, shared_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvgate::engine::cuda::kernels
