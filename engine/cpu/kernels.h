// Internal to engine/cpu: the per-ISA kernel tables behind matmul.h/ops.h.
//
// Each kernels_<isa>*.cpp file is compiled with its own -m flags and exports
// only a constant-initialized table of function pointers (no code runs at
// load time), so nothing ISA-specific executes unless isa.cpp said the CPU
// has it. Those files must not use inline functions or templates with
// external linkage from shared headers (the linker could keep their
// AVX-512 copy for baseline callers): they keep their helpers in an
// anonymous namespace and call only out-of-line baseline functions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "engine/cpu/isa.h"
#include "engine/ggml_types.h"

namespace kvgate::engine::cpu::detail {

// Rows of the weight panel the AVX-512 kernel packs (one zmm of int32 lanes).
inline constexpr int kPanelRows = 16;

// Activations quantized to 8 bits per block of 32 (llama.cpp's Q8_0/Q8_1
// math), kept as planes so kernels broadcast straight from them.
struct QuantizedActs {
  const int8_t* qs;     // [n_tokens][k]
  const float* d;       // [n_tokens][k/32] fp16-rounded scale, as float
  const float* s;       // [n_tokens][k/32] Q8_1's s = fp16(d*sum(q)), as float
  const int32_t* corr;  // [n_tokens][k/32] -offset*sum(q): offset 8 (Q4_0) or 128 (Q8_0)
  int64_t k;
};

// y[t*ldy + r] = W[r] · x[t] for the row range a kernel call is given.
struct QuantMatmulArgs {
  GgmlType type;  // kQ4_0, kQ4_1 or kQ8_0
  const uint8_t* w;
  int64_t row_bytes;
  int64_t rows;
  QuantizedActs acts;
  int64_t n_tokens;
  float* y;
  int64_t ldy;
};

struct FloatMatmulArgs {
  GgmlType type;  // kF32, kF16 or kBF16
  const uint8_t* w;
  int64_t row_bytes;
  int64_t rows;
  int64_t k;
  const float* x;  // [n_tokens][k], already rounded to the weight's precision
  int64_t n_tokens;
  float* y;
  int64_t ldy;
};

struct KernelTable {
  Isa isa;

  // One token row of k (multiple of 32) floats into the QuantizedActs planes
  // at the given pointers; `offset` is 8 (Q4_0), 128 (Q8_0) or 0.
  void (*quantize_acts)(const float* x, int64_t k, int8_t* qs, float* d, float* s, int32_t* corr,
                        int32_t offset);
  // Per-thread scratch qmatmul needs for rows of k elements.
  size_t (*qmatmul_scratch_bytes)(int64_t k);
  // Rows [r0, r1) for all tokens; r0 is a multiple of kPanelRows.
  void (*qmatmul)(const QuantMatmulArgs& a, int64_t r0, int64_t r1, void* scratch);
  void (*fmatmul)(const FloatMatmulArgs& a, int64_t r0, int64_t r1);
  // out[i] = x[i] rounded to the nearest fp16 value (F16 weights' activations).
  void (*round_to_f16)(const float* x, float* out, int64_t n);

  void (*rms_norm)(const float* x, const float* weight, float* out, int64_t n, float eps);
  // For each head h and j in [j0, j1): x' = x[j]*c[j] + x[j^1]*s[j], where
  // c/s hold cos duplicated per pair and sin signed (-sin, +sin) per pair,
  // indexed from j0.
  void (*rope_apply)(float* x, int64_t n_heads, int64_t head_dim, const float* c, const float* s,
                     int64_t j0, int64_t j1);
  void (*swiglu)(const float* gate, const float* up, float* out, int64_t n);
  void (*softmax_inplace)(float* x, int64_t n);
  float (*dot_f32)(const float* a, const float* b, int64_t n);
  float (*dot_f16_f32)(const fp16_t* a, const float* b, int64_t n);
  void (*axpy_f16)(float alpha, const fp16_t* x, float* y, int64_t n);
  void (*convert_f32_to_f16)(const float* src, fp16_t* dst, int64_t n);
  void (*add_inplace)(float* y, const float* x, int64_t n);
};

extern const KernelTable kScalarKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;

// The table for `isa`, lowered to what the CPU supports.
const KernelTable& kernels_for(Isa isa);

// AVX-512 ops live in kernels_avx512_ops.cpp; the table is in kernels_avx512.cpp.
namespace avx512 {
void rms_norm(const float* x, const float* weight, float* out, int64_t n, float eps);
void rope_apply(float* x, int64_t n_heads, int64_t head_dim, const float* c, const float* s,
                int64_t j0, int64_t j1);
void swiglu(const float* gate, const float* up, float* out, int64_t n);
void softmax_inplace(float* x, int64_t n);
float dot_f32(const float* a, const float* b, int64_t n);
float dot_f16_f32(const fp16_t* a, const float* b, int64_t n);
void axpy_f16(float alpha, const fp16_t* x, float* y, int64_t n);
void convert_f32_to_f16(const float* src, fp16_t* dst, int64_t n);
void add_inplace(float* y, const float* x, int64_t n);
void round_to_f16(const float* x, float* out, int64_t n);
void fmatmul(const FloatMatmulArgs& a, int64_t r0, int64_t r1);
// Row-wise quantized matmul for n_tokens <= decode_max_tokens() (decode),
// in kernels_avx512_decode.cpp.
int64_t decode_max_tokens();
size_t decode_scratch_bytes(int64_t k);
void qmatmul_decode(const QuantMatmulArgs& a, int64_t r0, int64_t r1, void* scratch);
}  // namespace avx512

}  // namespace kvgate::engine::cpu::detail
