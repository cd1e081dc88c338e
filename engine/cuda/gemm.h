// Prefill GEMM on the GPU through cuBLAS: Y[t][r] = W[r] . X[t] for a chunk
// of prompt tokens, on tensor cores (fp16 inputs, fp32 accumulation and
// output).
//
// Weights are converted once, when a model is loaded (weight_to_f16: the
// only allocating call), to fp16 rows; each gemm() then rounds the fp32
// activations to fp16 into the plan's workspace and runs one
// cublasGemmEx. Numerics: F16 weights see exactly the CPU's inputs (x
// rounded to fp16) with fp32 sums — but tensor-core accumulation is not
// round-to-nearest, so results differ from the CPU by more than summation
// order (tests/gpu bounds it); Q4_1/Q8_0 weights additionally round each
// dequantized weight to fp16 (2^-11 relative), unlike the GEMV path's
// exact integer dots.
//
// Threading: a CublasHandle belongs to one thread (cuBLAS handles are not
// thread-safe); gemm() binds it to the given stream and returns once the
// work is enqueued.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/launch_plan.h"

typedef struct cublasContext* cublasHandle_t;  // as in cublas_api.h

namespace kvgate::engine::cuda {

class CublasHandle {
 public:
  CublasHandle() = default;
  ~CublasHandle();
  CublasHandle(CublasHandle&& other) noexcept;
  CublasHandle& operator=(CublasHandle&& other) noexcept;
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;

  // UNAVAILABLE without a device, INTERNAL on other cuBLAS failures.
  static Result<CublasHandle> create();
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

// plan.rows x plan.cols fp16 rows (plan.weight_f16_bytes) from GGUF rows at
// w_dev (plan.source_type). Allocates; synchronizes `stream` before
// returning so the buffer is ready.
Result<DeviceBuffer> weight_to_f16(const GemmPlan& plan, const void* w_dev, cudaStream_t stream);

// y_dev [n_tokens][plan.rows] = w16_dev rows . x_dev [n_tokens][plan.cols],
// n_tokens <= plan.max_tokens; workspace_dev: plan.workspace_bytes.
Status gemm(CublasHandle& handle, const GemmPlan& plan, const void* w16_dev, const float* x_dev,
            int64_t n_tokens, float* y_dev, void* workspace_dev, cudaStream_t stream);

}  // namespace kvgate::engine::cuda
