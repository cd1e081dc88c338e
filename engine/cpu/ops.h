// Elementwise and vector ops of the CPU backend, float32, dispatched by ISA
// (`isa` is lowered to what the CPU supports). Called per token / per head
// from the engine loop; single-threaded, no allocation, no failure path
// (n >= 0 and valid pointers are the caller's preconditions).
#pragma once

#include <cstdint>

#include "engine/cpu/isa.h"
#include "engine/ggml_types.h"

namespace kvgate::engine::cpu {

// out = x / sqrt(mean(x^2) + eps) * weight. out may alias x.
void rms_norm(const float* x, const float* weight, float* out, int64_t n, float eps, Isa isa);

// llama's "normal" RoPE in place on n_heads vectors of head_dim (even)
// floats: pair (x[2i], x[2i+1]) is rotated by theta_i = pos * base^(-2i/d).
// theta_i is built as llama.cpp builds it (theta_0 = pos, then repeated
// multiplication by base^(-2/d) in float) so results match it closely.
void rope_norm(float* x, int64_t n_heads, int64_t head_dim, int64_t pos, float freq_base, Isa isa);

// out = silu(gate) * up = gate / (1 + e^-gate) * up. out may alias either.
void swiglu(const float* gate, const float* up, float* out, int64_t n, Isa isa);

// x = softmax(x), subtracting max(x) first; n >= 1.
void softmax_inplace(float* x, int64_t n, Isa isa);

float dot_f32(const float* a, const float* b, int64_t n, Isa isa);

// q · K row, the K cache being fp16.
float dot_f16_f32(const fp16_t* a, const float* b, int64_t n, Isa isa);

// y += alpha * x (attention weights times fp16 V rows).
void axpy_f16(float alpha, const fp16_t* x, float* y, int64_t n, Isa isa);

// Round to nearest even; same bits as fp32_to_fp16().
void convert_f32_to_f16(const float* src, fp16_t* dst, int64_t n, Isa isa);

// y += x.
void add_inplace(float* y, const float* x, int64_t n, Isa isa);

}  // namespace kvgate::engine::cpu
