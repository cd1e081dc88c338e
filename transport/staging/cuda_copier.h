// The DeviceCopier over CUDA (cuda_copier.cpp, compiled only with
// KVGATE_CUDA; without it cuda_copier_stub.cpp answers UNIMPLEMENTED).
//
// One non-blocking stream and one event per slot on the current device:
// copy_*_async is cudaMemcpyAsync on the slot's stream followed by
// cudaEventRecord; poll is cudaEventQuery (cudaErrorNotReady →
// kInProgress); wait polls until its deadline (cudaEventSynchronize cannot
// be bounded). Pinned memory is cudaHostAlloc'd (portable), so the copies
// are real DMA that overlap with the host's sends.
//
// CUDA reports a failed asynchronous copy as a sticky context error: after
// one, every later call fails too. The copier turns that into Status
// values; recovering the context is the process's business (restart).
//
// Threading: one owner thread; the current device must be the one the
// device pointers belong to when create() and each copy are called.
#pragma once

#include <memory>

#include "transport/staging/device_copier.h"

namespace kvgate::transport::staging {

// INVALID_ARGUMENT for 0 slots; UNIMPLEMENTED without CUDA in the build;
// UNAVAILABLE without a device; CUDA errors as Status.
Result<std::unique_ptr<DeviceCopier>> create_cuda_copier(uint32_t slots);

}  // namespace kvgate::transport::staging
