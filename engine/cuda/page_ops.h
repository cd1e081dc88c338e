// The kernel behind DevicePagePool::flush (engine/cuda/device_page_pool.h):
// runs a batch of page byte copies given as a descriptor array in device
// memory. Plain C++17 (page_ops.cu includes it; no CUDA header here).
#pragma once

#include <cstddef>
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;  // as in the CUDA runtime's driver_types.h

namespace kvgate::engine::cuda {

// One recorded page op: the kernel's descriptor.
struct PageOpDesc {
  uint64_t dst = 0;  // device address
  uint64_t src = 0;  // device address, or offset in the staging buffer
  uint32_t bytes = 0;
  uint32_t staged = 0;  // 1: src is a staging offset (a staged host write)
};

// One launch over ops_dev[0, n_ops): op i copies bytes to dst from src (a
// device address) or, when staged, from staging_dev + src. Ops of one
// launch run concurrently: no op may read or write bytes another op of the
// launch writes. Ops whose addresses and size are multiples of 16 bytes
// (K/V and gate rows, staged rows) move in 16-byte words. Returns the
// launch's error code (cudaError_t as int; 0 = success).
int launch_page_ops(const PageOpDesc* ops_dev, int64_t n_ops, const std::byte* staging_dev,
                    cudaStream_t stream);

}  // namespace kvgate::engine::cuda
