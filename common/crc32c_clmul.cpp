// CRC32C by carry-less-multiply folding: PCLMULQDQ over 128-bit registers
// and VPCLMULQDQ over 512-bit ones. The functions carry target attributes,
// so this file builds with the default flags; crc32c.cpp calls them only
// when CPUID says the CPU (and, for AVX-512, the OS) supports them.
//
// The math, in the reflected bit order of CRC32C (the first bit of the
// stream is the least significant bit of the first byte):
//
// - Read 16 bytes as a 128-bit lane L: bit i stands for x^(127-i), so the
//   low qword (the earlier 8 bytes) holds the high-degree half. A message M
//   of 16-byte lanes is sum L_j * x^(8 * bytes after lane j), and its CRC
//   register (seeded 0) is M * x^32 mod P, P = x^32 + ... (0x82F63B78
//   reflected). A nonzero register r entering M is r XORed into M's first
//   4 bytes.
// - Folding: a lane d bits ahead of another stands for L * x^d relative to
//   it, and any polynomial congruent to that mod P that fits in 128 bits can
//   be XORed into the later lane instead. With L = H * x^64 + G (H the low
//   qword, G the high one), L * x^d = H * x^(d+64) + G * x^d.
// - PCLMULQDQ of two 64-bit operands, read in the same reflected order (bit
//   i stands for x^(63-i)), gives a 127-bit product whose bits, read as a
//   128-bit lane, stand for x * A * B (the reflected product lands one bit
//   low). A 32-bit constant c in the CRC register's order (bit i stands for
//   x^(31-i)) read as a 64-bit operand stands for x^32 * c. So with
//       k_lo(d) = x^(d + 31) mod P   multiplying H (imm8 0x00),
//       k_hi(d) = x^(d - 33) mod P   multiplying G (imm8 0x11),
//   clmul(H, k_lo) ^ clmul(G, k_hi) == H * x^(d+64) + G * x^d (mod P), in
//   at most 128 bits: the lane folded forward by d bits. The constants are
//   computed below at compile time (xpow_mod), not tabulated.
// - Finish: once one 16-byte lane F stands for everything read so far, the
//   register is F * x^32 mod P: the crc32 instruction over F's 16 bytes
//   from a zero register, which then continues over the last < 16 bytes.
//   That spares a Barrett reduction and its constants.
#include "common/crc32c_kernels.h"

#if KVGATE_CRC32C_X86_64
#include <immintrin.h>

#include <array>

// GCC 12's AVX-512 intrinsics start from _mm*_undefined_*() (`__Y = __Y`),
// which -Wmaybe-uninitialized reports wherever they inline (GCC bug 105593,
// fixed in GCC 13); nothing here reads an undefined value.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace kvgate::crc32c_detail {
namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;  // Castagnoli, bit-reversed

// x^n mod P in the CRC register's bit order (bit 31 - i holds the
// coefficient of x^i): start from x^0 and multiply by x n times; a
// multiplication by x is a right shift, and a coefficient pushed past x^31
// becomes x^32 == P - x^32 (mod P), the reversed polynomial.
constexpr uint32_t xpow_mod(uint32_t n) {
  uint32_t v = 0x80000000u;
  for (uint32_t i = 0; i < n; ++i) v = (v >> 1) ^ ((v & 1u) ? kPolynomial : 0u);
  return v;
}

// The pair that folds a 128-bit lane forward by `bits` (see the top).
struct FoldConstants {
  uint64_t lo;  // k_lo = x^(bits + 31) mod P, for the lane's low qword
  uint64_t hi;  // k_hi = x^(bits - 33) mod P, for its high qword
};
constexpr FoldConstants fold_by(uint32_t bits) {
  return {xpow_mod(bits + 31), xpow_mod(bits - 33)};
}

// Sanity: x^32 mod P is P's low terms, and folding by d needs d >= 33.
static_assert(xpow_mod(32) == kPolynomial);
static_assert(xpow_mod(31) == 1u);

// table[i] folds forward by i registers of `bits` each (table[0] unused).
template <size_t N>
constexpr std::array<FoldConstants, N + 1> fold_table(uint32_t bits) {
  std::array<FoldConstants, N + 1> t{};
  for (size_t i = 1; i <= N; ++i) t[i] = fold_by(static_cast<uint32_t>(i) * bits);
  return t;
}

// 128-bit path: 8 lanes (128 bytes) in flight, folded forward by 1024 bits.
constexpr size_t kPclmulLanes = 8;
constexpr auto kFold128 = fold_table<kPclmulLanes>(128);

// 512-bit path: kZmmRegs registers in flight, folded forward by kZmmRegs *
// 512 bits; then one register folded by 512; kFold128 folds its lanes into one.
constexpr size_t kZmmRegs = 8;
constexpr auto kFold512 = fold_table<kZmmRegs>(512);

// Below these sizes a single crc32-instruction chain is as fast (tail and
// reduction costs dominate); measured with bench/crc32c_bench.cpp.
constexpr size_t kPclmulMinBytes = 512;
constexpr size_t kAvx512MinBytes = 128;

#define KVGATE_TARGET_PCLMUL __attribute__((target("sse4.2,pclmul")))
#define KVGATE_TARGET_AVX512 __attribute__((target("sse4.2,pclmul,avx2,avx512f,vpclmulqdq")))

KVGATE_TARGET_PCLMUL inline __m128i k128(const FoldConstants& k) {
  return _mm_set_epi64x(static_cast<long long>(k.hi), static_cast<long long>(k.lo));
}

// x folded forward by the constants' distance, XORed into `data`.
KVGATE_TARGET_PCLMUL inline __m128i fold128(__m128i x, __m128i k, __m128i data) {
  return _mm_xor_si128(
      _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), data);
}

KVGATE_TARGET_PCLMUL inline __m128i load128(const unsigned char* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// Folds the remaining whole 16-byte lanes into `acc`, then turns it into
// the register with the crc32 instruction and finishes the < 16 bytes left.
KVGATE_TARGET_PCLMUL uint32_t finish128(__m128i acc, const unsigned char* p, size_t n) {
  const __m128i k = k128(kFold128[1]);
  while (n >= 16) {
    acc = fold128(acc, k, load128(p));
    p += 16;
    n -= 16;
  }
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(acc)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(acc, 1)));
  return crc32c_sse42(p, n, static_cast<uint32_t>(c));
}

KVGATE_TARGET_AVX512 inline __m512i k512(const FoldConstants& k) {
  return _mm512_broadcast_i32x4(k128(k));
}

KVGATE_TARGET_AVX512 inline __m512i fold512(__m512i x, __m512i k, __m512i data) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00),
                                   _mm512_clmulepi64_epi128(x, k, 0x11), data, 0x96);  // a^b^c
}

KVGATE_TARGET_AVX512 inline __m512i load512(const unsigned char* p) {
  return _mm512_loadu_si512(p);
}

}  // namespace

KVGATE_TARGET_PCLMUL uint32_t crc32c_pclmul(const unsigned char* p, size_t n, uint32_t crc) {
  if (n < kPclmulMinBytes) return crc32c_sse42(p, n, crc);
  __m128i x[kPclmulLanes];
  for (size_t i = 0; i < kPclmulLanes; ++i) x[i] = load128(p + 16 * i);
  x[0] = _mm_xor_si128(x[0], _mm_cvtsi32_si128(static_cast<int>(crc)));
  p += 16 * kPclmulLanes;
  n -= 16 * kPclmulLanes;
  const __m128i k = k128(kFold128[kPclmulLanes]);
  while (n >= 16 * kPclmulLanes) {
    for (size_t i = 0; i < kPclmulLanes; ++i) x[i] = fold128(x[i], k, load128(p + 16 * i));
    p += 16 * kPclmulLanes;
    n -= 16 * kPclmulLanes;
  }
  // Lane i is 7 - i lanes before the last: independent folds, one XOR tree.
  __m128i acc = x[kPclmulLanes - 1];
  for (size_t i = 0; i + 1 < kPclmulLanes; ++i)
    acc = fold128(x[i], k128(kFold128[kPclmulLanes - 1 - i]), acc);
  return finish128(acc, p, n);
}

KVGATE_TARGET_AVX512 uint32_t crc32c_avx512_vpclmul(const unsigned char* p, size_t n,
                                                    uint32_t crc) {
  if (n < kAvx512MinBytes) return crc32c_sse42(p, n, crc);
  const __m512i seed = _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc)));
  __m512i acc;
  if (n >= 64 * kZmmRegs) {
    __m512i y[kZmmRegs];
    for (size_t i = 0; i < kZmmRegs; ++i) y[i] = load512(p + 64 * i);
    y[0] = _mm512_xor_si512(y[0], seed);
    p += 64 * kZmmRegs;
    n -= 64 * kZmmRegs;
    const __m512i k = k512(kFold512[kZmmRegs]);
    while (n >= 64 * kZmmRegs) {
      for (size_t i = 0; i < kZmmRegs; ++i) y[i] = fold512(y[i], k, load512(p + 64 * i));
      p += 64 * kZmmRegs;
      n -= 64 * kZmmRegs;
    }
    // Register i is kZmmRegs - 1 - i registers before the last.
    acc = y[kZmmRegs - 1];
    for (size_t i = 0; i + 1 < kZmmRegs; ++i)
      acc = fold512(y[i], k512(kFold512[kZmmRegs - 1 - i]), acc);
  } else {
    acc = _mm512_xor_si512(load512(p), seed);
    p += 64;
    n -= 64;
  }
  const __m512i k1 = k512(kFold512[1]);
  while (n >= 64) {
    acc = fold512(acc, k1, load512(p));
    p += 64;
    n -= 64;
  }
  // Lanes 0..2 fold forward by 384, 256 and 128 bits onto lane 3.
  const FoldConstants &a = kFold128[3], &b = kFold128[2], &c = kFold128[1];
  const __m512i kl =
      _mm512_set_epi64(0, 0, static_cast<long long>(c.hi), static_cast<long long>(c.lo),
                       static_cast<long long>(b.hi), static_cast<long long>(b.lo),
                       static_cast<long long>(a.hi), static_cast<long long>(a.lo));
  const __m512i t = fold512(acc, kl, _mm512_maskz_mov_epi64(0xC0, acc));
  const __m256i h = _mm256_xor_si256(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
  const __m128i x = _mm_xor_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  return finish128(x, p, n);
}

}  // namespace kvgate::crc32c_detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // KVGATE_CRC32C_X86_64
