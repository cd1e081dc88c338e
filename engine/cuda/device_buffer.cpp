#include "engine/cuda/device_buffer.h"

#include <cuda_runtime_api.h>

#include <utility>

namespace kvgate::engine::cuda {

Status cuda_status(int code, const std::string& what) {
  if (code == cudaSuccess) return Status();
  const auto err = static_cast<cudaError_t>(code);
  std::string msg =
      "cuda: " + what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) return resource_exhausted(std::move(msg));
  if (err == cudaErrorInvalidValue || err == cudaErrorInvalidConfiguration) {
    return invalid_argument(std::move(msg));
  }
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    return unavailable(std::move(msg));
  }
  return internal_error(std::move(msg));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

Result<int> multiprocessor_count() {
  int dev = 0;
  KVGATE_RETURN_IF_ERROR(cuda_status(cudaGetDevice(&dev), "cudaGetDevice"));
  int sms = 0;
  KVGATE_RETURN_IF_ERROR(cuda_status(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "multiprocessor count"));
  return sms;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) (void)cudaFree(data_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) (void)cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

Result<DeviceBuffer> DeviceBuffer::allocate(size_t bytes) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  void* p = nullptr;
  KVGATE_RETURN_IF_ERROR(
      cuda_status(cudaMalloc(&p, bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes"));
  b.data_ = p;
  b.bytes_ = bytes;
  return b;
}

Status DeviceBuffer::upload(const void* src, size_t bytes, size_t offset) {
  if (offset > bytes_ || bytes > bytes_ - offset) {
    return out_of_range("cuda: upload of " + std::to_string(bytes) + " bytes at " +
                        std::to_string(offset) + " past a buffer of " + std::to_string(bytes_));
  }
  if (bytes == 0) return Status();
  KVGATE_RETURN_IF_ERROR(cuda_status(
      cudaMemcpy(static_cast<char*>(data_) + offset, src, bytes, cudaMemcpyHostToDevice),
      "upload"));
  // From pageable memory cudaMemcpy may return once the data is staged,
  // before the DMA lands; work on a non-blocking stream would not wait for
  // it. The header promises a finished copy.
  return cuda_status(cudaStreamSynchronize(nullptr), "upload");
}

Status DeviceBuffer::download(void* dst, size_t bytes, size_t offset) const {
  if (offset > bytes_ || bytes > bytes_ - offset) {
    return out_of_range("cuda: download of " + std::to_string(bytes) + " bytes at " +
                        std::to_string(offset) + " past a buffer of " + std::to_string(bytes_));
  }
  if (bytes == 0) return Status();
  return cuda_status(
      cudaMemcpy(dst, static_cast<const char*>(data_) + offset, bytes, cudaMemcpyDeviceToHost),
      "download");
}

Status DeviceBuffer::zero() {
  if (bytes_ == 0) return Status();
  KVGATE_RETURN_IF_ERROR(cuda_status(cudaMemset(data_, 0, bytes_), "memset"));
  return cuda_status(cudaStreamSynchronize(nullptr), "memset");  // done before any stream reads it
}

CudaStream::~CudaStream() {
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
}

CudaStream::CudaStream(CudaStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

Result<CudaStream> CudaStream::create() {
  CudaStream s;
  KVGATE_RETURN_IF_ERROR(
      cuda_status(cudaStreamCreateWithFlags(&s.stream_, cudaStreamNonBlocking), "stream create"));
  return s;
}

Status CudaStream::synchronize() const {
  return cuda_status(cudaStreamSynchronize(stream_), "stream synchronize");
}

}  // namespace kvgate::engine::cuda
