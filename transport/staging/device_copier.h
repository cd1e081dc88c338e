// DeviceCopier: asynchronous copies between device memory and pinned host
// memory, in independent slots, for the staged KV transfer path
// (README.md). Raw pointers and byte counts only: nothing here knows about
// transfers, pages or the transport.
//
// Slots: slot_count() independent lanes (CUDA: one stream + one event
// each). At most one copy is in flight per slot; a slot's copies complete
// in any order relative to other slots'. The staging ring uses one slot
// per staging buffer, so a buffer's copy is polled through its own slot.
//
// Threading: one owner thread calls every method (HostCopier runs the
// copies on its own worker thread; CudaCopier on the device). Blocking:
// only wait() blocks, up to its deadline; allocate_pinned may block in the
// allocator (start-up only).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>

#include "common/status.h"

namespace kvgate::transport::staging {

using Clock = std::chrono::steady_clock;

class DeviceCopier {
 public:
  virtual ~DeviceCopier() = default;
  DeviceCopier(const DeviceCopier&) = delete;
  DeviceCopier& operator=(const DeviceCopier&) = delete;

  // "host", "cuda".
  virtual std::string_view name() const = 0;
  virtual uint32_t slot_count() const = 0;

  // Starts copying `bytes` (> 0) from device memory at `dev_src` into host
  // memory at `host_dst` (pinned, from allocate_pinned, for the copy to be
  // truly asynchronous on a GPU). Both ranges must stay valid and
  // untouched until poll(slot) stops answering kInProgress.
  // INVALID_ARGUMENT: slot >= slot_count(), null pointer, zero bytes;
  // FAILED_PRECONDITION: the slot's previous copy is still in flight.
  // Errors of the copy itself come from poll/wait.
  virtual Status copy_to_host_async(uint32_t slot, std::byte* host_dst, const std::byte* dev_src,
                                    size_t bytes) = 0;
  // The other direction, same contract.
  virtual Status copy_to_device_async(uint32_t slot, std::byte* dev_dst, const std::byte* host_src,
                                      size_t bytes) = 0;

  // Non-blocking. kInProgress while the slot's copy runs; OK once it
  // completed (or when none was ever issued); the copy's error otherwise.
  // The answer stays until the next copy is issued on the slot.
  // INVALID_ARGUMENT for a slot out of range.
  virtual Status poll(uint32_t slot) = 0;
  // Blocks until poll(slot) would not answer kInProgress, or `deadline`:
  // then kDeadlineExceeded (the copy is still in flight).
  virtual Status wait(uint32_t slot, Clock::time_point deadline) = 0;

  // Page-locked host memory (CUDA: cudaHostAlloc), so device copies run
  // asynchronously (DMA). RESOURCE_EXHAUSTED when it cannot be had.
  virtual Result<std::byte*> allocate_pinned(size_t bytes) = 0;
  // Frees what allocate_pinned returned; null is ignored. No copy may
  // still use it.
  virtual void free_pinned(std::byte* p) = 0;

 protected:
  DeviceCopier() = default;
};

// One allocate_pinned allocation, freed by its destructor (move-only). The
// copier must outlive it.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  static Result<PinnedBuffer> allocate(DeviceCopier& copier, size_t bytes) {
    KVGATE_ASSIGN_OR_RETURN(std::byte * p, copier.allocate_pinned(bytes));
    return PinnedBuffer(&copier, p, bytes);
  }
  ~PinnedBuffer() { reset(); }
  PinnedBuffer(PinnedBuffer&& o) noexcept
      : copier_(std::exchange(o.copier_, nullptr)),
        data_(std::exchange(o.data_, nullptr)),
        bytes_(std::exchange(o.bytes_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      copier_ = std::exchange(o.copier_, nullptr);
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  std::byte* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  // Forgets the allocation without freeing it (memory a copy that could
  // not be waited for may still write); returns it.
  std::byte* release_leak() {
    copier_ = nullptr;
    bytes_ = 0;
    return std::exchange(data_, nullptr);
  }
  void reset() {
    if (copier_ != nullptr && data_ != nullptr) copier_->free_pinned(data_);
    copier_ = nullptr;
    data_ = nullptr;
    bytes_ = 0;
  }

 private:
  PinnedBuffer(DeviceCopier* c, std::byte* p, size_t n) : copier_(c), data_(p), bytes_(n) {}
  DeviceCopier* copier_ = nullptr;
  std::byte* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace kvgate::transport::staging
