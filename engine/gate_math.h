// The arithmetic of one gate evaluation (engine/gate.h), shared by the
// serving runtime (engine/gate_runtime.cpp) and calibration
// (engine/calibrate.cpp), so that what is trained is what runs.
//
// Pure functions; thread-safe; no allocation except `scratch` growth.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "engine/cpu/isa.h"
#include "engine/cpu/ops.h"
#include "engine/gate.h"
#include "engine/ggml_types.h"

namespace kvgate::engine {

// Largest gate width D = n_gate_heads * gate_head_dim the runtime takes
// (stack buffers); GateModel::validate() bounds each factor by 64.
inline constexpr int64_t kMaxGateDim = 64 * 64;

inline float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// attention: out[0..3D) = (Wq x, Wk x, Wv x); linear: out[0] = w·x + bias.
// The n_embd-long dot products use the SIMD kernels of `isa`.
inline void gate_project(const GateModel& gate, int64_t slot, const float* x, float* out,
                         cpu::Isa isa) {
  const GateSlot& w = gate.slots[slot];
  const int64_t e = gate.n_embd;
  if (gate.kind == GateKind::kLinear) {
    out[0] = cpu::dot_f32(w.wo.data(), x, e, isa) + w.bias;
    return;
  }
  const int64_t dim = gate.gate_dim();
  for (int64_t i = 0; i < dim; ++i) out[i] = cpu::dot_f32(w.wq.data() + i * e, x, e, isa);
  for (int64_t i = 0; i < dim; ++i) out[dim + i] = cpu::dot_f32(w.wk.data() + i * e, x, e, isa);
  for (int64_t i = 0; i < dim; ++i) out[2 * dim + i] = cpu::dot_f32(w.wv.data() + i * e, x, e, isa);
}

// Logit of the attention kind: query q (D floats, from gate_project) over
// n context rows, row(c) giving fp16 K (D) then V (D). Per gate head a:
// softmax over the rows of q_a·k_a / sqrt(d'), o_a = Σ p v_a; logit =
// Σ_a wo_a·o_a + bias. n >= 1.
template <typename RowFn>
float gate_attention_logit(const GateModel& gate, int64_t slot, const float* q, int64_t n,
                           RowFn row, std::vector<float>& scratch) {
  const GateSlot& w = gate.slots[slot];
  const int64_t heads = gate.n_gate_heads;
  const int64_t hd = gate.gate_head_dim;
  const int64_t dim = heads * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  if (static_cast<int64_t>(scratch.size()) < n * heads + 2 * dim) {
    scratch.resize(static_cast<size_t>(n * heads + 2 * dim));
  }
  float* scores = scratch.data();  // [head][n]
  float* o = scores + n * heads;   // D
  float* kv = o + dim;             // D, one row's fp32 K or V
  float maxs[64];  // heads <= 64 (GateModel::validate)
  float sums[64];
  std::fill(maxs, maxs + heads, -INFINITY);
  std::fill(sums, sums + heads, 0.0f);
  for (int64_t c = 0; c < n; ++c) {
    const fp16_t* r = row(c);
    for (int64_t i = 0; i < dim; ++i) kv[i] = fp16_to_fp32(r[i]);
    for (int64_t a = 0; a < heads; ++a) {
      const float s = dot_f32(q + a * hd, kv + a * hd, hd) * scale;
      scores[a * n + c] = s;
      maxs[a] = std::max(maxs[a], s);
    }
  }
  std::fill(o, o + dim, 0.0f);
  for (int64_t c = 0; c < n; ++c) {
    const fp16_t* r = row(c) + dim;
    for (int64_t a = 0; a < heads; ++a) {
      const float p = std::exp(scores[a * n + c] - maxs[a]);
      sums[a] += p;
      for (int64_t i = 0; i < hd; ++i) o[a * hd + i] += p * fp16_to_fp32(r[a * hd + i]);
    }
  }
  float logit = w.bias;
  for (int64_t a = 0; a < heads; ++a) {
    logit += dot_f32(w.wo.data() + a * hd, o + a * hd, hd) / sums[a];
  }
  return logit;
}

}  // namespace kvgate::engine
