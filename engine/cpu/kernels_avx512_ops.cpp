// AVX-512 elementwise ops and float-weight matmul (compiled with the same
// flags as kernels_avx512.cpp). Tails use masked loads/stores, so every
// element goes through the same vector code. Reached only through
// kAvx512Kernels; helpers have internal linkage (see kernels.h).
#include <immintrin.h>

// GCC 12's AVX-512 headers build vectors from _mm512_undefined_*(), which
// -Wmaybe-uninitialized misreports in every caller.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "engine/cpu/kernels.h"

namespace kvgate::engine::cpu::detail {
namespace {

inline __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1);
}

// e^x to ~2 ulp: x = n*ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial for
// e^r, scalef applies 2^n with correct overflow/underflow. NaN passes.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 silu512(__m512 g) {
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// ---- float matmul: R rows x NT tokens register tile ----

template <GgmlType kType>
inline __m512 load_w16(const uint8_t* row, int64_t i, __mmask16 m) {
  if constexpr (kType == GgmlType::kF32) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + i);
  } else if constexpr (kType == GgmlType::kF16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + 2 * i));
  } else {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, row + 2 * i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
}

template <GgmlType kType, int R, int NT>
inline void ftile_step(const uint8_t* const* rows, const float* const* xs, int64_t j, __mmask16 m,
                       __m512 (&acc)[R][NT]) {
  __m512 xv[NT];
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) xv[t] = _mm512_maskz_loadu_ps(m, xs[t] + j);
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    const __m512 wv = load_w16<kType>(rows[i], j, m);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_fmadd_ps(wv, xv[t], acc[i][t]);
  }
}

// R rows x NT tokens; full 16-wide steps, then one masked step for the tail.
template <GgmlType kType, int R, int NT>
void ftile(const FloatMatmulArgs& a, int64_t r, int64_t t0) {
  // Every loop over acc is unrolled so GCC keeps it in registers.
  const uint8_t* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = a.w + (r + i) * a.row_bytes;
  const float* xs[NT];
  for (int t = 0; t < NT; ++t) xs[t] = a.x + (t0 + t) * a.k;
  __m512 acc[R][NT];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= a.k; j += 16) ftile_step<kType, R, NT>(rows, xs, j, 0xffff, acc);
  if (j < a.k) ftile_step<kType, R, NT>(rows, xs, j, tail_mask(a.k - j), acc);
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]);
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

}  // namespace

namespace avx512 {

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

void round_to_f16(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm512_mask_storeu_ps(out + i, m, _mm512_cvtph_ps(h));
  }
}

void rms_norm(const float* x, const float* weight, float* out, int64_t n, float eps) {
  // Squares in float, sum in double, as llama.cpp does.
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 sq = _mm512_mul_ps(v, v);
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(sq)));
    s1 = _mm512_add_pd(
        s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sq), 1))));
  }
  const double sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  const float mean = static_cast<float>(sum / static_cast<double>(n));
  const __m512 scale = _mm512_set1_ps(1.0f / __builtin_sqrtf(mean + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), scale);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, weight + i)));
  }
}

void rope_apply(float* x, int64_t n_heads, int64_t head_dim, const float* c, const float* s,
                int64_t j0, int64_t j1) {
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t j = j0; j < j1; j += 16) {
      const __mmask16 m = j1 - j >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(j1 - j);
      const __m512 xv = _mm512_maskz_loadu_ps(m, v + j);
      const __m512 sw = _mm512_permute_ps(xv, 0xb1);  // (x1, x0) per pair
      const __m512 r = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, c + (j - j0)),
                                       _mm512_mul_ps(sw, _mm512_maskz_loadu_ps(m, s + (j - j0))));
      _mm512_mask_storeu_ps(v + j, m, r);
    }
  }
}

void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m512 g = silu512(_mm512_maskz_loadu_ps(m, gate + i));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, up + i)));
  }
}

void softmax_inplace(float* x, int64_t n) {
  if (n <= 0) return;
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  __m512 mv = ninf;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(ninf, m, x + i));
  }
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m512 e =
        _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mx)));
    _mm512_mask_storeu_ps(x + i, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
  }
}

float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

float dot_f16_f32(const fp16_t* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)));
    const __m512 a1 =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i + 16)));
    s0 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(a1, _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m512 a0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, a + i));
    s0 = _mm512_fmadd_ps(a0, _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

void axpy_f16(float alpha, const fp16_t* x, float* y, int64_t n) {
  const __m512 av = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m512 xv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x + i));
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, xv, _mm512_maskz_loadu_ps(m, y + i)));
  }
}

void convert_f32_to_f16(const float* src, fp16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    const __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_mask_storeu_epi16(dst + i, m, h);
  }
}

void add_inplace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    _mm512_mask_storeu_ps(
        y + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i)));
  }
}

}  // namespace avx512
}  // namespace kvgate::engine::cpu::detail
