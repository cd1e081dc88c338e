// The arithmetic of one gate evaluation (engine/gate.h), shared by the
// serving runtime (engine/gate_runtime.cpp) and calibration
// (engine/calibrate.cpp), so that what is trained is what runs.
//
// Pure functions; thread-safe; no allocation except `scratch` growth.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
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

// fp16 -> fp32 by table (the gate reads short fp16 rows, where a call per
// element would dominate); built once, 256 KiB.
inline const float* fp16_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = fp16_to_fp32(static_cast<fp16_t>(i));
    return t;
  }();
  return table.data();
}

// Logit of the attention kind: query q (D floats, from gate_project) over
// n context rows, row(c) giving K (D) then V (D) as fp16 (the cache's rows)
// or as float (already rounded through fp16, the prefill's copy). Per gate
// head a: softmax over the rows of q_a·k_a / sqrt(d'), o_a = Σ p v_a;
// logit = Σ_a wo_a·o_a + bias. One pass with an online softmax (one exp
// per row and head). n >= 1.
template <typename RowFn>
float gate_attention_logit(const GateModel& gate, int64_t slot, const float* q, int64_t n,
                           RowFn row, std::vector<float>& scratch) {
  const GateSlot& w = gate.slots[slot];
  const int64_t heads = gate.n_gate_heads;
  const int64_t hd = gate.gate_head_dim;
  const int64_t dim = heads * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  if (static_cast<int64_t>(scratch.size()) < 3 * dim) scratch.resize(static_cast<size_t>(3 * dim));
  float* o = scratch.data();  // D accumulators
  float* kv = o + dim;        // 2D, one row in fp32
  float maxs[64];             // heads <= 64 (GateModel::validate)
  float sums[64];
  std::fill(maxs, maxs + heads, -INFINITY);
  std::fill(sums, sums + heads, 0.0f);
  std::fill(o, o + dim, 0.0f);
  const float* lut = fp16_table();
  using Row = decltype(row(int64_t{0}));
  for (int64_t c = 0; c < n; ++c) {
    const float* r;
    if constexpr (std::is_same_v<Row, const float*>) {
      r = row(c);
    } else {
      const fp16_t* h = row(c);
      for (int64_t i = 0; i < 2 * dim; ++i) kv[i] = lut[h[i]];
      r = kv;
    }
    for (int64_t a = 0; a < heads; ++a) {
      const float* ka = r + a * hd;
      const float* va = r + dim + a * hd;
      float sc = 0.0f;
      for (int64_t i = 0; i < hd; ++i) sc += q[a * hd + i] * ka[i];
      sc *= scale;
      float* oa = o + a * hd;
      if (sc > maxs[a]) {
        const float f = std::exp(maxs[a] - sc);  // 0 on the first row
        sums[a] *= f;
        for (int64_t i = 0; i < hd; ++i) oa[i] *= f;
        maxs[a] = sc;
      }
      const float p = std::exp(sc - maxs[a]);
      sums[a] += p;
      for (int64_t i = 0; i < hd; ++i) oa[i] += p * va[i];
    }
  }
  float logit = w.bias;
  for (int64_t a = 0; a < heads; ++a) {
    logit += dot_f32(w.wo.data() + a * hd, o + a * hd, hd) / sums[a];
  }
  return logit;
}

}  // namespace kvgate::engine
