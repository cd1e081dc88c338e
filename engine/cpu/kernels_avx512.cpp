// AVX-512 (F/BW/VL/DQ + VNNI + BF16) quantized matmul for prefill (more than
// 4 tokens; fewer go to kernels_avx512_decode.cpp) and the AVX-512 kernel
// table. Compiled with AVX-512 flags; reached only through kAvx512Kernels
// after isa.cpp saw the CPU has them. See kernels.h for why everything here
// has internal linkage and avoids std:: templates.
//
// Design. Weights stay in ggml's layout; each thread takes panels of 16 rows
// and first packs a panel into L1-resident scratch: for every 32-element
// block, 8 zmm registers, register g holding 4 consecutive weights
// (elements 4g..4g+3) of each of the 16 rows as unsigned bytes (Q4 nibbles
// 0..15; Q8_0 bytes xor 0x80, i.e. q+128), plus the 16 row scales (and Q4_1
// mins) as floats. Packing is a 4x4 dword transpose per 128-bit lane and
// costs about as much as one token's worth of compute; the panel two ahead
// is prefetched meanwhile.
//
// The micro-kernel then runs 16 rows x up to 8 tokens: for each block and
// token, 8 vpdpbusd with the token's 4 activation bytes broadcast straight
// from memory give the 16 exact int32 block dots; unsigned weights are
// corrected exactly in integers by starting the accumulator at -8*sum(x)
// (Q4_0) or -128*sum(x) (Q8_0). One cvt + one fma per (block, token) apply
// d_w*d_x for 16 rows at once (Q4_1 adds m_w*s_x with one more fma). Each
// weight block is thus unpacked once and used by every token, and each
// activation load feeds 16 rows.
#include <immintrin.h>

// GCC 12's AVX-512 headers build vectors from _mm512_undefined_*(), which
// -Wmaybe-uninitialized misreports in every caller.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <cstring>

#include "engine/cpu/kernels.h"

namespace kvgate::engine::cpu::detail {
namespace {

struct alignas(64) PanelBlock {
  __m512i g[8];  // see the file comment
  float dw[16];  // row scales
  float mw[16];  // Q4_1 row mins (unused otherwise)
};
static_assert(sizeof(PanelBlock) == 640);

// Token tile of the micro-kernel: 8 int32 + 8 float accumulators, 8 weight
// registers and a few temporaries fit the 32 zmm registers.
constexpr int kTokenTile = 8;

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- activation quantization (bit-identical to kernels_scalar.cpp) ----

void quantize_acts(const float* x, int64_t k, int8_t* qs, float* d, float* s, int32_t* corr,
                   int32_t offset) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, qs += 32) {
    const __m512 v0 = _mm512_loadu_ps(x);
    const __m512 v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float dd = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    // cvtps2dq rounds half to even under the default MXCSR, as nearbyint does.
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + 16), _mm512_cvtsepi32_epi8(q1));
    const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    d[b] = _cvtsh_ss(_cvtss_sh(dd, _MM_FROUND_TO_NEAREST_INT));
    s[b] = _cvtsh_ss(_cvtss_sh(dd * static_cast<float>(sum), _MM_FROUND_TO_NEAREST_INT));
    corr[b] = -offset * sum;
  }
}

// Packed panel + room for a zero-padded copy of a partial last panel (Q8_0,
// the widest type, is 34 bytes per 32 elements).
size_t qmatmul_scratch_bytes(int64_t k) {
  const size_t panel =
      static_cast<size_t>(k / 32) * (sizeof(PanelBlock) + kPanelRows * sizeof(BlockQ8_0));
  const size_t decode = avx512::decode_scratch_bytes(k);
  return panel > decode ? panel : decode;
}

// ---- loading a 16-row block ----

template <GgmlType kType>
constexpr int64_t block_bytes() {
  return kType == GgmlType::kQ4_0   ? sizeof(BlockQ4_0)
         : kType == GgmlType::kQ4_1 ? sizeof(BlockQ4_1)
                                    : sizeof(BlockQ8_0);
}

// 16 bytes at p + off for rows i, i+4, i+8, i+12 (row stride rs) in the four
// 128-bit lanes.
inline __m512i load_4rows(const uint8_t* p, int64_t rs, int i, int64_t off) {
  const uint8_t* q = p + i * rs + off;
  __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 4 * rs)), 1);
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 8 * rs)), 2);
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 12 * rs)), 3);
  return v;
}

// o[j] = dword j of the 16 bytes at p + off in rows 0..15, one row per lane:
// a 4x4 dword transpose within each 128-bit lane. Rows were spread over
// lanes as 4L+i, so lane L, dword i is row 4L+i: rows come out in order.
inline void transpose_16x4(const uint8_t* p, int64_t rs, int64_t off, __m512i o[4]) {
  const __m512i a = load_4rows(p, rs, 0, off);
  const __m512i b = load_4rows(p, rs, 1, off);
  const __m512i c = load_4rows(p, rs, 2, off);
  const __m512i d = load_4rows(p, rs, 3, off);
  const __m512i t0 = _mm512_unpacklo_epi32(a, b);
  const __m512i t1 = _mm512_unpackhi_epi32(a, b);
  const __m512i t2 = _mm512_unpacklo_epi32(c, d);
  const __m512i t3 = _mm512_unpackhi_epi32(c, d);
  o[0] = _mm512_unpacklo_epi64(t0, t2);
  o[1] = _mm512_unpackhi_epi64(t0, t2);
  o[2] = _mm512_unpacklo_epi64(t1, t3);
  o[3] = _mm512_unpackhi_epi64(t1, t3);
}

// Just dword 0 of each row (the block's d, and Q4_1's m): cheaper than a
// gather on Zen 4.
inline __m512i first_dwords(const uint8_t* p, int64_t rs) {
  const __m512i t0 = _mm512_unpacklo_epi32(load_4rows(p, rs, 0, 0), load_4rows(p, rs, 1, 0));
  const __m512i t2 = _mm512_unpacklo_epi32(load_4rows(p, rs, 2, 0), load_4rows(p, rs, 3, 0));
  return _mm512_unpacklo_epi64(t0, t2);
}

// Block at p (row 0) of 16 rows with stride rs, unpacked: g[j] holds
// elements 4j..4j+3 of every row as unsigned bytes, dw/mw the scales/mins.
template <GgmlType kType>
inline void load_block(const uint8_t* p, int64_t rs, __m512i g[8], __m512* dw, __m512* mw) {
  __m512i o[4];
  if constexpr (kType == GgmlType::kQ8_0) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // q + 128
    transpose_16x4(p, rs, 2, o);
    for (int j = 0; j < 4; ++j) g[j] = _mm512_xor_si512(o[j], flip);
    transpose_16x4(p, rs, 18, o);
    for (int j = 0; j < 4; ++j) g[4 + j] = _mm512_xor_si512(o[j], flip);
  } else {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    transpose_16x4(p, rs, kType == GgmlType::kQ4_0 ? 2 : 4, o);
    for (int j = 0; j < 4; ++j) {
      g[j] = _mm512_and_si512(o[j], low4);
      g[4 + j] = _mm512_and_si512(_mm512_srli_epi16(o[j], 4), low4);
    }
  }
  const __m512i dm = first_dwords(p, rs);
  *dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
  if constexpr (kType == GgmlType::kQ4_1) {
    *mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
  }
}

// Software prefetch of the panel two ahead, spread over the block loop: the
// 16-row strided walk defeats the hardware stream prefetchers, and decode
// reads every weight from DRAM exactly once.
struct Prefetch {
  const char* base = nullptr;  // null: nothing to prefetch
  int64_t lines_per_block = 0;
  int64_t lines = 0;
  void at_block(int64_t b) const {
    if (base == nullptr) return;
    for (int64_t i = b * lines_per_block; i < (b + 1) * lines_per_block && i < lines; ++i) {
      _mm_prefetch(base + i * 64, _MM_HINT_T0);
    }
  }
};

// ---- micro-kernel: 16 rows x NT tokens ----

// One block's contribution for NT tokens: 8 vpdpbusd per token with the
// token's 4 activation bytes broadcast from memory, then d_w*d_x (and
// Q4_1's m_w*s_x) applied to the 16 rows at once.
template <GgmlType kType, int NT>
inline void block_fma(const __m512i g[8], __m512 dw, __m512 mw, const QuantizedActs& x, int64_t t0,
                      int64_t b, __m512 facc[NT]) {
  const int64_t nb = x.k / 32;
  // Fully unrolled, so facc stays in registers (GCC keeps it in memory otherwise).
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    const int64_t tb = (t0 + t) * nb + b;
    const int8_t* xb = x.qs + tb * 32;
    __m512i acc0 =
        kType == GgmlType::kQ4_1 ? _mm512_setzero_si512() : _mm512_set1_epi32(x.corr[tb]);
    __m512i acc;
    if constexpr (NT == 1) {
      // Two dependency chains: with one token nothing else hides the latency.
      __m512i acc1 = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        acc0 = _mm512_dpbusd_epi32(acc0, g[j], _mm512_set1_epi32(load_i32(xb + 4 * j)));
        acc1 = _mm512_dpbusd_epi32(acc1, g[j + 1], _mm512_set1_epi32(load_i32(xb + 4 * j + 4)));
      }
      acc = _mm512_add_epi32(acc0, acc1);
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        acc0 = _mm512_dpbusd_epi32(acc0, g[j], _mm512_set1_epi32(load_i32(xb + 4 * j)));
      }
      acc = acc0;
    }
    const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[tb]));
    facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, facc[t]);
    if constexpr (kType == GgmlType::kQ4_1) {
      facc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x.s[tb]), facc[t]);
    }
  }
}

template <int NT>
inline void store_tile(const QuantMatmulArgs& a, int64_t r0, int64_t t0, __mmask16 mask,
                       const __m512 facc[NT]) {
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(a.y + (t0 + t) * a.ldy + r0, mask, facc[t]);
}

// Many tokens (prefill): unpack the panel once into L1-resident scratch,
// then run it against token tiles of up to kTokenTile.
template <GgmlType kType>
void pack_panel(const QuantMatmulArgs& a, const uint8_t* p, int64_t rs, PanelBlock* pb,
                const Prefetch& pf) {
  constexpr int64_t kBB = block_bytes<kType>();
  const int64_t nb = a.acts.k / 32;
  for (int64_t b = 0; b < nb; ++b) {
    pf.at_block(b);
    __m512i g[8];
    __m512 dw, mw = _mm512_setzero_ps();
    load_block<kType>(p + b * kBB, rs, g, &dw, &mw);
    for (int j = 0; j < 8; ++j) _mm512_store_si512(&pb[b].g[j], g[j]);
    _mm512_store_ps(pb[b].dw, dw);
    _mm512_store_ps(pb[b].mw, mw);
  }
}

template <GgmlType kType, int NT>
void panel_tile(const PanelBlock* pb, const QuantMatmulArgs& a, int64_t r0, int64_t t0,
                __mmask16 mask) {
  const int64_t nb = a.acts.k / 32;
  __m512 facc[NT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) facc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i g[8];
    for (int j = 0; j < 8; ++j) g[j] = _mm512_load_si512(&pb[b].g[j]);
    block_fma<kType, NT>(g, _mm512_load_ps(pb[b].dw), _mm512_load_ps(pb[b].mw), a.acts, t0, b,
                         facc);
  }
  store_tile<NT>(a, r0, t0, mask, facc);
}

template <GgmlType kType>
void qmatmul_typed(const QuantMatmulArgs& a, int64_t r0, int64_t r1, uint8_t* scratch) {
  const int64_t nb = a.acts.k / 32;
  const int64_t rs = a.row_bytes;
  auto* pb = reinterpret_cast<PanelBlock*>(scratch);
  uint8_t* tail_rows = scratch + nb * sizeof(PanelBlock);
  const int64_t panel_lines = kPanelRows * rs / 64;
  // The in-loop prefetch runs two panels ahead; start the first two now so a
  // thread does not begin each (small) matrix with a string of DRAM misses.
  for (int64_t i = 0; i < 2 * panel_lines && r0 * rs + i * 64 < r1 * rs; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(a.w + r0 * rs) + i * 64, _MM_HINT_T0);
  }
  for (int64_t r = r0; r < r1; r += kPanelRows) {
    const int64_t n = r1 - r < kPanelRows ? r1 - r : kPanelRows;
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    const uint8_t* p = a.w + r * rs;
    if (n < kPanelRows) {
      // Last, partial panel: copy it so every panel has 16 rows at stride
      // rs; the padding rows are zero and their outputs are masked off.
      std::memcpy(tail_rows, p, static_cast<size_t>(n * rs));
      std::memset(tail_rows + n * rs, 0, static_cast<size_t>((kPanelRows - n) * rs));
      p = tail_rows;
    }
    Prefetch pf;
    if (r + 3 * kPanelRows <= r1) {
      pf.base = reinterpret_cast<const char*>(a.w + (r + 2 * kPanelRows) * rs);
      pf.lines = panel_lines;
      pf.lines_per_block = (panel_lines + nb - 1) / nb;
    }
    pack_panel<kType>(a, p, rs, pb, pf);
    int64_t t = 0;
    for (; t + kTokenTile <= a.n_tokens; t += kTokenTile) panel_tile<kType, 8>(pb, a, r, t, mask);
    switch (a.n_tokens - t) {
      case 7:
        panel_tile<kType, 7>(pb, a, r, t, mask);
        break;
      case 6:
        panel_tile<kType, 6>(pb, a, r, t, mask);
        break;
      case 5:
        panel_tile<kType, 5>(pb, a, r, t, mask);
        break;
      case 4:
        panel_tile<kType, 4>(pb, a, r, t, mask);
        break;
      case 3:
        panel_tile<kType, 3>(pb, a, r, t, mask);
        break;
      case 2:
        panel_tile<kType, 2>(pb, a, r, t, mask);
        break;
      case 1:
        panel_tile<kType, 1>(pb, a, r, t, mask);
        break;
      default:
        break;
    }
  }
}

void qmatmul(const QuantMatmulArgs& a, int64_t r0, int64_t r1, void* scratch) {
  // Few tokens: memory-bound, so stream rows sequentially (kernels_avx512_decode.cpp).
  if (a.n_tokens <= avx512::decode_max_tokens()) return avx512::qmatmul_decode(a, r0, r1, scratch);
  auto* s = static_cast<uint8_t*>(scratch);
  switch (a.type) {
    case GgmlType::kQ4_0:
      return qmatmul_typed<GgmlType::kQ4_0>(a, r0, r1, s);
    case GgmlType::kQ4_1:
      return qmatmul_typed<GgmlType::kQ4_1>(a, r0, r1, s);
    case GgmlType::kQ8_0:
      return qmatmul_typed<GgmlType::kQ8_0>(a, r0, r1, s);
    default:
      return;
  }
}

}  // namespace

constinit const KernelTable kAvx512Kernels = {
    .isa = Isa::kAvx512,
    .quantize_acts = quantize_acts,
    .qmatmul_scratch_bytes = qmatmul_scratch_bytes,
    .qmatmul = qmatmul,
    .fmatmul = avx512::fmatmul,
    .round_to_f16 = avx512::round_to_f16,
    .rms_norm = avx512::rms_norm,
    .rope_apply = avx512::rope_apply,
    .swiglu = avx512::swiglu,
    .softmax_inplace = avx512::softmax_inplace,
    .dot_f32 = avx512::dot_f32,
    .dot_f16_f32 = avx512::dot_f16_f32,
    .axpy_f16 = avx512::axpy_f16,
    .convert_f32_to_f16 = avx512::convert_f32_to_f16,
    .add_inplace = avx512::add_inplace,
};

}  // namespace kvgate::engine::cpu::detail
