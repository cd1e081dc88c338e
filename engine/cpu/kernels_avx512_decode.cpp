// AVX-512 VNNI quantized matmul for few tokens (decode), row by row.
//
// Decode reads every weight from DRAM once, so what matters is streaming:
// walking each row sequentially lets the hardware prefetchers run ahead,
// which the 16-row panel layout of the prefill kernel (kernels_avx512.cpp)
// does not. Per row, two 32-element blocks share one zmm; the activations
// are re-laid once per call (per thread, in scratch) to match, so the
// weights need only an unpack and one vpdpbusd per token:
//
//   Q4_0/Q4_1 weights: w = [lo(b), lo(b+1), hi(b), hi(b+1)], 16 bytes each,
//     lo/hi the low/high nibbles (elements 0..15 / 16..31 of a block); int32
//     lanes 0-3 and 8-11 then belong to block b, 4-7 and 12-15 to b+1.
//   Q8_0 weights: w = [q(b) + 128, q(b+1) + 128]; lanes 0-7 / 8-15.
//
// As in the panel kernel, unsigned weights are corrected exactly in integers
// (the accumulator starts at -8*sum(x) or -128*sum(x), placed in one lane of
// the block) and Q4_1 adds m*s in float. Compiled with the AVX-512 flags;
// internal linkage except the entry point (see kernels.h).
#include <immintrin.h>

#include <cstring>

#include "engine/cpu/kernels.h"

// GCC 12's AVX-512 headers build vectors from _mm512_undefined_*(), which
// -Wmaybe-uninitialized misreports in every caller.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace kvgate::engine::cpu::detail {
namespace {

// One token's activations for one block pair, in the weights' lane order.
struct alignas(64) PairActs {
  int8_t qs[64];
  float dx[16];      // d_x of the block owning each int32 lane
  int32_t corr[16];  // -offset*sum(q) in the first lane of each block, else 0
  float s[4];        // (0, s_b, 0, s_b+1): pairs with cvtph(d_b, m_b, d_b+1, m_b+1)
  float pad[12];
};
static_assert(sizeof(PairActs) == 256);

constexpr int kMaxTokens = 4;

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <GgmlType kType>
constexpr int64_t block_bytes() {
  return kType == GgmlType::kQ4_0   ? sizeof(BlockQ4_0)
         : kType == GgmlType::kQ4_1 ? sizeof(BlockQ4_1)
                                    : sizeof(BlockQ8_0);
}

// Block (0 = b, 1 = b+1) that owns int32 lane l.
template <GgmlType kType>
constexpr int lane_block(int l) {
  return kType == GgmlType::kQ8_0 ? l / 8 : (l / 4) % 2;
}

// Re-lays token t's activations as np = ceil(nb/2) PairActs. A missing
// second block (odd nb) is all zeros, so it adds nothing.
template <GgmlType kType>
void build_pairs(const QuantizedActs& x, int64_t t, PairActs* out) {
  const int64_t nb = x.k / 32;
  const int64_t np = (nb + 1) / 2;
  for (int64_t p = 0; p < np; ++p) {
    PairActs& o = out[p];
    std::memset(&o, 0, sizeof o);
    for (int h = 0; h < 2; ++h) {
      const int64_t b = 2 * p + h;
      if (b >= nb) break;
      const int8_t* q = x.qs + t * x.k + b * 32;
      if constexpr (kType == GgmlType::kQ8_0) {
        std::memcpy(o.qs + 32 * h, q, 32);
      } else {
        std::memcpy(o.qs + 16 * h, q, 16);
        std::memcpy(o.qs + 32 + 16 * h, q + 16, 16);
      }
      const int64_t tb = t * nb + b;
      for (int l = 0; l < 16; ++l) {
        if (lane_block<kType>(l) == h) o.dx[l] = x.d[tb];
      }
      o.corr[kType == GgmlType::kQ8_0 ? 8 * h : 4 * h] = x.corr[tb];
      o.s[2 * h + 1] = x.s[tb];
    }
  }
}

// Both blocks of pair p of a row, unpacked to u8 in PairActs lane order.
template <GgmlType kType>
inline __m512i load_pair(const uint8_t* b0, const uint8_t* b1) {
  if constexpr (kType == GgmlType::kQ8_0) {
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2));
    const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2));
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
    return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    constexpr int kQo = kType == GgmlType::kQ4_0 ? 2 : 4;
    const __m256i q = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + kQo))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + kQo)), 1);
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
    return _mm512_and_si512(w, _mm512_set1_epi8(0x0f));
  }
}

inline float hsum128(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

template <GgmlType kType, int NT>
void decode_rows(const QuantMatmulArgs& a, int64_t r0, int64_t r1, const PairActs* pa) {
  constexpr int64_t kBB = block_bytes<kType>();
  const int64_t nb = a.acts.k / 32;
  const int64_t np = (nb + 1) / 2;
  // Spreads cvtph(d_b, m_b, d_b+1, m_b+1) elements 0 / 2 over the lanes of b / b+1.
  const __m512i didx = kType == GgmlType::kQ8_0
                           ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2)
                           : _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.w + r * a.row_bytes;
    __m512 facc[NT];
    __m128 msum[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      facc[t] = _mm512_setzero_ps();
      msum[t] = _mm_setzero_ps();
    }
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* b0 = row + 2 * p * kBB;
      const uint8_t* b1 = 2 * p + 1 < nb ? b0 + kBB : b0;  // odd tail: any valid block; x is 0
      const __m512i w = load_pair<kType>(b0, b1);
      // (d_b, m_b, d_b+1, m_b+1); the m slots hold quant bytes for Q4_0/Q8_0 and go unused.
      const __m128 dm =
          _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(load_i32(b0)), load_i32(b1), 1));
      const __m512 dw = _mm512_permutexvar_ps(didx, _mm512_castps128_ps512(dm));
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const PairActs& x = pa[t * np + p];
        __m512i acc = kType == GgmlType::kQ4_1 ? _mm512_setzero_si512() : _mm512_load_si512(x.corr);
        acc = _mm512_dpbusd_epi32(acc, w, _mm512_load_si512(x.qs));
        const __m512 scale = _mm512_mul_ps(dw, _mm512_load_ps(x.dx));
        facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, facc[t]);
        if constexpr (kType == GgmlType::kQ4_1)
          msum[t] = _mm_fmadd_ps(dm, _mm_load_ps(x.s), msum[t]);
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      float v = _mm512_reduce_add_ps(facc[t]);
      if constexpr (kType == GgmlType::kQ4_1) v += hsum128(msum[t]);
      a.y[t * a.ldy + r] = v;
    }
  }
}

template <GgmlType kType>
void decode_typed(const QuantMatmulArgs& a, int64_t r0, int64_t r1, void* scratch) {
  const int64_t np = (a.acts.k / 32 + 1) / 2;
  auto* pa = static_cast<PairActs*>(scratch);
  for (int64_t t = 0; t < a.n_tokens; ++t) build_pairs<kType>(a.acts, t, pa + t * np);
  switch (a.n_tokens) {
    case 1:
      return decode_rows<kType, 1>(a, r0, r1, pa);
    case 2:
      return decode_rows<kType, 2>(a, r0, r1, pa);
    case 3:
      return decode_rows<kType, 3>(a, r0, r1, pa);
    case 4:
      return decode_rows<kType, 4>(a, r0, r1, pa);
    default:
      return;
  }
}

}  // namespace

namespace avx512 {

int64_t decode_max_tokens() {
  return kMaxTokens;
}

size_t decode_scratch_bytes(int64_t k) {
  return static_cast<size_t>(kMaxTokens * ((k / 32 + 1) / 2)) * sizeof(PairActs);
}

void qmatmul_decode(const QuantMatmulArgs& a, int64_t r0, int64_t r1, void* scratch) {
  switch (a.type) {
    case GgmlType::kQ4_0:
      return decode_typed<GgmlType::kQ4_0>(a, r0, r1, scratch);
    case GgmlType::kQ4_1:
      return decode_typed<GgmlType::kQ4_1>(a, r0, r1, scratch);
    case GgmlType::kQ8_0:
      return decode_typed<GgmlType::kQ8_0>(a, r0, r1, scratch);
    default:
      return;
  }
}

}  // namespace avx512
}  // namespace kvgate::engine::cpu::detail
