// Row-level conversions between float and the ggml storage types.
//
// These are the scalar reference implementations: the matmul kernels use
// SIMD versions of the activation quantizers that produce bit-identical
// blocks (checked by cpu_conformance_test). All functions are pure and
// thread-safe; n must be a multiple of 32 for block types (callers check
// shapes when loading a model, see check_weight() in matmul.h).
#pragma once

#include <cstdint>

#include "engine/ggml_types.h"

namespace kvgate::engine::cpu {

// Whether dequantize_row / quantize_row handle `type`.
bool dequantize_supported(GgmlType type);  // F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q8_1
bool quantize_supported(GgmlType type);    // F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q8_1

// dst[0..n) = the values stored in `src` (a row of n elements of `type`).
void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n);

// Activation quantization, as llama.cpp's x86 SIMD code does it per block of
// 32: amax = max|x|, d = amax/127 (stored as fp16), q = round-half-even(x *
// 127/amax). Q8_1 also stores s = fp16(d * sum(q)).
void quantize_row_q8_0(const float* src, BlockQ8_0* dst, int64_t n);
void quantize_row_q8_1(const float* src, BlockQ8_1* dst, int64_t n);

// Reference quantizers for weights (tests, synthetic models), same rules as
// ggml's reference ones:
//   Q4_0: d = v/-8 where v is the element of largest magnitude (sign kept),
//         q = min(15, trunc(x/d + 8.5)), value (q-8)*d
//   Q4_1: d = (max-min)/15, m = min, q = min(15, trunc((x-min)/d + 0.5))
//   Q8_0/Q8_1: as quantize_row_q8_0/q8_1
//   F16/BF16: round to nearest even; F32: copy.
void quantize_row(GgmlType type, const float* src, void* dst, int64_t n);

}  // namespace kvgate::engine::cpu
