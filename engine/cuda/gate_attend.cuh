// One gate head's share of the window-context Attention-Gate logit, shared
// by gate.cu's prefill kernel (rows from the float projections, rounded
// through fp16) and compressed_ops.cu's decode kernel (rows from the
// cache's fp16 gate rows): engine/gate_math.h's gate_attention_logit for
// head a — an online softmax of q_a·k_a / sqrt(d') over the context rows
// in the caller's order, o_a = Σ p v_a — returning (wo_a · o_a) / sum_a.
// rows(j) gives row j's K and V pointers for this head; load(x) reads one
// element as float. nvcc only.
#pragma once

#include "engine/cuda/kernel_params.h"

namespace kvgate::engine::cuda::kernels {

template <typename Rows, typename Load>
__device__ __forceinline__ float gate_head_contribution(const float* qa, int head_dim,
                                                        int64_t n_rows, const float* woa,
                                                        Rows rows, Load load) {
  const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  float o[kGateMaxHeadDim];
  for (int i = 0; i < head_dim; ++i) o[i] = 0.0f;
  float mx = -INFINITY;
  float sum = 0.0f;
  for (int64_t j = 0; j < n_rows; ++j) {
    const auto r = rows(j);
    float sc = 0.0f;
    for (int i = 0; i < head_dim; ++i) sc += qa[i] * load(r.k[i]);
    sc *= scale;
    if (sc > mx) {
      const float f = expf(mx - sc);  // 0 on the first row
      sum *= f;
      for (int i = 0; i < head_dim; ++i) o[i] *= f;
      mx = sc;
    }
    const float p = expf(sc - mx);
    sum += p;
    for (int i = 0; i < head_dim; ++i) o[i] += p * load(r.v[i]);
  }
  float d = 0.0f;
  for (int i = 0; i < head_dim; ++i) d += woa[i] * o[i];
  return d / sum;
}

// Row pointers of one head's K and V.
template <typename T>
struct GateRowPtrs {
  const T* k;
  const T* v;
};

}  // namespace kvgate::engine::cuda::kernels
