// Tensor element types as numbered in GGUF files, their block layouts, and
// half-precision conversions. Shared by the GGUF reader and every backend.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace kvgate::engine {

// Numbering follows the GGUF specification (ggml_type).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kBF16 = 30,
};

struct GgmlTypeTraits {
  std::string_view name;
  uint32_t block_elems;  // elements per block (1 for plain types)
  uint32_t block_bytes;  // bytes per block
};

// Traits of a type number read from a file; nullopt for numbers this build
// does not know (the caller reports the file as unsupported).
std::optional<GgmlTypeTraits> ggml_type_traits(uint32_t type);

// Bytes of a row of `n` elements; nullopt if `n` is not a multiple of the
// block size or the type is unknown.
std::optional<uint64_t> ggml_row_bytes(GgmlType type, uint64_t n);

inline constexpr int kQK4_0 = 32;
inline constexpr int kQK4_1 = 32;
inline constexpr int kQK8_0 = 32;
inline constexpr int kQK8_1 = 32;

using fp16_t = uint16_t;
using bf16_t = uint16_t;

#pragma pack(push, 1)
struct BlockQ4_0 {
  fp16_t d;            // scale
  uint8_t qs[16];      // 32 4-bit quants: low nibbles = elements 0..15, high = 16..31
};
struct BlockQ4_1 {
  fp16_t d;            // scale
  fp16_t m;            // min
  uint8_t qs[16];
};
struct BlockQ8_0 {
  fp16_t d;
  int8_t qs[32];
};
struct BlockQ8_1 {     // activation format paired with Q4_1
  fp16_t d;            // scale
  fp16_t s;            // d * sum(qs)
  int8_t qs[32];
};
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ8_1) == 36);

// IEEE half <-> float, exact for every half value, round-to-nearest-even on
// the way down (same results as F16C's vcvtps2ph with rounding mode 0).
float fp16_to_fp32(fp16_t h);
fp16_t fp32_to_fp16(float f);

inline float bf16_to_fp32(bf16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
bf16_t fp32_to_bf16(float f);  // round-to-nearest-even, NaN kept quiet

}  // namespace kvgate::engine
