// AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c; reached only
// through kAvx2Kernels after isa.cpp saw the CPU has them). See kernels.h for
// why everything here has internal linkage and avoids std:: templates.
//
// Quantized matmul: one weight row at a time, its 32-element blocks unpacked
// once and reused for up to 4 tokens; _mm256_maddubs_epi16 (u8 x s8 -> s16
// pairs) + _mm256_madd_epi16 (-> s32) give the exact integer block dot.
#include <immintrin.h>

#include <cstring>

#include "engine/cpu/kernels.h"

namespace kvgate::engine::cpu::detail {
namespace {

inline float f16_to_f32(const void* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x to ~2 ulp: x = n*ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial for
// e^r, then 2^n applied in two halves so results that underflow into
// subnormals are still rounded once. Clamping keeps n in range; NaN passes.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);
  x = _mm256_min_ps(_mm256_set1_ps(89.0f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23)));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23)));
}

inline __m256 silu256(__m256 g) {
  const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// ---- activation quantization (bit-identical to kernels_scalar.cpp) ----

void quantize_acts(const float* x, int64_t k, int8_t* qs, float* d, float* s, int32_t* corr,
                   int32_t offset) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < k / 32; ++b, x += 32, qs += 32) {
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    const float amax = hmax(m);
    const float dd = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
    const int sum =
        hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    // packs work per 128-bit lane; the permute restores element order.
    const __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
    const __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), p);
    d[b] = _cvtsh_ss(_cvtss_sh(dd, _MM_FROUND_TO_NEAREST_INT));
    s[b] = _cvtsh_ss(_cvtss_sh(dd * static_cast<float>(sum), _MM_FROUND_TO_NEAREST_INT));
    corr[b] = -offset * sum;
  }
}

size_t qmatmul_scratch_bytes(int64_t) {
  return 0;
}

// ---- quantized matmul ----

template <GgmlType kType>
constexpr int64_t block_bytes() {
  return kType == GgmlType::kQ4_0   ? sizeof(BlockQ4_0)
         : kType == GgmlType::kQ4_1 ? sizeof(BlockQ4_1)
                                    : sizeof(BlockQ8_0);
}

// One weight row against NT tokens starting at t0.
template <GgmlType kType, int NT>
void qrow(const QuantMatmulArgs& a, int64_t r, int64_t t0) {
  constexpr int64_t kBB = block_bytes<kType>();
  const int64_t k = a.acts.k;
  const int64_t nb = k / 32;
  const uint8_t* row = a.w + r * a.row_bytes;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m128i low4 = _mm_set1_epi8(0x0f);
  __m256 acc[NT];
  float msum[NT];
  // Loops over acc are unrolled so GCC keeps it in registers.
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    acc[t] = _mm256_setzero_ps();
    msum[t] = 0.0f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * kBB;
    const float dw = f16_to_f32(blk);
    __m256i w;
    if constexpr (kType == GgmlType::kQ8_0) {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    } else {
      const __m128i q = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(blk + (kType == GgmlType::kQ4_0 ? 2 : 4)));
      w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low4), _mm_and_si128(q, low4));
    }
    __m256i wabs;
    if constexpr (kType == GgmlType::kQ8_0) wabs = _mm256_abs_epi8(w);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const int64_t tok = t0 + t;
      const __m256i x =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.acts.qs + tok * k + b * 32));
      __m256i p16;
      if constexpr (kType == GgmlType::kQ8_0) {
        // Signed x signed via |w| * (x with w's sign): maddubs wants u8 first.
        p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
      } else {
        p16 = _mm256_maddubs_epi16(w, x);
      }
      __m256i p32 = _mm256_madd_epi16(p16, ones);
      if constexpr (kType == GgmlType::kQ4_0) {
        // Unsigned nibbles: add -8*sum(x) (exact) into one lane.
        p32 = _mm256_add_epi32(p32,
                               _mm256_setr_epi32(a.acts.corr[tok * nb + b], 0, 0, 0, 0, 0, 0, 0));
      }
      const __m256 scale = _mm256_set1_ps(dw * a.acts.d[tok * nb + b]);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc[t]);
      if constexpr (kType == GgmlType::kQ4_1)
        msum[t] += f16_to_f32(blk + 2) * a.acts.s[tok * nb + b];
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r] = hsum(acc[t]) + msum[t];
}

template <GgmlType kType>
void qmatmul_typed(const QuantMatmulArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t t = 0;
    for (; t + 4 <= a.n_tokens; t += 4) qrow<kType, 4>(a, r, t);
    switch (a.n_tokens - t) {
      case 3:
        qrow<kType, 3>(a, r, t);
        break;
      case 2:
        qrow<kType, 2>(a, r, t);
        break;
      case 1:
        qrow<kType, 1>(a, r, t);
        break;
      default:
        break;
    }
  }
}

void qmatmul(const QuantMatmulArgs& a, int64_t r0, int64_t r1, void*) {
  switch (a.type) {
    case GgmlType::kQ4_0:
      return qmatmul_typed<GgmlType::kQ4_0>(a, r0, r1);
    case GgmlType::kQ4_1:
      return qmatmul_typed<GgmlType::kQ4_1>(a, r0, r1);
    case GgmlType::kQ8_0:
      return qmatmul_typed<GgmlType::kQ8_0>(a, r0, r1);
    default:
      return;
  }
}

// ---- float matmul: R rows x NT tokens register tile ----

template <GgmlType kType>
inline __m256 load_w8(const uint8_t* row, int64_t i) {
  if constexpr (kType == GgmlType::kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i);
  } else if constexpr (kType == GgmlType::kF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)));
  } else {
    const __m256i h =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
}

template <GgmlType kType>
inline float load_w1(const uint8_t* row, int64_t i) {
  if constexpr (kType == GgmlType::kF32) {
    float f;
    std::memcpy(&f, row + 4 * i, 4);
    return f;
  } else if constexpr (kType == GgmlType::kF16) {
    return f16_to_f32(row + 2 * i);
  } else {
    uint16_t h;
    std::memcpy(&h, row + 2 * i, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}

template <GgmlType kType, int R, int NT>
void ftile(const FloatMatmulArgs& a, int64_t r, int64_t t0) {
  const uint8_t* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = a.w + (r + i) * a.row_bytes;
  const float* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = a.x + (t0 + t) * a.k;
  __m256 acc[R][NT];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= a.k; j += 8) {
    __m256 xv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(xs[t] + j);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m256 wv = load_w8<kType>(rows[i], j);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[i][t] = _mm256_fmadd_ps(wv, xv[t], acc[i][t]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      float sum = hsum(acc[i][t]);
      for (int64_t jj = j; jj < a.k; ++jj) sum += load_w1<kType>(rows[i], jj) * xs[t][jj];
      a.y[(t0 + t) * a.ldy + r + i] = sum;
    }
  }
}

template <GgmlType kType, int R>
void ftile_rows(const FloatMatmulArgs& a, int64_t r) {
  int64_t t = 0;
  for (; t + 4 <= a.n_tokens; t += 4) ftile<kType, R, 4>(a, r, t);
  switch (a.n_tokens - t) {
    case 3:
      ftile<kType, R, 3>(a, r, t);
      break;
    case 2:
      ftile<kType, R, 2>(a, r, t);
      break;
    case 1:
      ftile<kType, R, 1>(a, r, t);
      break;
    default:
      break;
  }
}

template <GgmlType kType>
void fmatmul_typed(const FloatMatmulArgs& a, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) ftile_rows<kType, 4>(a, r);
  for (; r < r1; ++r) ftile_rows<kType, 1>(a, r);
}

void fmatmul(const FloatMatmulArgs& a, int64_t r0, int64_t r1) {
  switch (a.type) {
    case GgmlType::kF32:
      return fmatmul_typed<GgmlType::kF32>(a, r0, r1);
    case GgmlType::kF16:
      return fmatmul_typed<GgmlType::kF16>(a, r0, r1);
    case GgmlType::kBF16:
      return fmatmul_typed<GgmlType::kBF16>(a, r0, r1);
    default:
      return;
  }
}

// ---- elementwise ops: 8 lanes, tails through a padded local vector ----

// Loads n < 8 floats (rest `fill`) / stores n < 8 floats.
inline __m256 load_tail(const float* p, int64_t n, float fill) {
  alignas(32) float buf[8];
  for (int i = 0; i < 8; ++i) buf[i] = i < n ? p[i] : fill;
  return _mm256_load_ps(buf);
}
inline void store_tail(float* p, __m256 v, int64_t n) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}
inline __m256 load_f16_tail(const fp16_t* p, int64_t n) {
  alignas(16) uint16_t buf[8] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
}

void round_to_f16(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  if (i < n) {
    const __m128i h = _mm256_cvtps_ph(load_tail(x + i, n - i, 0.0f), _MM_FROUND_TO_NEAREST_INT);
    store_tail(out + i, _mm256_cvtph_ps(h), n - i);
  }
}

void rms_norm(const float* x, const float* weight, float* out, int64_t n, float eps) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 sq = _mm256_mul_ps(v, v);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(sq, 1)));
  }
  alignas(32) double parts[4];
  _mm256_store_pd(parts, _mm256_add_pd(s0, s1));
  double sum = (parts[0] + parts[1]) + (parts[2] + parts[3]);
  for (; i < n; ++i) sum += static_cast<double>(x[i] * x[i]);
  const float mean = static_cast<float>(sum / static_cast<double>(n));
  const float scale_s = 1.0f / __builtin_sqrtf(mean + eps);
  const __m256 scale = _mm256_set1_ps(scale_s);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), scale);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(v, _mm256_loadu_ps(weight + i)));
  }
  for (; i < n; ++i) out[i] = (x[i] * scale_s) * weight[i];
}

void rope_apply(float* x, int64_t n_heads, int64_t head_dim, const float* c, const float* s,
                int64_t j0, int64_t j1) {
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * head_dim;
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      const __m256 xv = _mm256_loadu_ps(v + j);
      const __m256 sw = _mm256_permute_ps(xv, 0xb1);  // (x1, x0) per pair
      const __m256 r = _mm256_fmadd_ps(xv, _mm256_loadu_ps(c + (j - j0)),
                                       _mm256_mul_ps(sw, _mm256_loadu_ps(s + (j - j0))));
      _mm256_storeu_ps(v + j, r);
    }
    for (; j < j1; j += 2) {
      const float x0 = v[j], x1 = v[j + 1];
      v[j] = x0 * c[j - j0] + x1 * s[j - j0];
      v[j + 1] = x1 * c[j + 1 - j0] + x0 * s[j + 1 - j0];
    }
  }
}

void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = silu256(_mm256_loadu_ps(gate + i));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(g, _mm256_loadu_ps(up + i)));
  }
  if (i < n) {
    const __m256 g = silu256(load_tail(gate + i, n - i, 0.0f));
    store_tail(out + i, _mm256_mul_ps(g, load_tail(up + i, n - i, 0.0f)), n - i);
  }
}

void softmax_inplace(float* x, int64_t n) {
  if (n <= 0) return;
  const float ninf = -__builtin_inff();
  __m256 m = _mm256_set1_ps(ninf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  if (i < n) m = _mm256_max_ps(m, load_tail(x + i, n - i, ninf));
  const __m256 mx = _mm256_set1_ps(hmax(m));
  __m256 sum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mx));
    _mm256_storeu_ps(x + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < n) {
    const __m256 e = exp256(_mm256_sub_ps(load_tail(x + i, n - i, ninf), mx));  // pad -> 0
    store_tail(x + i, e, n - i);
    sum = _mm256_add_ps(sum, e);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum));
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  if (i < n) store_tail(x + i, _mm256_mul_ps(load_tail(x + i, n - i, 0.0f), inv), n - i);
}

float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8)
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  if (i < n) s1 = _mm256_fmadd_ps(load_tail(a + i, n - i, 0.0f), load_tail(b + i, n - i, 0.0f), s1);
  return hsum(_mm256_add_ps(s0, s1));
}

float dot_f16_f32(const fp16_t* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
    const __m256 a1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i + 8)));
    s0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 a0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
    s0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b + i), s0);
  }
  if (i < n) s1 = _mm256_fmadd_ps(load_f16_tail(a + i, n - i), load_tail(b + i, n - i, 0.0f), s1);
  return hsum(_mm256_add_ps(s0, s1));
}

void axpy_f16(float alpha, const fp16_t* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, xv, _mm256_loadu_ps(y + i)));
  }
  if (i < n) {
    store_tail(y + i,
               _mm256_fmadd_ps(av, load_f16_tail(x + i, n - i), load_tail(y + i, n - i, 0.0f)),
               n - i);
  }
}

void convert_f32_to_f16(const float* src, fp16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

void add_inplace(float* y, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
  }
  for (; i < n; ++i) y[i] += x[i];
}

}  // namespace

constinit const KernelTable kAvx2Kernels = {
    .isa = Isa::kAvx2,
    .quantize_acts = quantize_acts,
    .qmatmul_scratch_bytes = qmatmul_scratch_bytes,
    .qmatmul = qmatmul,
    .fmatmul = fmatmul,
    .round_to_f16 = round_to_f16,
    .rms_norm = rms_norm,
    .rope_apply = rope_apply,
    .swiglu = swiglu,
    .softmax_inplace = softmax_inplace,
    .dot_f32 = dot_f32,
    .dot_f16_f32 = dot_f16_f32,
    .axpy_f16 = axpy_f16,
    .convert_f32_to_f16 = convert_f32_to_f16,
    .add_inplace = add_inplace,
};

}  // namespace kvgate::engine::cpu::detail
