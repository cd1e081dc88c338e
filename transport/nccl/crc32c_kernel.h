// The device half of CRC32C over device memory (crc32c_chunks.h): one GPU
// thread per kCrcChunkBytes chunk computes that chunk's CRC32C (seed 0)
// into `out` (device memory, one uint32_t per chunk). The host folds them
// with nccl_crc::fold_chunks. Built only with KVGATE_NCCL.
//
// UNVERIFIED: compiled, never run (no GPU when it was written).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace kvgate::transport::nccl_crc {

// Enqueues the kernel on `stream`; `out` holds ceil(bytes / kCrcChunkBytes)
// entries. Returns the launch's error (cudaSuccess when enqueued).
cudaError_t launch_chunk_crc32c(const void* data, size_t bytes, uint32_t* out, cudaStream_t stream);

}  // namespace kvgate::transport::nccl_crc
