#include "engine/cuda/gemm.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>
#include <utility>

#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda {
namespace {

Status cublas_status(cublasStatus_t s, const std::string& what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status();
  std::string msg =
      "cublas: " + what + ": " + cublasGetStatusName(s) + " (" + cublasGetStatusString(s) + ")";
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return resource_exhausted(std::move(msg));
  if (s == CUBLAS_STATUS_INVALID_VALUE) return invalid_argument(std::move(msg));
  if (s == CUBLAS_STATUS_NOT_INITIALIZED || s == CUBLAS_STATUS_ARCH_MISMATCH) {
    return unavailable(std::move(msg));
  }
  return internal_error(std::move(msg));
}

}  // namespace

CublasHandle::~CublasHandle() {
  if (handle_ != nullptr) (void)cublasDestroy(handle_);
}

CublasHandle::CublasHandle(CublasHandle&& other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)) {}

CublasHandle& CublasHandle::operator=(CublasHandle&& other) noexcept {
  if (this != &other) {
    if (handle_ != nullptr) (void)cublasDestroy(handle_);
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

Result<CublasHandle> CublasHandle::create() {
  CublasHandle h;
  KVGATE_RETURN_IF_ERROR(cublas_status(cublasCreate(&h.handle_), "create"));
  return h;
}

Result<DeviceBuffer> weight_to_f16(const GemmPlan& plan, const void* w_dev, cudaStream_t stream) {
  if (w_dev == nullptr) return invalid_argument("cuda gemm: weights are null");
  KVGATE_ASSIGN_OR_RETURN(DeviceBuffer out, DeviceBuffer::allocate(plan.weight_f16_bytes));
  const int64_t n = plan.rows * plan.cols;
  cudaError_t err;
  if (plan.source_type == GgmlType::kF16) {
    err =
        cudaMemcpyAsync(out.data(), w_dev, plan.weight_f16_bytes, cudaMemcpyDeviceToDevice, stream);
  } else {
    err = kernels::dequantize_to_f16(plan.source_type == GgmlType::kQ4_1, w_dev, n, out.data(),
                                     stream);
  }
  KVGATE_RETURN_IF_ERROR(cuda_status(err, "weight conversion launch"));
  KVGATE_RETURN_IF_ERROR(cuda_status(cudaStreamSynchronize(stream), "weight conversion"));
  return out;
}

Status gemm(CublasHandle& handle, const GemmPlan& plan, const void* w16_dev, const float* x_dev,
            int64_t n_tokens, float* y_dev, void* workspace_dev, cudaStream_t stream) {
  if (n_tokens < 1 || n_tokens > plan.max_tokens) {
    return invalid_argument("cuda gemm: " + std::to_string(n_tokens) + " tokens for a plan of " +
                            std::to_string(plan.max_tokens));
  }
  if (handle.get() == nullptr || w16_dev == nullptr || x_dev == nullptr || y_dev == nullptr ||
      workspace_dev == nullptr) {
    return invalid_argument("cuda gemm: null handle, weights, input, output or workspace");
  }
  KVGATE_RETURN_IF_ERROR(cuda_status(
      kernels::f32_to_f16(x_dev, n_tokens * plan.cols, workspace_dev, stream), "fp16 launch"));
  KVGATE_RETURN_IF_ERROR(cublas_status(cublasSetStream(handle.get(), stream), "set stream"));
  // Row-major Y[T][N] = X[T][K] W[N][K]^T is, column-major, Y^T (N x T) =
  // W^T (W's rows are columns of K) times X^T.
  const float alpha = 1.0f, beta = 0.0f;
  const int m = static_cast<int>(plan.rows), n = static_cast<int>(n_tokens),
            k = static_cast<int>(plan.cols);
  return cublas_status(cublasGemmEx(handle.get(), CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha,
                                    w16_dev, CUDA_R_16F, k, workspace_dev, CUDA_R_16F, k, &beta,
                                    y_dev, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "gemm");
}

}  // namespace kvgate::engine::cuda
