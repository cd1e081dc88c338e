// Device memory and streams, owned RAII-style, with CUDA errors turned into
// Status at the call that first sees them.
//
// DeviceBuffer owns one cudaMalloc allocation (move-only; freed in the
// destructor, errors there are ignored: nothing useful can be done). Copies
// here are synchronous (they block the calling thread until done) and meant
// for set-up and tests; hot paths enqueue their own cudaMemcpyAsync.
//
// Usable from plain .cpp files: no CUDA header is included (cudaStream_t is
// declared as the runtime declares it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/status.h"

typedef struct CUstream_st* cudaStream_t;  // as in the CUDA runtime's driver_types.h

namespace kvgate::engine::cuda {

// Number of usable devices; 0 when there is none or no driver (never an
// error: the caller decides whether that is fatal).
int device_count();

// Multiprocessor count of the current device (AttentionShape::sm_count).
Result<int> multiprocessor_count();

// Status for a CUDA runtime error code (0 = success), naming `what`.
Status cuda_status(int code, const std::string& what);

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // bytes == 0 gives an empty buffer (data() == nullptr).
  // RESOURCE_EXHAUSTED when the device is out of memory.
  static Result<DeviceBuffer> allocate(size_t bytes);

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

  // Synchronous copies of `bytes` at byte `offset` (finished on the device
  // when they return, so any stream may read the data); OUT_OF_RANGE past
  // the end. zero() likewise.
  Status upload(const void* src, size_t bytes, size_t offset = 0);
  Status download(void* dst, size_t bytes, size_t offset = 0) const;
  Status zero();

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A non-blocking stream (does not synchronize with the legacy default one).
class CudaStream {
 public:
  CudaStream() = default;
  ~CudaStream();
  CudaStream(CudaStream&& other) noexcept;
  CudaStream& operator=(CudaStream&& other) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  static Result<CudaStream> create();
  cudaStream_t get() const { return stream_; }
  // Blocks until the stream's work is done; reports the first error of it.
  Status synchronize() const;

 private:
  cudaStream_t stream_ = nullptr;
};

}  // namespace kvgate::engine::cuda
