// DevicePagePool's batched page copies (page_ops.h): one thread block per
// descriptor (grid-stride over the array), threads sharing its bytes.
#include <cuda_runtime_api.h>

#include <algorithm>

#include "engine/cuda/page_ops.h"

namespace kvgate::engine::cuda {
namespace {

constexpr int kPageOpThreads = 128;
// Enough blocks to fill a device; more descriptors are taken grid-stride.
constexpr int64_t kMaxPageOpBlocks = 4096;

__global__ void page_ops_kernel(const PageOpDesc* __restrict__ ops, int64_t n_ops,
                                const unsigned char* __restrict__ staging) {
  for (int64_t i = blockIdx.x; i < n_ops; i += gridDim.x) {
    const PageOpDesc op = ops[i];
    unsigned char* dst = reinterpret_cast<unsigned char*>(op.dst);
    const unsigned char* src =
        op.staged ? staging + op.src : reinterpret_cast<const unsigned char*>(op.src);
    const uint64_t align = op.dst | reinterpret_cast<uint64_t>(src) | op.bytes;
    if ((align & 15u) == 0) {
      // K/V rows (head_dim * 2 bytes), gate rows and staged rows are
      // 16-byte aligned in practice: one word per thread.
      const uint32_t words = op.bytes / 16u;
      for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) {
        reinterpret_cast<uint4*>(dst)[w] = reinterpret_cast<const uint4*>(src)[w];
      }
    } else {
      for (uint32_t b = threadIdx.x; b < op.bytes; b += blockDim.x) dst[b] = src[b];
    }
  }
}

}  // namespace

int launch_page_ops(const PageOpDesc* ops_dev, int64_t n_ops, const std::byte* staging_dev,
                    cudaStream_t stream) {
  if (n_ops <= 0) return 0;
  const auto blocks = static_cast<unsigned>(std::min(n_ops, kMaxPageOpBlocks));
  page_ops_kernel<<<blocks, kPageOpThreads, 0, stream>>>(
      ops_dev, n_ops, reinterpret_cast<const unsigned char*>(staging_dev));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kvgate::engine::cuda
