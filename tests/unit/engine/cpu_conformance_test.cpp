// Conformance of the CPU backend: every op on every ISA this CPU supports
// (scalar, avx2, avx512; others are skipped) against plain double-precision
// references, on random inputs and awkward shapes. Each tolerance below says
// where it comes from; none depends on timing.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/isa.h"
#include "engine/cpu/kernels.h"
#include "engine/cpu/matmul.h"
#include "engine/cpu/ops.h"
#include "engine/cpu/quant.h"
#include "engine/cpu/thread_pool.h"
#include "engine/ggml_types.h"

namespace kvgate::engine::cpu {
namespace {

constexpr double kEps = 1.0 / (1 << 24);  // float unit roundoff

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

// Adds the cases quantizers must survive: an all-zero block, a block with one
// large outlier, and a block of ties for round-half-even.
// `row` starts at element row*row_len.
void add_special_blocks(std::vector<float>& v, size_t row_len, size_t row = 0) {
  if (row_len < 96 || row_len % 32 != 0) return;
  float* p = v.data() + row * row_len;
  for (size_t i = 0; i < 32; ++i) p[i] = 0.0f;
  p[32 + 5] = 40.0f;
  for (size_t i = 64; i < 96; ++i) p[i] = static_cast<float>(static_cast<int>(i) - 80) * 0.5f;
}

size_t row_bytes(GgmlType type, int64_t n) {
  return *ggml_row_bytes(type, static_cast<uint64_t>(n));
}

std::vector<uint8_t> quantize_matrix(GgmlType type, const std::vector<float>& w, int64_t rows,
                                     int64_t cols) {
  std::vector<uint8_t> out(row_bytes(type, cols) * rows);
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(type, w.data() + r * cols, out.data() + r * row_bytes(type, cols), cols);
  }
  return out;
}

class CpuConformance : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!isa_supported(GetParam())) GTEST_SKIP() << isa_name(GetParam()) << " not supported here";
  }
  Isa isa() const { return GetParam(); }
};

// ---------------------------------------------------------------- conversions

TEST(Conversions, Fp16RoundTripIsExactForAllHalves) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_fp32(static_cast<fp16_t>(h));
    if (std::isnan(f)) {
      EXPECT_EQ((h & 0x7c00u), 0x7c00u);
      EXPECT_TRUE(std::isnan(fp16_to_fp32(fp32_to_fp16(f))));
      continue;
    }
    ASSERT_EQ(fp32_to_fp16(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(Conversions, Bf16RoundTripIsExactForAllValues) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_fp32(static_cast<bf16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(f))));
      continue;
    }
    ASSERT_EQ(fp32_to_bf16(f), h) << "bf16 0x" << std::hex << h;
  }
}

// Rounding of arbitrary floats: nearest, ties to even, checked in double.
TEST(Conversions, Fp16AndBf16RoundToNearestEven) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits(0, 0x477fffffu);  // finite, below fp16 overflow
  for (int i = 0; i < 200000; ++i) {
    uint32_t b = bits(rng) | (i & 1 ? 0x80000000u : 0u);
    if (i % 7 == 0) b = (b & ~0x1fffu) | 0x1000u;  // exact fp16 tie
    float f;
    std::memcpy(&f, &b, 4);
    const double h = fp16_to_fp32(fp32_to_fp16(f));
    // Neighbours one fp16 step away must not be closer.
    const fp16_t hb = fp32_to_fp16(f);
    for (int step : {-1, 1}) {
      const fp16_t nb = static_cast<fp16_t>(hb + step);
      const float n = fp16_to_fp32(nb);
      if (std::isnan(n) || std::isinf(n) || ((nb ^ hb) & 0x8000u)) continue;
      const double dn = std::fabs(static_cast<double>(n) - f), dh = std::fabs(h - f);
      ASSERT_TRUE(dh < dn || (dh == dn && (hb & 1) == 0)) << f;
    }
    const double bf = bf16_to_fp32(fp32_to_bf16(f));
    // Relative 2^-8 for normals; half a bf16 subnormal step (2^-134) below.
    ASSERT_LE(std::fabs(bf - f),
              std::fabs(static_cast<double>(f)) * std::ldexp(1.0, -8) + std::ldexp(1.0, -134))
        << f;
  }
}

// SIMD fp16 conversions must give the same bits as the scalar ones.
TEST_P(CpuConformance, ConvertF32ToF16MatchesScalarBitForBit) {
  std::vector<float> src;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_fp32(static_cast<fp16_t>(h));
    if (!std::isnan(f)) src.push_back(f);
  }
  std::mt19937 rng(11);
  std::uniform_int_distribution<uint32_t> bits(0, 0xffffffffu);
  for (int i = 0; i < 100003; ++i) {
    uint32_t b = bits(rng);
    if ((b & 0x7f800000u) == 0x7f800000u) continue;  // NaN payloads may differ; inf kept below
    float f;
    std::memcpy(&f, &b, 4);
    src.push_back(f);
  }
  src.push_back(INFINITY);
  src.push_back(-INFINITY);
  std::vector<fp16_t> got(src.size());
  convert_f32_to_f16(src.data(), got.data(), static_cast<int64_t>(src.size()), isa());
  for (size_t i = 0; i < src.size(); ++i) ASSERT_EQ(got[i], fp32_to_fp16(src[i])) << src[i];
}

// fp16 -> fp32 inside the SIMD ops (F16C) is exact for every half:
// axpy with alpha = 1 into zeros returns the value itself.
TEST_P(CpuConformance, Fp16ToFp32InsideOpsIsExactForAllHalves) {
  std::vector<fp16_t> h(65536);
  for (uint32_t i = 0; i < 65536; ++i) h[i] = static_cast<fp16_t>(i);
  std::vector<float> y(65536, 0.0f);
  axpy_f16(1.0f, h.data(), y.data(), 65536, isa());
  for (uint32_t i = 0; i < 65536; ++i) {
    const float want = fp16_to_fp32(h[i]);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(y[i]));
    } else {
      ASSERT_EQ(y[i], want) << "half 0x" << std::hex << i;
    }
  }
}

// ------------------------------------------------------------- quantization

// dequantize(quantize(x)) error per element, bounded per block:
//   Q8_0/Q8_1: rounding to the grid amax/127 (half a step) + the fp16
//              rounding of d times |q| <= 127: amax*(1/254 + 2^-11).
//   Q4_0: step |d| = amax/8; the element at -vmax is clamped from 8 to 7,
//         so one full step, + 8 steps of fp16 error in d.
//   Q4_1: half a step d = (max-min)/15 + fp16 errors of d (x15) and m.
//   F16 / BF16: relative 2^-11 / 2^-8 (normal range); F32: exact.
TEST(Quantization, RoundTripErrorWithinPerTypeBound) {
  const int64_t n = 32 * 40;
  std::vector<float> x = random_floats(n, 3, 2.0f);
  add_special_blocks(x, n);
  for (GgmlType type : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ4_0,
                        GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kQ8_1}) {
    SCOPED_TRACE(std::string(ggml_type_traits(static_cast<uint32_t>(type))->name));
    std::vector<uint8_t> q(row_bytes(type, n));
    quantize_row(type, x.data(), q.data(), n);
    std::vector<float> back(n);
    dequantize_row(type, q.data(), back.data(), n);
    for (int64_t b = 0; b < n / 32; ++b) {
      float amax = 0, lo = x[b * 32], hi = x[b * 32];
      for (int i = 0; i < 32; ++i) {
        amax = std::max(amax, std::fabs(x[b * 32 + i]));
        lo = std::min(lo, x[b * 32 + i]);
        hi = std::max(hi, x[b * 32 + i]);
      }
      for (int i = 0; i < 32; ++i) {
        const double v = x[b * 32 + i], err = std::fabs(back[b * 32 + i] - v);
        double bound = 0;
        switch (type) {
          case GgmlType::kF32:
            bound = 0;
            break;
          case GgmlType::kF16:
            bound = std::fabs(v) * std::ldexp(1.0, -11);
            break;
          case GgmlType::kBF16:
            bound = std::fabs(v) * std::ldexp(1.0, -8);
            break;
          case GgmlType::kQ8_0:
          case GgmlType::kQ8_1:
            bound = amax * (1.0 / 254 + std::ldexp(1.0, -11));
            break;
          case GgmlType::kQ4_0:
            bound = amax / 8.0 * (1.0 + 8 * std::ldexp(1.0, -11));
            break;
          case GgmlType::kQ4_1: {
            const double d = (hi - lo) / 15.0;
            bound = d * (0.5 + 15 * std::ldexp(1.0, -11)) + std::fabs(lo) * std::ldexp(1.0, -11);
            break;
          }
          default:
            break;
        }
        ASSERT_LE(err, bound * 1.0001 + 1e-30) << "block " << b << " element " << i << " x=" << v;
      }
    }
  }
  // Q8_1's s is fp16(d * sum(q)).
  std::vector<BlockQ8_1> q81(n / 32);
  quantize_row_q8_1(x.data(), q81.data(), n);
  for (const auto& blk : q81) {
    int sum = 0;
    for (int8_t v : blk.qs) sum += v;
    const float s = fp16_to_fp32(blk.s), d = fp16_to_fp32(blk.d);
    EXPECT_NEAR(s, d * sum, std::fabs(d * sum) * 2e-3 + 1e-6);
  }
}

// The kernels' activation quantizers produce exactly the blocks of
// quantize_row_q8_0/q8_1: same qs, d, s, and the exact -offset*sum(q).
TEST_P(CpuConformance, ActivationQuantizationMatchesReferenceBitForBit) {
  const int64_t k = 32 * 37;
  std::vector<float> x = random_floats(k, 5, 3.0f);
  add_special_blocks(x, k);
  const int64_t nb = k / 32;
  std::vector<int8_t> qs(k);
  std::vector<float> d(nb), s(nb);
  std::vector<int32_t> corr(nb);
  detail::kernels_for(isa()).quantize_acts(x.data(), k, qs.data(), d.data(), s.data(), corr.data(),
                                           8);
  std::vector<BlockQ8_1> ref(nb);
  quantize_row_q8_1(x.data(), ref.data(), k);
  std::vector<BlockQ8_0> ref0(nb);
  quantize_row_q8_0(x.data(), ref0.data(), k);
  for (int64_t b = 0; b < nb; ++b) {
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      ASSERT_EQ(qs[b * 32 + i], ref[b].qs[i]) << "block " << b << " element " << i;
      ASSERT_EQ(ref0[b].qs[i], ref[b].qs[i]);
      sum += ref[b].qs[i];
    }
    EXPECT_EQ(d[b], fp16_to_fp32(ref[b].d));
    EXPECT_EQ(ref0[b].d, ref[b].d);
    EXPECT_EQ(s[b], fp16_to_fp32(ref[b].s));
    EXPECT_EQ(corr[b], -8 * sum);
  }
}

// ------------------------------------------------------------------ matmul

const GgmlType kAllWeightTypes[] = {GgmlType::kF32,  GgmlType::kF16,  GgmlType::kBF16,
                                    GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0};
// 4 and 5 straddle the AVX-512 switch from the row-wise decode kernel to panels.
const int64_t kTokenCounts[] = {1, 3, 4, 5, 17, 64, 130};

bool is_quant(GgmlType t) {
  return t == GgmlType::kQ4_0 || t == GgmlType::kQ4_1 || t == GgmlType::kQ8_0;
}

struct Expected {
  std::vector<double> emu;    // the kernel's arithmetic done exactly in double
  std::vector<double> tight;  // float rounding bound around emu
  std::vector<double> loose;  // activation rounding bound around matmul_reference
};

// Emulates what matmul must compute, in double: for quantized weights the
// activations quantized as llama.cpp does (quantize_row_q8_0 / q8_1); for
// F16/BF16 weights the activations rounded to that type.
//   tight: the integer dots are exact; the kernels scale them in float and
//     sum in float. Some scale whole-block sums, others (AVX2, like
//     llama.cpp's) scale per-lane partial sums of 4 products before adding
//     the lanes, so the bound is taken over |w_hat*x_hat| per element, which
//     covers any grouping: two roundings per term and at most n_terms + 24
//     additions: |y - emu| <= (2*n_terms + 24) * 2^-24 * sum|terms|.
//   loose: |emu - exact| from rounding the activations, computed per block
//     from the actual rounding errors (Q8: <= amax*(1/254 + 2^-11) each).
Expected emulate(const WeightView& w, const std::vector<float>& x, int64_t n_tokens) {
  const int64_t k = w.cols, rows = w.rows;
  Expected e;
  e.emu.assign(rows * n_tokens, 0);
  e.tight.assign(rows * n_tokens, 0);
  e.loose.assign(rows * n_tokens, 0);
  std::vector<float> wr(k);
  const int64_t nb = k / 32;
  // Rounded activations x_hat and, for Q4_1, s per block.
  std::vector<float> xh(x.size());
  std::vector<float> s(is_quant(w.type) ? n_tokens * nb : 0);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xt = x.data() + t * k;
    if (is_quant(w.type)) {
      std::vector<BlockQ8_1> q(nb);
      quantize_row_q8_1(xt, q.data(), k);
      dequantize_row(GgmlType::kQ8_1, q.data(), xh.data() + t * k, k);
      for (int64_t b = 0; b < nb; ++b) s[t * nb + b] = fp16_to_fp32(q[b].s);
    } else if (w.type == GgmlType::kF16) {
      for (int64_t i = 0; i < k; ++i) xh[t * k + i] = fp16_to_fp32(fp32_to_fp16(xt[i]));
    } else if (w.type == GgmlType::kBF16) {
      for (int64_t i = 0; i < k; ++i) xh[t * k + i] = bf16_to_fp32(fp32_to_bf16(xt[i]));
    } else {
      for (int64_t i = 0; i < k; ++i) xh[t * k + i] = xt[i];
    }
  }
  const size_t rb = row_bytes(w.type, k);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + r * rb;
    dequantize_row(w.type, row, wr.data(), k);
    for (int64_t t = 0; t < n_tokens; ++t) {
      const float* xt = x.data() + t * k;
      const float* xht = xh.data() + t * k;
      double sum = 0, abs_terms = 0, loose = 0;
      int64_t n_terms = k;
      if (w.type == GgmlType::kQ4_1) {
        n_terms = 2 * nb;
        for (int64_t b = 0; b < nb; ++b) {
          const auto* blk = reinterpret_cast<const BlockQ4_1*>(row) + b;
          const double m = fp16_to_fp32(blk->m);
          double main = 0, sum_x = 0, err = 0;
          for (int i = 0; i < 32; ++i) {
            const double dq = wr[b * 32 + i] - m;  // d_w * q_w, exact
            main += dq * xht[b * 32 + i];
            abs_terms += std::fabs(dq * xht[b * 32 + i]);
            sum_x += xt[b * 32 + i];
            err += std::fabs(dq) * std::fabs(xht[b * 32 + i] - xt[b * 32 + i]);
          }
          const double ms = m * s[t * nb + b];
          sum += main + ms;
          abs_terms += std::fabs(ms);
          loose += err + std::fabs(m) * std::fabs(s[t * nb + b] - sum_x);
        }
      } else if (is_quant(w.type)) {
        n_terms = nb;
        for (int64_t b = 0; b < nb; ++b) {
          double blk = 0;
          for (int i = 0; i < 32; ++i) {
            blk += static_cast<double>(wr[b * 32 + i]) * xht[b * 32 + i];
            abs_terms += std::fabs(static_cast<double>(wr[b * 32 + i]) * xht[b * 32 + i]);
            loose += std::fabs(wr[b * 32 + i]) * std::fabs(xht[b * 32 + i] - xt[b * 32 + i]);
          }
          sum += blk;
        }
      } else {
        for (int64_t i = 0; i < k; ++i) {
          const double p = static_cast<double>(wr[i]) * xht[i];
          sum += p;
          abs_terms += std::fabs(p);
          loose += std::fabs(wr[i]) * std::fabs(xht[i] - xt[i]);
        }
      }
      const size_t o = t * rows + r;
      e.emu[o] = sum;
      e.tight[o] = (2.0 * n_terms + 24) * kEps * abs_terms + 1e-30;
      e.loose[o] = loose;
    }
  }
  return e;
}

struct MatmulCase {
  GgmlType type;
  int64_t rows, cols;
};

void check_matmul(Isa isa, const MatmulCase& c, ThreadPool& pool, MatmulWorkspace& ws,
                  uint32_t seed) {
  const std::string name(ggml_type_traits(static_cast<uint32_t>(c.type))->name);
  std::vector<float> wf = random_floats(c.rows * c.cols, seed, 0.5f);
  for (int64_t r = 0; r < c.rows; r += 3) add_special_blocks(wf, c.cols, r);
  const std::vector<uint8_t> wq = quantize_matrix(c.type, wf, c.rows, c.cols);
  const WeightView w{c.type, wq.data(), c.rows, c.cols};
  ASSERT_TRUE(check_weight(w).ok()) << check_weight(w).to_string();
  for (int64_t nt : kTokenCounts) {
    SCOPED_TRACE(name + " rows=" + std::to_string(c.rows) + " cols=" + std::to_string(c.cols) +
                 " tokens=" + std::to_string(nt));
    std::vector<float> x = random_floats(nt * c.cols, seed + 1000 + nt);
    if (nt > 1) add_special_blocks(x, c.cols, 1);
    std::vector<float> y(nt * c.rows, NAN), ref(nt * c.rows);
    matmul(w, x.data(), nt, y.data(), pool, ws, isa);
    matmul_reference(w, x.data(), nt, ref.data());
    const Expected e = emulate(w, x, nt);
    for (size_t i = 0; i < y.size(); ++i) {
      ASSERT_LE(std::fabs(y[i] - e.emu[i]), e.tight[i])
          << "row " << i % c.rows << " token " << i / c.rows << " got " << y[i] << " want "
          << e.emu[i];
      // matmul_reference's own float rounding: 2^-24 relative.
      ASSERT_LE(std::fabs(y[i] - ref[i]),
                e.tight[i] + e.loose[i] * 1.0001 + std::fabs(ref[i]) * kEps + 1e-30)
          << "row " << i % c.rows << " token " << i / c.rows;
    }
  }
}

// Shapes: K not a multiple of 256 (576, 160, 1056), rows not a multiple of
// the 16-row panel or 4-row tile (1, 5, 17, 33, 100), float K not a
// multiple of the vector width (7, 67, 577).
TEST_P(CpuConformance, MatmulAllTypesAndShapes) {
  ThreadPool pool(2);
  MatmulWorkspace ws;
  uint32_t seed = 100;
  for (GgmlType type : kAllWeightTypes) {
    const bool q = is_quant(type);
    const MatmulCase cases[] = {
        {type, 1, q ? 32 : 7},       {type, 5, 96}, {type, 17, q ? 576 : 67}, {type, 33, 160},
        {type, 100, q ? 1056 : 577},
    };
    for (const auto& c : cases) check_matmul(isa(), c, pool, ws, seed++);
  }
}

// The real model's shapes (SmolLM2-135M: Q4_1 layers, Q8_0 output).
TEST_P(CpuConformance, MatmulModelShapes) {
  ThreadPool pool(2);
  MatmulWorkspace ws;
  check_matmul(isa(), {GgmlType::kQ4_1, 1536, 576}, pool, ws, 7);
  check_matmul(isa(), {GgmlType::kQ4_1, 576, 1536}, pool, ws, 8);
  check_matmul(isa(), {GgmlType::kQ8_0, 700, 576}, pool, ws, 9);
}

// With d_w = d_x = 1 every block sum is an integer and every partial sum is
// exact in float (< 2^24), so all ISAs must return the exact integer: the
// integer block dots, including Q4_0's -8 and Q8_0's sign handling, and
// Q4_1's m*s term, have no rounding to hide behind.
TEST_P(CpuConformance, MatmulIntegerBlocksAreExact) {
  const int64_t rows = 37, k = 576, nb = k / 32;
  std::mt19937 rng(21);
  std::uniform_int_distribution<int> nib(0, 15), i8(-127, 127);
  ThreadPool pool(3);
  MatmulWorkspace ws;
  for (GgmlType type : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0}) {
    std::vector<uint8_t> wq(row_bytes(type, k) * rows);
    std::vector<int> wint(rows * k);  // integer weight values
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* blk = wq.data() + r * row_bytes(type, k) + b * (row_bytes(type, k) / nb);
        const fp16_t one = fp32_to_fp16(1.0f);
        const int m = (r + b) % 5 - 2;
        std::memcpy(blk, &one, 2);
        int* wi = wint.data() + r * k + b * 32;
        if (type == GgmlType::kQ8_0) {
          auto* q = reinterpret_cast<BlockQ8_0*>(blk);
          for (int i = 0; i < 32; ++i) wi[i] = q->qs[i] = static_cast<int8_t>(i8(rng));
          continue;
        }
        uint8_t* qs = type == GgmlType::kQ4_0 ? reinterpret_cast<BlockQ4_0*>(blk)->qs
                                              : reinterpret_cast<BlockQ4_1*>(blk)->qs;
        if (type == GgmlType::kQ4_1) {
          const fp16_t mh = fp32_to_fp16(static_cast<float>(m));
          std::memcpy(blk + 2, &mh, 2);
        }
        for (int i = 0; i < 16; ++i) {
          const int lo = nib(rng), hi = nib(rng);
          qs[i] = static_cast<uint8_t>(lo | (hi << 4));
          const int off = type == GgmlType::kQ4_0 ? -8 : m;
          wi[i] = lo + off;
          wi[i + 16] = hi + off;
        }
      }
    }
    for (int64_t nt : {1, 3, 17}) {
      // Integer activations with a 127 in each block: d = 1, q = x exactly.
      std::vector<float> x(nt * k);
      for (int64_t i = 0; i < nt * k; ++i)
        x[i] = i % 32 == 7 ? 127.0f : static_cast<float>(i8(rng));
      std::vector<float> y(nt * rows);
      const WeightView w{type, wq.data(), rows, k};
      matmul(w, x.data(), nt, y.data(), pool, ws, isa());
      for (int64_t t = 0; t < nt; ++t) {
        for (int64_t r = 0; r < rows; ++r) {
          int64_t want = 0;
          for (int64_t i = 0; i < k; ++i)
            want += int64_t{wint[r * k + i]} * static_cast<int>(x[t * k + i]);
          ASSERT_EQ(y[t * rows + r], static_cast<float>(want))
              << ggml_type_traits(static_cast<uint32_t>(type))->name << " row " << r << " token "
              << t;
        }
      }
    }
  }
}

// Results do not depend on how rows are split across threads: each output
// is computed by one kernel call in a fixed order.
TEST_P(CpuConformance, MatmulIndependentOfThreadCount) {
  for (GgmlType type : kAllWeightTypes) {
    const int64_t rows = 83, k = 320, nt = 9;
    const std::vector<float> wf = random_floats(rows * k, 31);
    const std::vector<uint8_t> wq = quantize_matrix(type, wf, rows, k);
    const std::vector<float> x = random_floats(nt * k, 32);
    const WeightView w{type, wq.data(), rows, k};
    std::vector<float> first;
    for (int threads : {1, 2, 3}) {
      ThreadPool pool(threads);
      MatmulWorkspace ws;
      std::vector<float> y(nt * rows);
      matmul(w, x.data(), nt, y.data(), pool, ws, isa());
      if (first.empty()) {
        first = y;
      } else {
        ASSERT_EQ(0, std::memcmp(first.data(), y.data(), y.size() * sizeof(float))) << threads;
      }
    }
  }
}

TEST(Matmul, WorkspaceStopsAllocatingAfterReserve) {
  ThreadPool pool(2);
  MatmulWorkspace ws;
  ws.reserve(64, 1536, 2);
  const size_t reserved = ws.allocated_bytes();
  for (GgmlType type : kAllWeightTypes) {
    const int64_t rows = 48, k = 1536;
    const std::vector<uint8_t> wq = quantize_matrix(type, random_floats(rows * k, 1), rows, k);
    const std::vector<float> x = random_floats(64 * k, 2);
    std::vector<float> y(64 * rows);
    for (int64_t nt : {64, 1, 17}) {
      matmul({type, wq.data(), rows, k}, x.data(), nt, y.data(), pool, ws, best_isa());
    }
  }
  EXPECT_EQ(ws.allocated_bytes(), reserved);
}

// One workspace used with pools of growing size (its per-thread scratch
// vector reallocates) keeps working.
TEST(Matmul, WorkspaceSurvivesGrowingPools) {
  MatmulWorkspace ws;
  const int64_t rows = 40, k = 256, nt = 9;
  const std::vector<uint8_t> wq =
      quantize_matrix(GgmlType::kQ4_1, random_floats(rows * k, 3), rows, k);
  const std::vector<float> x = random_floats(nt * k, 4);
  std::vector<float> first(nt * rows), y(nt * rows);
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    matmul({GgmlType::kQ4_1, wq.data(), rows, k}, x.data(), nt, y.data(), pool, ws, best_isa());
    if (threads == 1) first = y;
    ASSERT_EQ(0, std::memcmp(first.data(), y.data(), y.size() * sizeof(float))) << threads;
  }
}

TEST(Matmul, CheckWeightRejectsBadViews) {
  uint8_t buf[64] = {};
  EXPECT_TRUE(check_weight({GgmlType::kQ4_1, buf, 1, 32}).ok());
  EXPECT_EQ(check_weight({GgmlType::kQ4_1, buf, 1, 33}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(check_weight({GgmlType::kQ4_K, buf, 1, 256}).code(), StatusCode::kUnimplemented);
  EXPECT_EQ(check_weight({GgmlType::kF32, buf, 0, 4}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(check_weight({GgmlType::kF32, nullptr, 1, 4}).code(), StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------- ops

const int64_t kOpSizes[] = {1, 7, 8, 15, 16, 17, 31, 33, 64, 576, 1000, 1536};

// Two float roundings (x*scale, *w) plus ~3 ulp in 1/sqrt: 8 ulp relative.
TEST_P(CpuConformance, RmsNorm) {
  for (int64_t n : kOpSizes) {
    const std::vector<float> x = random_floats(n, 40 + n, 3.0f), w = random_floats(n, 41 + n);
    std::vector<float> out(n);
    rms_norm(x.data(), w.data(), out.data(), n, 1e-5f, isa());
    double ss = 0;
    for (float v : x) ss += static_cast<double>(v) * v;
    const double scale = 1.0 / std::sqrt(ss / n + 1e-5);
    for (int64_t i = 0; i < n; ++i) {
      const double want = x[i] * scale * w[i];
      ASSERT_NEAR(out[i], want, std::fabs(want) * 8 * kEps + 1e-30) << "n=" << n << " i=" << i;
    }
    // In place.
    std::vector<float> y = x;
    rms_norm(y.data(), w.data(), y.data(), n, 1e-5f, isa());
    ASSERT_EQ(0, std::memcmp(y.data(), out.data(), n * sizeof(float)));
  }
}

// Against double-precision angles pos * base^(-2i/d): the float angles are
// built by repeated multiplication (as llama.cpp does), so angle i is off by
// up to (i + 2) ulps of theta_i; sin/cos and the rotation add a few ulps of
// |x0| + |x1|. Across ISAs (same angles) only the rotation differs: 4 ulp.
TEST_P(CpuConformance, RopeNorm) {
  for (int64_t head_dim : {2, 64, 96, 128, 160}) {
    for (int64_t n_heads : {1, 3, 9}) {
      for (int64_t pos : {0, 1, 7, 100, 4095}) {
        const float base = head_dim == 96 ? 500000.0f : 10000.0f;
        const std::vector<float> x = random_floats(n_heads * head_dim, 50 + pos + head_dim);
        std::vector<float> got = x, scalar = x;
        rope_norm(got.data(), n_heads, head_dim, pos, base, isa());
        rope_norm(scalar.data(), n_heads, head_dim, pos, base, Isa::kScalar);
        for (int64_t h = 0; h < n_heads; ++h) {
          for (int64_t i = 0; i < head_dim / 2; ++i) {
            const int64_t j = h * head_dim + 2 * i;
            const double theta = pos * std::pow(static_cast<double>(base), -2.0 * i / head_dim);
            const double c = std::cos(theta), s = std::sin(theta);
            const double x0 = x[j], x1 = x[j + 1], mag = std::fabs(x0) + std::fabs(x1);
            const double tol = mag * (theta * (i + 2) * 2 * kEps + 8 * kEps);
            ASSERT_NEAR(got[j], x0 * c - x1 * s, tol) << head_dim << " " << pos << " pair " << i;
            ASSERT_NEAR(got[j + 1], x0 * s + x1 * c, tol)
                << head_dim << " " << pos << " pair " << i;
            ASSERT_NEAR(got[j], scalar[j], mag * 4 * kEps);
            ASSERT_NEAR(got[j + 1], scalar[j + 1], mag * 4 * kEps);
          }
        }
      }
    }
  }
}

// silu(g)*u: exp to ~2 ulp (SIMD polynomial) or libm, then +1, /, *: 8 ulp
// relative. Large |g| checks overflow/underflow of e^-g (result -> 0 or g*u).
TEST_P(CpuConformance, Swiglu) {
  for (int64_t n : kOpSizes) {
    std::vector<float> g = random_floats(n, 60 + n, 4.0f);
    const std::vector<float> u = random_floats(n, 61 + n);
    if (n > 8) {
      g[1] = -100.0f;
      g[2] = 100.0f;
      g[3] = -88.0f;
      g[4] = 0.0f;
    }
    std::vector<float> out(n);
    swiglu(g.data(), u.data(), out.data(), n, isa());
    for (int64_t i = 0; i < n; ++i) {
      const double want = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
      ASSERT_NEAR(out[i], want, std::fabs(want) * 8 * kEps + 1e-35) << "n=" << n << " g=" << g[i];
    }
  }
}

// exp(x - max) has ~2 ulp of its own plus |x - max| ulps from the rounded
// subtraction; the float sum adds n ulps relative to the total.
TEST_P(CpuConformance, Softmax) {
  for (int64_t n : kOpSizes) {
    std::vector<float> x = random_floats(n, 70 + n, 5.0f);
    if (n > 8) x[5] = -1e30f;  // underflows to exactly 0
    std::vector<float> y = x;
    softmax_inplace(y.data(), n, isa());
    double mx = -INFINITY, sum = 0;
    for (float v : x) mx = std::max(mx, static_cast<double>(v));
    for (float v : x) sum += std::exp(v - mx);
    for (int64_t i = 0; i < n; ++i) {
      const double want = std::exp(x[i] - mx) / sum;
      const double tol = want * (std::fabs(x[i] - mx) + 8 + n) * kEps + 1e-37;
      ASSERT_NEAR(y[i], want, tol) << "n=" << n << " i=" << i;
    }
  }
}

// Float dot products: any summation order of n products is within
// (n + 2) ulps of sum|a*b|.
TEST_P(CpuConformance, DotProducts) {
  for (int64_t n : kOpSizes) {
    const std::vector<float> a = random_floats(n, 80 + n), b = random_floats(n, 81 + n);
    std::vector<fp16_t> ah(n);
    convert_f32_to_f16(a.data(), ah.data(), n, Isa::kScalar);
    double want = 0, want_h = 0, mag = 0, mag_h = 0;
    for (int64_t i = 0; i < n; ++i) {
      want += static_cast<double>(a[i]) * b[i];
      mag += std::fabs(static_cast<double>(a[i]) * b[i]);
      want_h += static_cast<double>(fp16_to_fp32(ah[i])) * b[i];
      mag_h += std::fabs(static_cast<double>(fp16_to_fp32(ah[i])) * b[i]);
    }
    EXPECT_NEAR(dot_f32(a.data(), b.data(), n, isa()), want, (n + 2) * kEps * mag) << n;
    EXPECT_NEAR(dot_f16_f32(ah.data(), b.data(), n, isa()), want_h, (n + 2) * kEps * mag_h) << n;
  }
}

// y + alpha*x: one fused or two separate roundings: 2 ulp of |y| + |alpha*x|.
// add_inplace is a single correctly rounded add: bit-exact.
TEST_P(CpuConformance, AxpyAndAdd) {
  for (int64_t n : kOpSizes) {
    const std::vector<float> x = random_floats(n, 90 + n), y0 = random_floats(n, 91 + n);
    std::vector<fp16_t> xh(n);
    convert_f32_to_f16(x.data(), xh.data(), n, Isa::kScalar);
    std::vector<float> y = y0;
    axpy_f16(0.37f, xh.data(), y.data(), n, isa());
    for (int64_t i = 0; i < n; ++i) {
      const double ax = 0.37 * fp16_to_fp32(xh[i]);
      ASSERT_NEAR(y[i], y0[i] + ax, (std::fabs(y0[i]) + std::fabs(ax)) * 2 * kEps) << n;
    }
    y = y0;
    add_inplace(y.data(), x.data(), n, isa());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(y[i], y0[i] + x[i]) << n;
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, CpuConformance,
                         ::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512),
                         [](const ::testing::TestParamInfo<Isa>& p) { return isa_name(p.param); });

// -------------------------------------------------------------- thread pool

// Every index runs exactly once per run(), and run() returns only after all
// of them finished (the owner sees every slot stamped with this iteration).
// 3 threads on this 2-core machine also covers oversubscription.
void check_pool(int n_threads, int spin_us) {
  ThreadPool pool(n_threads, spin_us);
  ASSERT_EQ(pool.size(), n_threads);
  std::vector<std::atomic<int>> counts(n_threads);
  std::vector<int> stamp(n_threads, -1);
  for (int iter = 0; iter < 10000; ++iter) {
    pool.run([&](int index, int n) {
      ASSERT_EQ(n, n_threads);
      counts[index].fetch_add(1, std::memory_order_relaxed);
      stamp[index] = iter;
    });
    for (int i = 0; i < n_threads; ++i) ASSERT_EQ(stamp[i], iter) << "thread " << i;
  }
  for (int i = 0; i < n_threads; ++i) EXPECT_EQ(counts[i].load(), 10000) << "thread " << i;
}

TEST(ThreadPool, RunsEveryIndexOnceOneThread) {
  check_pool(1, ThreadPool::kDefaultSpinUs);
}
TEST(ThreadPool, RunsEveryIndexOnceTwoThreads) {
  check_pool(2, ThreadPool::kDefaultSpinUs);
}
TEST(ThreadPool, RunsEveryIndexOnceThreeThreads) {
  check_pool(3, ThreadPool::kDefaultSpinUs);
}
// spin_us = 0: workers and owner go straight to the futex every time.
TEST(ThreadPool, RunsEveryIndexOnceWithoutSpinning) {
  check_pool(3, 0);
}

TEST(ThreadPool, AcceptsStdFunctionAndSplitsWork) {
  ThreadPool pool(3);
  std::vector<int> data(1000, 0);
  const std::function<void(int, int)> fn = [&](int i, int n) {
    for (size_t j = data.size() * i / n; j < data.size() * (i + 1) / n; ++j) data[j] += 1;
  };
  for (int iter = 0; iter < 100; ++iter) pool.run(fn);
  for (int v : data) ASSERT_EQ(v, 100);
}

// run_shares: every share exactly once, `thread` in range, and never two
// shares at once on the same `thread` (so per-thread scratch is safe). 70000
// shares need more than one internal round (a round holds up to 65535).
TEST(ThreadPool, RunSharesRunsEveryShareOnce) {
  for (int n_threads : {1, 2, 3}) {
    ThreadPool pool(n_threads);
    std::vector<std::atomic<int>> busy(n_threads);
    for (int64_t n_shares : {0, 1, 2, 7, 1000, 70000}) {
      std::vector<std::atomic<int>> runs(n_shares);
      std::atomic<bool> bad_thread{false}, overlap{false};
      pool.run_shares(n_shares, [&](int64_t share, int thread) {
        if (thread < 0 || thread >= n_threads) {
          bad_thread = true;
          return;
        }
        if (busy[thread].exchange(1) != 0) overlap = true;
        runs[share].fetch_add(1, std::memory_order_relaxed);
        busy[thread].store(0);
      });
      EXPECT_FALSE(bad_thread);
      EXPECT_FALSE(overlap);
      for (int64_t i = 0; i < n_shares; ++i) {
        ASSERT_EQ(runs[i].load(), 1)
            << "threads " << n_threads << " shares " << n_shares << " share " << i;
      }
    }
  }
}

// Many small regions back to back with varying share counts (the decode
// pattern), with and without spinning.
TEST(ThreadPool, ReusableAcrossManyRegions) {
  for (int spin_us : {ThreadPool::kDefaultSpinUs, 0}) {
    ThreadPool pool(2, spin_us);
    std::vector<int> hits(8, 0);
    for (int iter = 0; iter < 10000; ++iter) {
      const int64_t n = 1 + iter % 8;
      pool.run_shares(n, [&](int64_t share, int) { hits[share] += 1; });
    }
    for (int i = 0; i < 8; ++i) EXPECT_EQ(hits[i], 10000 / 8 * (8 - i)) << i;
  }
}

TEST(ThreadPool, ZeroMeansHardwareConcurrency) {
  ThreadPool pool(0);
  EXPECT_GE(pool.size(), 1);
}

}  // namespace
}  // namespace kvgate::engine::cpu
