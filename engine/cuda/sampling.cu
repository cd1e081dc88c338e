// Token selection on the GPU, one thread block per row of logits.
//
// Greedy: the largest logit, lowest id on ties (engine::argmax).
// Sampling (sampling_plan.h lists how it differs from engine::Sampler):
//   1. the top_k threshold by radix select over order-preserving keys of
//      logit / temperature (4 passes of 8 bits), giving the exact softmax
//      denominator over Sampler's candidate set;
//   2. the best min(top_k, 1024) candidates gathered (threshold ties by
//      lowest id) and bitonic-sorted by (logit desc, id asc), Sampler's
//      order;
//   3. probabilities, then one thread walks top-p, min-p and the draw
//      r = u * total exactly as Sampler does (<= 1024 steps).
#include <cstdint>

#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda::kernels {
namespace {

constexpr int kWarps = kSampleThreads / kWarpSize;
constexpr uint32_t kNoId = 0x7fffffffu;

// Larger float -> larger key; NaN -> 0, below every other value (-inf is
// 0x007fffff), so NaN is never selected while a number remains.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) return 0u;
  const uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Best (value, id) of the block: value > -inf only, lowest id on ties;
// kNoId when there is none. Every thread returns the result.
__device__ uint32_t block_argmax(const float* __restrict__ x, int vocab) {
  __shared__ float s_v[kWarps];
  __shared__ uint32_t s_id[kWarps];
  float bv = -INFINITY;
  uint32_t bi = kNoId;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = x[i];
    if (v > bv) {
      bv = v;
      bi = static_cast<uint32_t>(i);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
    const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    s_v[warp] = bv;
    s_id[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
      if (s_v[w] > s_v[0] || (s_v[w] == s_v[0] && s_id[w] < s_id[0])) {
        s_v[0] = s_v[w];
        s_id[0] = s_id[w];
      }
    }
  }
  __syncthreads();
  const uint32_t r = s_id[0];
  __syncthreads();  // s_* reusable by a later call
  return r;
}

__global__ void argmax_kernel(const float* __restrict__ logits, int vocab,
                              int32_t* __restrict__ out) {
  const uint32_t id = block_argmax(logits + static_cast<int64_t>(blockIdx.x) * vocab, vocab);
  if (threadIdx.x == 0) out[blockIdx.x] = id == kNoId ? 0 : static_cast<int32_t>(id);
}

struct Select {
  uint32_t threshold;  // key of the k-th largest
  uint32_t ties;       // elements equal to threshold that belong to the top k
};

// The k-th largest key (1 <= k <= number of non-NaN values).
__device__ Select radix_select(const float* __restrict__ x, int vocab, float temp, uint32_t k,
                               uint32_t* hist) {
  __shared__ uint32_t s_prefix, s_remaining;
  uint32_t prefix = 0, mask = 0, remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint32_t key = order_key(__fdiv_rn(x[i], temp));
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t cum = 0;
      for (int dgt = 255; dgt >= 0; --dgt) {
        if (cum + hist[dgt] >= remaining) {
          s_prefix = prefix | (static_cast<uint32_t>(dgt) << shift);
          s_remaining = remaining - cum;
          break;
        }
        cum += hist[dgt];
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 0xffu << shift;
    __syncthreads();
  }
  return {prefix, remaining};
}

__device__ double block_sum(double v, double* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % kWarpSize == 0) red[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) t += red[w];
    red[0] = t;
  }
  __syncthreads();
  const double r = red[0];
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const float* __restrict__ all_logits, int vocab,
                  const SampleRow* __restrict__ rows, int32_t* __restrict__ out) {
  extern __shared__ unsigned char smem[];
  auto* cand = reinterpret_cast<unsigned long long*>(smem);               // [kSampleMaxCandidates]
  auto* prob = reinterpret_cast<float*>(cand + kSampleMaxCandidates);     // [kSampleMaxCandidates]
  auto* hist = reinterpret_cast<uint32_t*>(prob + kSampleMaxCandidates);  // [256]
  auto* red = reinterpret_cast<double*>(hist + 256);                      // [kWarps]
  __shared__ uint32_t s_count, s_taken, s_max_key, s_warp_off[kWarps];

  const SampleRow row = rows[blockIdx.x];
  const float* x = all_logits + static_cast<int64_t>(blockIdx.x) * vocab;
  if (!(row.temperature > 0.0f)) {
    const uint32_t id = block_argmax(x, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = id == kNoId ? 0 : static_cast<int32_t>(id);
    return;
  }
  const float temp = row.temperature;

  // Number of non-NaN values and the largest key.
  if (threadIdx.x == 0) {
    s_count = 0;
    s_max_key = 0;
  }
  __syncthreads();
  uint32_t n_local = 0, max_local = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const uint32_t key = order_key(__fdiv_rn(x[i], temp));
    n_local += key != 0u;
    max_local = max(max_local, key);
  }
  atomicAdd(&s_count, n_local);
  atomicMax(&s_max_key, max_local);
  __syncthreads();
  const uint32_t n_valid = s_count;
  if (n_valid == 0) {
    if (threadIdx.x == 0) out[blockIdx.x] = 0;
    return;
  }
  const float max_l = key_value(s_max_key);

  // Softmax denominator over Sampler's candidate set (top_k, or all).
  const uint32_t k_set =
      row.top_k > 0 && static_cast<uint32_t>(row.top_k) < n_valid ? row.top_k : n_valid;
  double part = 0.0;
  Select set_sel{0u, 0u};
  if (k_set == n_valid) {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float l = __fdiv_rn(x[i], temp);
      if (l == l) part += static_cast<double>(expf(l - max_l));
    }
  } else {
    set_sel = radix_select(x, vocab, temp, k_set, hist);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float l = __fdiv_rn(x[i], temp);
      if (order_key(l) > set_sel.threshold) part += static_cast<double>(expf(l - max_l));
    }
    if (threadIdx.x == 0) {
      part += static_cast<double>(set_sel.ties) *
              static_cast<double>(expf(key_value(set_sel.threshold) - max_l));
    }
  }
  const double denom = block_sum(part, red);

  // Gather the best n_cand: keys above the threshold in any order, then the
  // threshold's ties by ascending id.
  const uint32_t n_cand = k_set < kSampleMaxCandidates ? k_set : kSampleMaxCandidates;
  const Select sel =
      (n_cand == k_set && k_set != n_valid) ? set_sel : radix_select(x, vocab, temp, n_cand, hist);
  if (threadIdx.x == 0) {
    s_count = 0;
    s_taken = 0;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const uint32_t key = order_key(__fdiv_rn(x[i], temp));
    if (key > sel.threshold) {
      const uint32_t slot = atomicAdd(&s_count, 1u);
      cand[slot] = (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - i);
    }
  }
  __syncthreads();
  const uint32_t above = n_cand - sel.ties;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int base = 0; base < vocab; base += blockDim.x) {
    if (s_taken >= sel.ties) break;  // uniform: read after a barrier
    const int i = base + threadIdx.x;
    const bool tie = i < vocab && order_key(__fdiv_rn(x[i], temp)) == sel.threshold;
    const uint32_t ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) s_warp_off[warp] = __popc(ballot);
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t run = s_taken;
      for (int w = 0; w < kWarps; ++w) {
        const uint32_t c = s_warp_off[w];
        s_warp_off[w] = run;
        run += c;
      }
      s_count = run;  // taken after this chunk
    }
    __syncthreads();
    if (tie) {
      const uint32_t pos = s_warp_off[warp] + __popc(ballot & ((1u << lane) - 1u));
      if (pos < sel.ties) {
        cand[above + pos] = (static_cast<unsigned long long>(sel.threshold) << 32) |
                            (0xffffffffu - static_cast<uint32_t>(i));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) s_taken = s_count;
    __syncthreads();
  }
  for (uint32_t j = n_cand + threadIdx.x; j < kSampleMaxCandidates; j += blockDim.x) cand[j] = 0;
  __syncthreads();

  // Bitonic sort, descending: (key desc, id asc) as Sampler orders.
  for (int k = 2; k <= kSampleMaxCandidates; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < kSampleMaxCandidates; i += blockDim.x) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const unsigned long long a = cand[i], b = cand[ixj];
          const bool desc = (i & k) == 0;
          if (desc ? a < b : a > b) {
            cand[i] = b;
            cand[ixj] = a;
          }
        }
      }
      __syncthreads();
    }
  }

  for (uint32_t j = threadIdx.x; j < n_cand; j += blockDim.x) {
    const float l = key_value(static_cast<uint32_t>(cand[j] >> 32));
    prob[j] = static_cast<float>(static_cast<double>(expf(l - max_l)) / denom);
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    uint32_t n = n_cand;
    if (row.top_p < 1.0f) {
      double cum = 0.0;
      for (uint32_t j = 0; j < n_cand; ++j) {
        cum += prob[j];
        if (cum >= row.top_p) {
          n = j + 1;
          break;
        }
      }
    }
    if (row.min_p > 0.0f) {
      const float floor_p = row.min_p * prob[0];
      uint32_t keep = 1;
      while (keep < n && prob[keep] >= floor_p) ++keep;
      n = keep;
    }
    double total = 0.0;
    for (uint32_t j = 0; j < n; ++j) total += prob[j];
    double r = row.u * total;
    uint32_t pick = n - 1;
    for (uint32_t j = 0; j < n; ++j) {
      r -= prob[j];
      if (r <= 0.0) {
        pick = j;
        break;
      }
    }
    out[blockIdx.x] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(cand[pick]));
  }
}

}  // namespace

cudaError_t argmax_rows(const float* logits, int64_t n_rows, int64_t vocab, int32_t* out,
                        cudaStream_t stream) {
  argmax_kernel<<<static_cast<unsigned>(n_rows), kArgmaxThreads, 0, stream>>>(
      logits, static_cast<int>(vocab), out);
  return cudaGetLastError();
}

cudaError_t sample_rows(const float* logits, int64_t n_rows, int64_t vocab, const SampleRow* rows,
                        int32_t* out, size_t shared_bytes, cudaStream_t stream) {
  sample_kernel<<<static_cast<unsigned>(n_rows), kSampleThreads, shared_bytes, stream>>>(
      logits, static_cast<int>(vocab), rows, out);
  return cudaGetLastError();
}

}  // namespace kvgate::engine::cuda::kernels
