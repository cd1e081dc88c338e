// Conformance of the CUDA prefill attention (label gpu) against
// CpuForward::attention's arithmetic, re-run here with the CPU's scalar
// kernels on the same dense cache: GQA groups, head dims 64/80/128/256,
// chunks with and without earlier tokens, tails that do not fill a query or
// key tile, and unwritten cache rows poisoned with NaN. Without a device
// every test skips.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "engine/cpu/isa.h"
#include "engine/cpu/ops.h"
#include "engine/cuda/cuda_ops.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::engine::cuda {
namespace {

using testing::device_zeros;
using testing::to_device;
using testing::to_host;

constexpr double kEps = 1.0 / (1 << 24);

struct Case {
  int64_t n_heads, n_kv_heads, head_dim, past, n, capacity;
};

struct Data {
  std::vector<float> q;      // [n][n_heads][d]
  std::vector<fp16_t> k, v;  // [n_kv][capacity][d]
};

Data make_data(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Data x;
  x.q.resize(c.n * c.n_heads * c.head_dim);
  for (auto& f : x.q) f = 1.5f * dist(rng);
  // Rows past the chunk were never written: NaN, which must not be read.
  x.k.assign(c.n_kv_heads * c.capacity * c.head_dim, fp32_to_fp16(NAN));
  x.v = x.k;
  for (int64_t h = 0; h < c.n_kv_heads; ++h) {
    for (int64_t r = 0; r < c.past + c.n; ++r) {
      for (int64_t e = 0; e < c.head_dim; ++e) {
        const size_t i = (h * c.capacity + r) * c.head_dim + e;
        x.k[i] = fp32_to_fp16(dist(rng));
        x.v[i] = fp32_to_fp16(dist(rng));
      }
    }
  }
  return x;
}

// CpuForward::attention for one chunk (engine/model.cpp), scalar kernels:
// q rounded to fp16, scores dot * scale, softmax, p rounded to fp16, axpy.
// Also the per-element error bound (see the test below).
void cpu_reference(const Case& c, const Data& x, std::vector<float>& out,
                   std::vector<double>& tol) {
  const int64_t d = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  out.assign(c.n * c.n_heads * d, 0.0f);
  tol.assign(out.size(), 0.0);
  std::vector<float> q(d), scores(c.past + c.n);
  for (int64_t r = 0; r < c.n; ++r) {
    const int64_t len = c.past + r + 1;
    for (int64_t h = 0; h < c.n_heads; ++h) {
      const int64_t kvh = h / group;
      for (int64_t e = 0; e < d; ++e) {
        q[e] = fp16_to_fp32(fp32_to_fp16(x.q[(r * c.n_heads + h) * d + e]));
      }
      const fp16_t* keys = x.k.data() + kvh * c.capacity * d;
      const fp16_t* vals = x.v.data() + kvh * c.capacity * d;
      for (int64_t j = 0; j < len; ++j) {
        scores[j] = cpu::dot_f16_f32(keys + j * d, q.data(), d, cpu::Isa::kScalar) * scale;
      }
      cpu::softmax_inplace(scores.data(), len, cpu::Isa::kScalar);
      float* o = out.data() + (r * c.n_heads + h) * d;
      double* t = tol.data() + (r * c.n_heads + h) * d;
      for (int64_t j = 0; j < len; ++j) {
        const float p = fp16_to_fp32(fp32_to_fp16(scores[j]));
        cpu::axpy_f16(p, vals + j * d, o, d, cpu::Isa::kScalar);
        for (int64_t e = 0; e < d; ++e) {
          const double av = std::fabs(fp16_to_fp32(vals[j * d + e]));
          // A p may land on the other side of an fp16 rounding boundary
          // (one fp16 ulp: 2^-10 relative, or 2^-24 absolute when subnormal),
          // and then the fp32 accumulation rounds differently (len ulps of
          // the running sum, bounded by sum p |v|).
          t[e] += (std::ldexp(1.0, -10) * scores[j] + kEps) * av +
                  (len + 1) * kEps * scores[j] * av * 2;
        }
      }
    }
  }
}

std::vector<float> run_gpu(const Case& c, const Data& x, const PrefillAttentionPlan& plan,
                           int64_t past, int64_t n, const DeviceBuffer& q_all,
                           const DeviceBuffer& k_d, const DeviceBuffer& v_d, DeviceBuffer& out_d) {
  const int64_t row = c.n_heads * c.head_dim;
  const int64_t offset = past - c.past;  // first query row of this launch within the chunk
  const Status st =
      prefill_attention(plan, q_all.as<float>() + offset * row, n, past, k_d.as<uint16_t>(),
                        v_d.as<uint16_t>(), out_d.as<float>() + offset * row, nullptr);
  EXPECT_TRUE(st.ok()) << st.to_string();
  EXPECT_TRUE(cuda_status(cudaDeviceSynchronize(), "synchronize").ok());
  return to_host<float>(out_d, c.n * row);
}

void run_case(const Case& c, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "heads " << c.n_heads << "/" << c.n_kv_heads << " d "
                                    << c.head_dim << " past " << c.past << " n " << c.n);
  const Data x = make_data(c, seed);
  auto plan = plan_prefill_attention({c.n, c.n_heads, c.n_kv_heads, c.head_dim, c.capacity});
  ASSERT_TRUE(plan.ok()) << plan.status().to_string();
  DeviceBuffer q_d = to_device(x.q);
  DeviceBuffer k_d = to_device(x.k);
  DeviceBuffer v_d = to_device(x.v);
  DeviceBuffer out_d = device_zeros<float>(x.q.size());
  const std::vector<float> got = run_gpu(c, x, *plan, c.past, c.n, q_d, k_d, v_d, out_d);

  std::vector<float> want;
  std::vector<double> tol;
  cpu_reference(c, x, want, tol);
  // Scores are bit-identical (the same exact products summed in the same
  // order, times the same scale), so the maximum is too; what differs is
  // expf (<= 2 ulp on the device) and the order of the denominator's sum
  // (len ulps), i.e. p before rounding differs by ~(len + 4) 2^-24 relative
  // and can round to the neighbouring fp16 value: that is the bound `tol`.
  int64_t exact = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << "element " << i;
    ASSERT_NEAR(got[i], want[i], tol[i] + 1e-30) << "element " << i;
    exact += std::memcmp(&got[i], &want[i], sizeof(float)) == 0;
  }
  ::testing::Test::RecordProperty("bit_exact_fraction",
                                  std::to_string(double(exact) / want.size()));

  // The same queries in two launches (the second after the first's rows):
  // every query's arithmetic depends only on its own keys and the fixed key
  // tiles, so the result is the same bits.
  if (c.n >= 2) {
    const int64_t first = c.n / 3 + 1;
    DeviceBuffer out2 = device_zeros<float>(x.q.size());
    auto plan2 = plan_prefill_attention({c.n, c.n_heads, c.n_kv_heads, c.head_dim, c.capacity});
    ASSERT_TRUE(plan2.ok());
    (void)run_gpu(c, x, *plan2, c.past, first, q_d, k_d, v_d, out2);
    const std::vector<float> got2 =
        run_gpu(c, x, *plan2, c.past + first, c.n - first, q_d, k_d, v_d, out2);
    ASSERT_EQ(std::memcmp(got.data(), got2.data(), got.size() * sizeof(float)), 0)
        << "chunked launches differ from one launch";
  }
}

TEST(CudaPrefillAttention, SmolLmShapes) {
  KVGATE_REQUIRE_GPU();
  run_case({9, 3, 64, 0, 37, 64}, 1);     // first chunk, tails of both tiles
  run_case({9, 3, 64, 50, 100, 160}, 2);  // a chunk after 50 tokens
  run_case({9, 3, 64, 0, 1, 8}, 3);       // one token
}

TEST(CudaPrefillAttention, GroupsAndHeadDims) {
  KVGATE_REQUIRE_GPU();
  run_case({32, 8, 128, 0, 130, 256}, 10);  // Llama-3-8B heads
  run_case({32, 8, 128, 700, 33, 800}, 11);
  run_case({4, 4, 256, 7, 20, 40}, 12);  // group 1, 2 queries per warp
  run_case({6, 1, 80, 3, 50, 60}, 13);   // head dim not a multiple of 32, group 6
}

TEST(CudaPrefillAttention, RejectsBadCalls) {
  KVGATE_REQUIRE_GPU();
  auto plan = plan_prefill_attention({16, 4, 2, 64, 32});
  ASSERT_TRUE(plan.ok());
  DeviceBuffer buf = device_zeros<float>(16 * 4 * 64);
  const auto* kv = buf.as<uint16_t>();
  float* f = buf.as<float>();
  EXPECT_EQ(prefill_attention(*plan, f, 17, 0, kv, kv, f, nullptr).code(),
            StatusCode::kInvalidArgument);  // more queries than planned
  EXPECT_EQ(prefill_attention(*plan, f, 16, 17, kv, kv, f, nullptr).code(),
            StatusCode::kInvalidArgument);  // past the cache
  EXPECT_EQ(prefill_attention(*plan, f, 4, -1, kv, kv, f, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(prefill_attention(*plan, nullptr, 4, 0, kv, kv, f, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(prefill_attention(*plan, f, 4, 0, kv, nullptr, f, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::engine::cuda
