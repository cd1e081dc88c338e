// Conformance of the CUDA kernels against the CPU backend (label gpu): GEMV,
// activation quantization, RMSNorm, RoPE, SwiGLU, sampling and the KV page
// copies, on random inputs and awkward shapes. Tolerances follow
// tests/unit/engine/cpu_conformance_test.cpp: each says where it comes
// from. Without a device every test skips.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/matmul.h"
#include "engine/cpu/ops.h"
#include "engine/cpu/quant.h"
#include "engine/cpu/thread_pool.h"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/sampling_plan.h"
#include "engine/sampler.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::engine::cuda {
namespace {

using testing::device_zeros;
using testing::to_device;
using testing::to_host;

constexpr double kEps = 1.0 / (1 << 24);  // float unit roundoff

void sync() {
  const Status s = cuda_status(cudaDeviceSynchronize(), "synchronize");
  ASSERT_TRUE(s.ok()) << s.to_string();
}

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

// ---------------------------------------------------------------- quantization

// The activation quantizer gives the CPU's blocks bit for bit (qs, d, s),
// including an all-zero block, an outlier and round-half-even ties.
TEST(CudaConformance, ActivationQuantizationMatchesCpuBitForBit) {
  KVGATE_REQUIRE_GPU();
  const int64_t tokens = 3, cols = 1536, nb = cols / 32;
  std::vector<float> x = random_floats(tokens * cols, 1, 2.0f);
  for (int i = 0; i < 32; ++i) x[i] = 0.0f;
  x[32 + 5] = 40.0f;
  for (int i = 64; i < 96; ++i) x[i] = static_cast<float>(i - 80) * 0.5f;
  DeviceBuffer xd = to_device(x);
  DeviceBuffer qs = device_zeros<int8_t>(tokens * cols), d = device_zeros<float>(tokens * nb),
               s = device_zeros<float>(tokens * nb);
  ASSERT_EQ(kernels::quantize_q8(xd.as<float>(), tokens, cols, qs.as<int8_t>(), d.as<float>(),
                                 s.as<float>(), true, nullptr),
            cudaSuccess);
  sync();
  const auto gq = to_host<int8_t>(qs, tokens * cols);
  const auto gd = to_host<float>(d, tokens * nb), gs = to_host<float>(s, tokens * nb);
  std::vector<BlockQ8_1> want(tokens * nb);
  cpu::quantize_row_q8_1(x.data(), want.data(), tokens * cols);
  for (int64_t b = 0; b < tokens * nb; ++b) {
    ASSERT_EQ(gd[b], fp16_to_fp32(want[b].d)) << "block " << b;
    ASSERT_EQ(gs[b], fp16_to_fp32(want[b].s)) << "block " << b;
    ASSERT_EQ(0, std::memcmp(gq.data() + b * 32, want[b].qs, 32)) << "block " << b;
  }
}

// ---------------------------------------------------------------- GEMV

std::vector<uint8_t> quantize_matrix(GgmlType type, const std::vector<float>& w, int64_t rows,
                                     int64_t cols) {
  const size_t rb = *ggml_row_bytes(type, cols);
  std::vector<uint8_t> out(rb * rows);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::quantize_row(type, w.data() + r * cols, out.data() + r * rb, cols);
  }
  return out;
}

// The kernel's arithmetic in double: per block d_w d_x (exact integer dot)
// (+ m_w s_x) for Q4_1/Q8_0 with the CPU's quantized activations; fp16
// weights times fp16-rounded activations for F16. The GPU adds these terms
// in float in another order: (2 * terms + 24) ulps of their absolute sum.
struct Expected {
  std::vector<double> value, tol;
};

Expected emulate(GgmlType type, const std::vector<uint8_t>& wq, int64_t rows, int64_t cols,
                 const std::vector<float>& x, int64_t tokens) {
  Expected e{std::vector<double>(tokens * rows), std::vector<double>(tokens * rows)};
  const size_t rb = *ggml_row_bytes(type, cols);
  const int64_t nb = cols / 32;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<BlockQ8_1> xq(type == GgmlType::kF16 ? 0 : nb);
    if (type != GgmlType::kF16) cpu::quantize_row_q8_1(x.data() + t * cols, xq.data(), cols);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* row = wq.data() + r * rb;
      double sum = 0, abs_sum = 0;
      int64_t n_terms = 0;
      if (type == GgmlType::kF16) {
        const auto* h = reinterpret_cast<const fp16_t*>(row);
        for (int64_t k = 0; k < cols; ++k) {
          const double p =
              static_cast<double>(fp16_to_fp32(h[k])) * fp16_to_fp32(fp32_to_fp16(x[t * cols + k]));
          sum += p;
          abs_sum += std::fabs(p);
        }
        n_terms = cols;
      } else {
        for (int64_t b = 0; b < nb; ++b) {
          int isum = 0;
          double term;
          const double dx = fp16_to_fp32(xq[b].d);
          if (type == GgmlType::kQ4_1) {
            const auto* blk = reinterpret_cast<const BlockQ4_1*>(row) + b;
            for (int i = 0; i < 16; ++i) {
              isum += (blk->qs[i] & 0x0f) * xq[b].qs[i] + (blk->qs[i] >> 4) * xq[b].qs[i + 16];
            }
            const double a = fp16_to_fp32(blk->d) * dx * isum;
            const double m = static_cast<double>(fp16_to_fp32(blk->m)) * fp16_to_fp32(xq[b].s);
            term = a + m;
            abs_sum += std::fabs(a) + std::fabs(m);
          } else {
            const auto* blk = reinterpret_cast<const BlockQ8_0*>(row) + b;
            for (int i = 0; i < 32; ++i) isum += blk->qs[i] * xq[b].qs[i];
            term = fp16_to_fp32(blk->d) * dx * isum;
            abs_sum += std::fabs(term);
          }
          sum += term;
        }
        n_terms = 2 * nb;
      }
      e.value[t * rows + r] = sum;
      e.tol[t * rows + r] = (2.0 * n_terms + 24) * kEps * abs_sum + 1e-30;
    }
  }
  return e;
}

void check_gemv(GgmlType type, int64_t rows, int64_t cols, uint32_t seed) {
  const std::string name(ggml_type_traits(static_cast<uint32_t>(type))->name);
  std::vector<float> wf = random_floats(rows * cols, seed, 0.5f);
  const std::vector<uint8_t> wq = quantize_matrix(type, wf, rows, cols);
  DeviceBuffer wd = to_device(wq);
  cpu::ThreadPool pool(2);
  cpu::MatmulWorkspace ws;
  for (int64_t tokens : {1, 3, 8, 9, 17}) {
    SCOPED_TRACE(name + " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                 " tokens=" + std::to_string(tokens));
    auto plan = plan_gemv(type, rows, cols, tokens);
    ASSERT_TRUE(plan.ok()) << plan.status().to_string();
    const std::vector<float> x = random_floats(tokens * cols, seed + 100 + tokens);
    DeviceBuffer xd = to_device(x);
    DeviceBuffer yd = device_zeros<float>(tokens * rows);
    auto work = DeviceBuffer::allocate(plan->workspace_bytes);
    ASSERT_TRUE(work.ok());
    const Status st =
        gemv(*plan, wd.data(), xd.as<float>(), tokens, yd.as<float>(), work->data(), nullptr);
    ASSERT_TRUE(st.ok()) << st.to_string();
    sync();
    const auto y = to_host<float>(yd, tokens * rows);
    std::vector<float> cpu_y(tokens * rows);
    cpu::matmul({type, wq.data(), rows, cols}, x.data(), tokens, cpu_y.data(), pool, ws,
                cpu::Isa::kScalar);
    const Expected e = emulate(type, wq, rows, cols, x, tokens);
    for (size_t i = 0; i < y.size(); ++i) {
      ASSERT_LE(std::fabs(y[i] - e.value[i]), e.tol[i])
          << "row " << i % rows << " token " << i / rows << " got " << y[i];
      // The CPU is within the same bound of the same sum.
      ASSERT_LE(std::fabs(y[i] - cpu_y[i]), 2 * e.tol[i])
          << "row " << i % rows << " token " << i / rows << " cpu " << cpu_y[i];
    }
  }
}

// Rows not a multiple of the 4 rows a block takes, K not a multiple of
// 32 blocks (one per lane), token counts across the 8-token passes.
TEST(CudaConformance, GemvAllTypesAndShapes) {
  KVGATE_REQUIRE_GPU();
  uint32_t seed = 10;
  for (GgmlType type : {GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kF16}) {
    const bool q = type != GgmlType::kF16;
    check_gemv(type, 1, q ? 32 : 6, seed++);
    check_gemv(type, 5, 96, seed++);
    check_gemv(type, 17, q ? 576 : 66, seed++);
    check_gemv(type, 33, 160, seed++);
    check_gemv(type, 100, q ? 1056 : 578, seed++);
  }
}

// SmolLM2-135M's shapes (Q4_1 layers, Q8_0 output) and a Llama-8B F16 one.
TEST(CudaConformance, GemvModelShapes) {
  KVGATE_REQUIRE_GPU();
  check_gemv(GgmlType::kQ4_1, 1536, 576, 1);
  check_gemv(GgmlType::kQ4_1, 576, 1536, 2);
  check_gemv(GgmlType::kQ8_0, 700, 576, 3);
  check_gemv(GgmlType::kF16, 512, 4096, 4);
}

TEST(CudaConformance, GemvRejectsBadCalls) {
  KVGATE_REQUIRE_GPU();
  auto plan = plan_gemv(GgmlType::kQ4_1, 4, 64, 2);
  ASSERT_TRUE(plan.ok());
  DeviceBuffer buf = device_zeros<float>(1024);
  EXPECT_FALSE(gemv(*plan, buf.data(), buf.as<float>(), 3, buf.as<float>(), buf.data(), nullptr)
                   .ok());  // more tokens than planned
  EXPECT_FALSE(gemv(*plan, buf.data(), buf.as<float>(), 1, buf.as<float>(), nullptr, nullptr)
                   .ok());  // no workspace
  EXPECT_FALSE(gemv(*plan, nullptr, buf.as<float>(), 1, buf.as<float>(), buf.data(), nullptr).ok());
}

// ---------------------------------------------------------------- row ops

TEST(CudaConformance, RmsNorm) {
  KVGATE_REQUIRE_GPU();
  for (int64_t n : {1, 7, 64, 576, 1000, 4097}) {
    const int64_t rows = 3;
    const std::vector<float> x = random_floats(rows * n, 40 + n, 3.0f),
                             w = random_floats(n, 41 + n);
    DeviceBuffer xd = to_device(x), wd = to_device(w), od = device_zeros<float>(rows * n);
    ASSERT_TRUE(
        rms_norm(xd.as<float>(), wd.as<float>(), od.as<float>(), rows, n, 1e-5f, nullptr).ok());
    // In place on a copy.
    DeviceBuffer yd = to_device(x);
    ASSERT_TRUE(
        rms_norm(yd.as<float>(), wd.as<float>(), yd.as<float>(), rows, n, 1e-5f, nullptr).ok());
    sync();
    const auto out = to_host<float>(od, rows * n), inplace = to_host<float>(yd, rows * n);
    ASSERT_EQ(0, std::memcmp(out.data(), inplace.data(), out.size() * sizeof(float)));
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<float> cpu_out(n);
      cpu::rms_norm(x.data() + r * n, w.data(), cpu_out.data(), n, 1e-5f, cpu::Isa::kScalar);
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[r * n + i]) * x[r * n + i];
      const double scale = 1.0 / std::sqrt(ss / n + 1e-5);
      for (int64_t i = 0; i < n; ++i) {
        const double want = x[r * n + i] * scale * w[i];
        const float got = out[r * n + i];
        ASSERT_NEAR(got, want, std::fabs(want) * 8 * kEps + 1e-30) << "n=" << n << " i=" << i;
        // Same operations as the CPU scalar kernel; the double sum of squares
        // may round differently in its last bits: 2 ulp.
        ASSERT_NEAR(got, cpu_out[i], std::fabs(cpu_out[i]) * 2 * kEps + 1e-30);
      }
    }
  }
}

// Same angles as the CPU (the same float chain); sincosf adds up to 2 ulp
// on sin and cos: 8 ulp of |x0| + |x1| against the CPU, and the CPU test's
// bound against double-precision angles.
TEST(CudaConformance, RopeNorm) {
  KVGATE_REQUIRE_GPU();
  const std::vector<int32_t> positions = {0, 1, 7, 100, 4095};
  const int64_t rows = static_cast<int64_t>(positions.size());
  DeviceBuffer pd = to_device(positions);
  for (int64_t head_dim : {2, 64, 96, 128, 160}) {
    for (int64_t n_heads : {1, 3, 9}) {
      const float base = head_dim == 96 ? 500000.0f : 10000.0f;
      const std::vector<float> x = random_floats(rows * n_heads * head_dim, 50 + head_dim);
      DeviceBuffer xd = to_device(x);
      ASSERT_TRUE(
          rope_norm(xd.as<float>(), rows, n_heads, head_dim, pd.as<int32_t>(), base, nullptr).ok());
      sync();
      const auto got = to_host<float>(xd, x.size());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = positions[r];
        std::vector<float> cpu_row(x.begin() + r * n_heads * head_dim,
                                   x.begin() + (r + 1) * n_heads * head_dim);
        cpu::rope_norm(cpu_row.data(), n_heads, head_dim, pos, base, cpu::Isa::kScalar);
        for (int64_t h = 0; h < n_heads; ++h) {
          for (int64_t i = 0; i < head_dim / 2; ++i) {
            const int64_t j = h * head_dim + 2 * i, o = r * n_heads * head_dim + j;
            const double theta = pos * std::pow(static_cast<double>(base), -2.0 * i / head_dim);
            const double c = std::cos(theta), s = std::sin(theta);
            const double x0 = x[o], x1 = x[o + 1], mag = std::fabs(x0) + std::fabs(x1);
            const double tol = mag * (theta * (i + 2) * 2 * kEps + 8 * kEps);
            ASSERT_NEAR(got[o], x0 * c - x1 * s, tol) << head_dim << " " << pos << " pair " << i;
            ASSERT_NEAR(got[o + 1], x0 * s + x1 * c, tol) << head_dim << " " << pos << " " << i;
            ASSERT_NEAR(got[o], cpu_row[j], mag * 8 * kEps);
            ASSERT_NEAR(got[o + 1], cpu_row[j + 1], mag * 8 * kEps);
          }
        }
      }
    }
  }
}

// silu(g)*u with the device's expf (2 ulp): 8 ulp relative, as on the CPU.
TEST(CudaConformance, Swiglu) {
  KVGATE_REQUIRE_GPU();
  for (int64_t n : {1, 5, 255, 1536, 100003}) {
    std::vector<float> g = random_floats(n, 60 + n, 4.0f), u = random_floats(n, 61 + n);
    if (n > 4) {
      g[0] = 100.0f;
      g[1] = -100.0f;
      g[2] = 0.0f;
    }
    DeviceBuffer gd = to_device(g), ud = to_device(u), od = device_zeros<float>(n);
    ASSERT_TRUE(swiglu(gd.as<float>(), ud.as<float>(), od.as<float>(), n, nullptr).ok());
    ASSERT_TRUE(swiglu(gd.as<float>(), ud.as<float>(), gd.as<float>(), n, nullptr).ok());  // alias
    sync();
    const auto out = to_host<float>(od, n), aliased = to_host<float>(gd, n);
    std::vector<float> cpu_out(n);
    cpu::swiglu(g.data(), u.data(), cpu_out.data(), n, cpu::Isa::kScalar);
    for (int64_t i = 0; i < n; ++i) {
      const double want = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
      ASSERT_NEAR(out[i], want, std::fabs(want) * 8 * kEps + 1e-35) << "n=" << n << " g=" << g[i];
      ASSERT_NEAR(out[i], cpu_out[i], std::fabs(want) * 8 * kEps + 1e-35);
      ASSERT_EQ(out[i], aliased[i]);
    }
  }
}

// ---------------------------------------------------------------- KV copies

// Gather pages (one of them misaligned, forcing the byte path) into the
// staging image and scatter it back into fresh pages.
TEST(CudaConformance, PageGatherAndScatter) {
  KVGATE_REQUIRE_GPU();
  for (int64_t page_bytes : {4096, 100}) {
    const int64_t n_pages = 37;
    auto plan = plan_page_copy(n_pages, page_bytes);
    ASSERT_TRUE(plan.ok());
    // A pool of 2 * n_pages slots (+16 bytes of slack); page i at a shuffled slot.
    const int64_t slot = page_bytes + 16;
    std::vector<uint8_t> pool(2 * n_pages * slot);
    std::mt19937 rng(page_bytes);
    for (auto& b : pool) b = static_cast<uint8_t>(rng());
    DeviceBuffer pool_d = to_device(pool);
    std::vector<int64_t> slots(2 * n_pages);
    for (int64_t i = 0; i < 2 * n_pages; ++i) slots[i] = i;
    std::shuffle(slots.begin(), slots.end(), rng);
    std::vector<const void*> src(n_pages);
    std::vector<void*> dst(n_pages);
    std::vector<uint8_t> want;
    for (int64_t i = 0; i < n_pages; ++i) {
      const int64_t off = slots[i] * slot + (i == 5 ? 2 : 0);
      src[i] = pool_d.as<uint8_t>() + off;
      want.insert(want.end(), pool.begin() + off, pool.begin() + off + page_bytes);
      dst[i] = pool_d.as<uint8_t>() + slots[n_pages + i] * slot + (i == 7 ? 1 : 0);
    }
    DeviceBuffer src_d = to_device(src), dst_d = to_device(dst);
    DeviceBuffer staging = device_zeros<uint8_t>(plan->staging_bytes);
    ASSERT_TRUE(gather_pages(*plan, src_d.as<const void* const>(), staging.data(), nullptr).ok());
    sync();
    ASSERT_EQ(to_host<uint8_t>(staging, plan->staging_bytes), want);
    ASSERT_TRUE(scatter_pages(*plan, staging.data(), dst_d.as<void* const>(), nullptr).ok());
    sync();
    const auto after = to_host<uint8_t>(pool_d, pool.size());
    for (int64_t i = 0; i < n_pages; ++i) {
      const auto* p = after.data() + (static_cast<const uint8_t*>(dst[i]) - pool_d.as<uint8_t>());
      ASSERT_EQ(0, std::memcmp(p, want.data() + i * page_bytes, page_bytes)) << "page " << i;
    }
  }
}

// ---------------------------------------------------------------- sampling

// Logits with many exact ties (multiples of 1/4), so top-k thresholds fall
// inside runs of equal values and the lowest-id rule decides.
std::vector<float> tied_logits(size_t n, uint32_t seed) {
  std::vector<float> v = random_floats(n, seed, 3.0f);
  for (auto& f : v) f = std::round(f * 4.0f) / 4.0f;
  return v;
}

// The GPU's pick equals the oracle's at u, or (device expf differing by an
// ulp from the CPU's) the oracle's at u +- 1e-6, i.e. u fell on a boundary.
void expect_sampled(const std::vector<float>& logits, const SampleRow& row, int32_t got,
                    const std::string& what) {
  const int32_t want = sample_reference(logits, row);
  if (got == want) return;
  SampleRow lo = row, hi = row;
  lo.u = std::max(0.0, row.u - 1e-6);
  hi.u = std::min(std::nextafter(1.0, 0.0), row.u + 1e-6);
  EXPECT_TRUE(got == sample_reference(logits, lo) || got == sample_reference(logits, hi))
      << what << ": got " << got << " want " << want;
}

TEST(CudaConformance, SamplingMatchesTheOracleAndSampler) {
  KVGATE_REQUIRE_GPU();
  for (int64_t vocab : {7, 1000, 49152, 128256}) {
    for (bool ties : {false, true}) {
      const uint32_t seed = static_cast<uint32_t>(vocab) + ties;
      // A batch of rows: one per parameter set, with different logits.
      std::vector<SampleRow> rows;
      std::vector<SamplingParams> params;
      for (float temp : {0.0f, 0.7f, 1.0f, 2.5f}) {
        for (int32_t top_k : {0, 1, 40, 1024, 5000}) {
          for (float top_p : {1.0f, 0.9f, 0.2f}) {
            SamplingParams p;
            p.temperature = temp;
            p.top_k = top_k;
            p.top_p = top_p;
            p.min_p = top_k == 40 ? 0.05f : 0.0f;
            p.seed = rows.size() + seed;
            std::mt19937_64 rng(p.seed);
            rows.push_back({p.temperature, p.top_k, p.top_p, p.min_p, sampling_uniform(rng)});
            params.push_back(p);
          }
        }
      }
      const int64_t n_rows = static_cast<int64_t>(rows.size());
      std::vector<float> logits;
      for (int64_t r = 0; r < n_rows; ++r) {
        const auto l =
            ties ? tied_logits(vocab, seed * 131 + r) : random_floats(vocab, seed * 131 + r, 3.0f);
        logits.insert(logits.end(), l.begin(), l.end());
      }
      DeviceBuffer ld = to_device(logits), rd = to_device(rows);
      DeviceBuffer od = device_zeros<int32_t>(n_rows), ad = device_zeros<int32_t>(n_rows);
      ASSERT_TRUE(
          sample(ld.as<float>(), n_rows, vocab, rd.as<SampleRow>(), od.as<int32_t>(), nullptr)
              .ok());
      ASSERT_TRUE(argmax(ld.as<float>(), n_rows, vocab, ad.as<int32_t>(), nullptr).ok());
      sync();
      const auto got = to_host<int32_t>(od, n_rows), greedy = to_host<int32_t>(ad, n_rows);
      for (int64_t r = 0; r < n_rows; ++r) {
        const std::vector<float> row_logits(logits.begin() + r * vocab,
                                            logits.begin() + (r + 1) * vocab);
        const std::string what = "vocab " + std::to_string(vocab) + " ties " +
                                 std::to_string(ties) + " row " + std::to_string(r);
        ASSERT_EQ(greedy[r], engine::argmax(row_logits)) << what;
        expect_sampled(row_logits, rows[r], got[r], what);
        // Where at most 1024 candidates survive, that is engine::Sampler's
        // own choice for the same seed.
        if (params[r].top_k > 0 && params[r].top_k <= kSampleMaxCandidates) {
          Sampler sampler(params[r]);
          const int32_t cpu_pick = sampler.sample(row_logits, {});
          if (cpu_pick != got[r]) {
            expect_sampled(row_logits, rows[r], cpu_pick, what + " (Sampler)");
          }
        }
      }
    }
  }
}

TEST(CudaConformance, ArgmaxSpecialValues) {
  KVGATE_REQUIRE_GPU();
  const float inf = INFINITY, nan = NAN;
  const std::vector<std::vector<float>> cases = {
      {1, 3, 3, 2}, {nan, 1, nan, 2}, {-inf, -inf, -inf}, {nan, -inf, nan}, {inf, 5, inf}};
  for (const auto& c : cases) {
    DeviceBuffer ld = to_device(c), od = device_zeros<int32_t>(1);
    const std::vector<SampleRow> greedy(1);
    DeviceBuffer rd = to_device(greedy), sd = device_zeros<int32_t>(1);
    ASSERT_TRUE(argmax(ld.as<float>(), 1, c.size(), od.as<int32_t>(), nullptr).ok());
    ASSERT_TRUE(
        sample(ld.as<float>(), 1, c.size(), rd.as<SampleRow>(), sd.as<int32_t>(), nullptr).ok());
    sync();
    EXPECT_EQ(to_host<int32_t>(od, 1)[0], engine::argmax(c));
    EXPECT_EQ(to_host<int32_t>(sd, 1)[0], engine::argmax(c));
  }
}

}  // namespace
}  // namespace kvgate::engine::cuda
