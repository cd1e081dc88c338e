#include "engine/cpu/ops.h"

#include <algorithm>
#include <cmath>

#include "engine/cpu/kernels.h"

namespace kvgate::engine::cpu {

using detail::kernels_for;

void rms_norm(const float* x, const float* weight, float* out, int64_t n, float eps, Isa isa) {
  kernels_for(isa).rms_norm(x, weight, out, n, eps);
}

void rope_norm(float* x, int64_t n_heads, int64_t head_dim, int64_t pos, float freq_base, Isa isa) {
  // Angles are computed once here (scalar, identical for every ISA) for a
  // chunk of pairs and applied to all heads by the kernel; chunking keeps
  // the tables on the stack for any head_dim.
  constexpr int64_t kChunkPairs = 64;
  alignas(64) float c[2 * kChunkPairs];
  alignas(64) float s[2 * kChunkPairs];
  const auto& kt = kernels_for(isa);
  const float theta_scale = std::pow(freq_base, -2.0f / static_cast<float>(head_dim));
  float theta = static_cast<float>(pos);
  const int64_t n_pairs = head_dim / 2;
  for (int64_t p0 = 0; p0 < n_pairs; p0 += kChunkPairs) {
    const int64_t np = std::min(kChunkPairs, n_pairs - p0);
    for (int64_t i = 0; i < np; ++i) {
      const float cs = std::cos(theta), sn = std::sin(theta);
      c[2 * i] = cs;
      c[2 * i + 1] = cs;
      s[2 * i] = -sn;
      s[2 * i + 1] = sn;
      theta *= theta_scale;
    }
    kt.rope_apply(x, n_heads, head_dim, c, s, 2 * p0, 2 * (p0 + np));
  }
}

void swiglu(const float* gate, const float* up, float* out, int64_t n, Isa isa) {
  kernels_for(isa).swiglu(gate, up, out, n);
}

void softmax_inplace(float* x, int64_t n, Isa isa) {
  kernels_for(isa).softmax_inplace(x, n);
}

float dot_f32(const float* a, const float* b, int64_t n, Isa isa) {
  return kernels_for(isa).dot_f32(a, b, n);
}

float dot_f16_f32(const fp16_t* a, const float* b, int64_t n, Isa isa) {
  return kernels_for(isa).dot_f16_f32(a, b, n);
}

void axpy_f16(float alpha, const fp16_t* x, float* y, int64_t n, Isa isa) {
  kernels_for(isa).axpy_f16(alpha, x, y, n);
}

void convert_f32_to_f16(const float* src, fp16_t* dst, int64_t n, Isa isa) {
  kernels_for(isa).convert_f32_to_f16(src, dst, n);
}

void add_inplace(float* y, const float* x, int64_t n, Isa isa) {
  kernels_for(isa).add_inplace(y, x, n);
}

}  // namespace kvgate::engine::cpu
