#include "engine/ggml_types.h"

#include <cmath>

namespace kvgate::engine {

std::optional<GgmlTypeTraits> ggml_type_traits(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32: return GgmlTypeTraits{"F32", 1, 4};
    case GgmlType::kF16: return GgmlTypeTraits{"F16", 1, 2};
    case GgmlType::kQ4_0: return GgmlTypeTraits{"Q4_0", 32, 18};
    case GgmlType::kQ4_1: return GgmlTypeTraits{"Q4_1", 32, 20};
    case GgmlType::kQ5_0: return GgmlTypeTraits{"Q5_0", 32, 22};
    case GgmlType::kQ5_1: return GgmlTypeTraits{"Q5_1", 32, 24};
    case GgmlType::kQ8_0: return GgmlTypeTraits{"Q8_0", 32, 34};
    case GgmlType::kQ8_1: return GgmlTypeTraits{"Q8_1", 32, 36};
    case GgmlType::kQ2_K: return GgmlTypeTraits{"Q2_K", 256, 84};
    case GgmlType::kQ3_K: return GgmlTypeTraits{"Q3_K", 256, 110};
    case GgmlType::kQ4_K: return GgmlTypeTraits{"Q4_K", 256, 144};
    case GgmlType::kQ5_K: return GgmlTypeTraits{"Q5_K", 256, 176};
    case GgmlType::kQ6_K: return GgmlTypeTraits{"Q6_K", 256, 210};
    case GgmlType::kQ8_K: return GgmlTypeTraits{"Q8_K", 256, 292};
    case GgmlType::kI8: return GgmlTypeTraits{"I8", 1, 1};
    case GgmlType::kI16: return GgmlTypeTraits{"I16", 1, 2};
    case GgmlType::kI32: return GgmlTypeTraits{"I32", 1, 4};
    case GgmlType::kI64: return GgmlTypeTraits{"I64", 1, 8};
    case GgmlType::kF64: return GgmlTypeTraits{"F64", 1, 8};
    case GgmlType::kBF16: return GgmlTypeTraits{"BF16", 1, 2};
  }
  return std::nullopt;
}

std::optional<uint64_t> ggml_row_bytes(GgmlType type, uint64_t n) {
  auto t = ggml_type_traits(static_cast<uint32_t>(type));
  if (!t || n % t->block_elems != 0) return std::nullopt;
  return n / t->block_elems * t->block_bytes;
}

float fp16_to_fp32(fp16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: value = mant * 2^-24
      float f = std::ldexp(static_cast<float>(mant), -24);
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

fp16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<fp16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<fp16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    // value / 2^-24, rounded to nearest even
    float a;
    std::memcpy(&a, &abs, 4);
    float scaled = a * 16777216.0f;  // exact (power of two)
    float r = std::nearbyint(scaled);  // default rounding mode: nearest-even
    return static_cast<fp16_t>(sign | static_cast<uint32_t>(r));
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (nearest-even)
  uint32_t mant = abs + 0xc8000000u;  // exponent - 112
  uint32_t rounded = mant + 0xfffu + ((mant >> 13) & 1u);
  return static_cast<fp16_t>(sign | (rounded >> 13));
}

bf16_t fp32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<bf16_t>(x >> 16);
}

}  // namespace kvgate::engine
