// Prefill GEMM through cuBLAS (engine/cuda/gemm.h, label gpu): the weight
// conversion bit for bit against the CPU's dequantization, and the product
// against the CPU's double-precision reference. Skips without a device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/matmul.h"
#include "engine/cpu/quant.h"
#include "engine/cuda/gemm.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::engine::cuda {
namespace {

using testing::device_zeros;
using testing::to_device;
using testing::to_host;

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

std::vector<uint8_t> quantize_matrix(GgmlType type, const std::vector<float>& w, int64_t rows,
                                     int64_t cols) {
  const size_t rb = *ggml_row_bytes(type, cols);
  std::vector<uint8_t> out(rb * rows);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::quantize_row(type, w.data() + r * cols, out.data() + r * rb, cols);
  }
  return out;
}

void check_gemm(GgmlType type, int64_t rows, int64_t cols, uint32_t seed) {
  const std::string name(ggml_type_traits(static_cast<uint32_t>(type))->name);
  const std::vector<uint8_t> wq =
      quantize_matrix(type, random_floats(rows * cols, seed, 0.5f), rows, cols);
  DeviceBuffer wd = to_device(wq);
  auto h = CublasHandle::create();
  ASSERT_TRUE(h.ok()) << h.status().to_string();
  auto plan = plan_gemm(type, rows, cols, 64);
  ASSERT_TRUE(plan.ok()) << plan.status().to_string();
  auto w16 = weight_to_f16(*plan, wd.data(), nullptr);
  ASSERT_TRUE(w16.ok()) << w16.status().to_string();

  // The conversion is fp16(the CPU's dequantized value), bit for bit.
  const auto got16 = to_host<fp16_t>(*w16, rows * cols);
  std::vector<float> deq(cols);
  const size_t rb = *ggml_row_bytes(type, cols);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::dequantize_row(type, wq.data() + r * rb, deq.data(), cols);
    for (int64_t k = 0; k < cols; ++k) {
      ASSERT_EQ(got16[r * cols + k], fp32_to_fp16(deq[k])) << name << " row " << r << " " << k;
    }
  }

  auto work = DeviceBuffer::allocate(plan->workspace_bytes);
  ASSERT_TRUE(work.ok());
  for (int64_t tokens : {1, 7, 64}) {
    SCOPED_TRACE(name + " " + std::to_string(rows) + "x" + std::to_string(cols) + " tokens " +
                 std::to_string(tokens));
    const std::vector<float> x = random_floats(tokens * cols, seed + tokens);
    DeviceBuffer xd = to_device(x), yd = device_zeros<float>(tokens * rows);
    const Status st =
        gemm(*h, *plan, w16->data(), xd.as<float>(), tokens, yd.as<float>(), work->data(), nullptr);
    ASSERT_TRUE(st.ok()) << st.to_string();
    ASSERT_TRUE(cuda_status(cudaDeviceSynchronize(), "synchronize").ok());
    const auto y = to_host<float>(yd, tokens * rows);
    std::vector<float> ref(tokens * rows);
    cpu::matmul_reference({type, wq.data(), rows, cols}, x.data(), tokens, ref.data());
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t r = 0; r < rows; ++r) {
        // Bound: fp16 rounding of x (and, for quantized sources, of the
        // dequantized weight) is 2^-11 relative per input, so 2^-10 of
        // sum |w x|; fp32 accumulation over cols terms, where tensor cores
        // may truncate rather than round: a full ulp (2^-23) per addition.
        cpu::dequantize_row(type, wq.data() + r * rb, deq.data(), cols);
        double abs_sum = 0;
        for (int64_t k = 0; k < cols; ++k) abs_sum += std::fabs(deq[k] * x[t * cols + k]);
        const double tol =
            abs_sum * (std::ldexp(1.0, -10) + (cols + 16) * std::ldexp(1.0, -23)) + 1e-30;
        ASSERT_NEAR(y[t * rows + r], ref[t * rows + r], tol) << "row " << r << " token " << t;
      }
    }
  }
}

TEST(CudaGemm, AllSourceTypes) {
  KVGATE_REQUIRE_GPU();
  check_gemm(GgmlType::kF16, 40, 72, 1);
  check_gemm(GgmlType::kQ4_1, 1536, 576, 2);
  check_gemm(GgmlType::kQ8_0, 700, 576, 3);
  check_gemm(GgmlType::kF16, 576, 1536, 4);
}

TEST(CudaGemm, RejectsBadCalls) {
  KVGATE_REQUIRE_GPU();
  auto h = CublasHandle::create();
  ASSERT_TRUE(h.ok());
  auto plan = plan_gemm(GgmlType::kF16, 8, 64, 4);
  ASSERT_TRUE(plan.ok());
  DeviceBuffer buf = device_zeros<float>(4096);
  EXPECT_FALSE(
      gemm(*h, *plan, buf.data(), buf.as<float>(), 5, buf.as<float>(), buf.data(), nullptr).ok());
  EXPECT_FALSE(
      gemm(*h, *plan, buf.data(), buf.as<float>(), 1, buf.as<float>(), nullptr, nullptr).ok());
  CublasHandle empty;
  EXPECT_FALSE(
      gemm(empty, *plan, buf.data(), buf.as<float>(), 1, buf.as<float>(), buf.data(), nullptr)
          .ok());
}

}  // namespace
}  // namespace kvgate::engine::cuda
