#include "transport/nccl/crc32c_chunks.h"
#include "transport/nccl/crc32c_kernel.h"

namespace kvgate::transport::nccl_crc {

namespace {

constexpr int kThreads = 256;

__global__ void chunk_crc32c_kernel(const uint8_t* data, size_t bytes, uint32_t* out, size_t chunks) {
  __shared__ uint32_t table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = table_entry(static_cast<uint32_t>(i));
  __syncthreads();
  const size_t c = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  const size_t at = c * kCrcChunkBytes;
  const size_t n = bytes - at < kCrcChunkBytes ? bytes - at : kCrcChunkBytes;
  out[c] = crc32c_chunk(table, data + at, n);
}

}  // namespace

cudaError_t launch_chunk_crc32c(const void* data, size_t bytes, uint32_t* out, cudaStream_t stream) {
  const size_t chunks = (bytes + kCrcChunkBytes - 1) / kCrcChunkBytes;
  if (chunks == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((chunks + kThreads - 1) / kThreads);
  chunk_crc32c_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint8_t*>(data), bytes, out, chunks);
  return cudaGetLastError();
}

}  // namespace kvgate::transport::nccl_crc
