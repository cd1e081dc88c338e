#include "transport/staging/host_copier.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace kvgate::transport::staging {

HostCopier::HostCopier(uint32_t slots, HostCopierHooks hooks)
    : hooks_(std::move(hooks)), slots_(slots) {
  worker_ = std::thread([this] { run(); });
}

HostCopier::~HostCopier() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    for (Slot& s : slots_) s.held = false;  // issued copies still run
  }
  cv_.notify_all();
  worker_.join();
}

Status HostCopier::copy_to_host_async(uint32_t slot, std::byte* host_dst, const std::byte* dev_src,
                                      size_t bytes) {
  return issue(slot, CopyDirection::kToHost, host_dst, dev_src, bytes);
}

Status HostCopier::copy_to_device_async(uint32_t slot, std::byte* dev_dst,
                                        const std::byte* host_src, size_t bytes) {
  return issue(slot, CopyDirection::kToDevice, dev_dst, host_src, bytes);
}

Status HostCopier::issue(uint32_t slot, CopyDirection dir, std::byte* dst, const std::byte* src,
                         size_t bytes) {
  if (dst == nullptr || src == nullptr || bytes == 0)
    return invalid_argument("host copier: a copy needs two pointers and a non-zero size");
  std::lock_guard lock(mu_);
  if (slot >= slots_.size())
    return invalid_argument("host copier: slot " + std::to_string(slot) + " of " +
                            std::to_string(slots_.size()));
  Slot& s = slots_[slot];
  if (s.busy)
    return failed_precondition("host copier: slot " + std::to_string(slot) +
                               " still has a copy in flight");
  s.busy = true;
  s.result = Status();
  queue_.push_back({++sequence_, slot, dir, dst, src, bytes});
  cv_.notify_all();
  return Status();
}

Status HostCopier::poll(uint32_t slot) {
  std::lock_guard lock(mu_);
  if (slot >= slots_.size())
    return invalid_argument("host copier: slot " + std::to_string(slot) + " of " +
                            std::to_string(slots_.size()));
  const Slot& s = slots_[slot];
  if (s.busy) return Status(StatusCode::kInProgress, "copy in flight");
  return s.result;
}

Status HostCopier::wait(uint32_t slot, Clock::time_point deadline) {
  std::unique_lock lock(mu_);
  if (slot >= slots_.size())
    return invalid_argument("host copier: slot " + std::to_string(slot) + " of " +
                            std::to_string(slots_.size()));
  if (!cv_.wait_until(lock, deadline, [&] { return !slots_[slot].busy; }))
    return Status(StatusCode::kDeadlineExceeded,
                  "host copier: slot " + std::to_string(slot) + " still copying at the deadline");
  return slots_[slot].result;
}

Result<std::byte*> HostCopier::allocate_pinned(size_t bytes) {
  // Page-aligned like cudaHostAlloc's memory; plain memory is all it is.
  const size_t rounded = (bytes + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(4096, rounded == 0 ? 4096 : rounded);
  if (p == nullptr)
    return resource_exhausted("host copier: cannot allocate " + std::to_string(bytes) + " bytes");
  std::lock_guard lock(mu_);
  ++pinned_outstanding_;
  return static_cast<std::byte*>(p);
}

void HostCopier::free_pinned(std::byte* p) {
  if (p == nullptr) return;
  std::free(p);
  std::lock_guard lock(mu_);
  --pinned_outstanding_;
}

void HostCopier::hold(uint32_t slot) {
  std::lock_guard lock(mu_);
  if (slot < slots_.size()) slots_[slot].held = true;
}

void HostCopier::release(uint32_t slot) {
  {
    std::lock_guard lock(mu_);
    if (slot < slots_.size()) slots_[slot].held = false;
  }
  cv_.notify_all();
}

void HostCopier::hold_all() {
  std::lock_guard lock(mu_);
  for (Slot& s : slots_) s.held = true;
}

void HostCopier::release_all() {
  {
    std::lock_guard lock(mu_);
    for (Slot& s : slots_) s.held = false;
  }
  cv_.notify_all();
}

size_t HostCopier::pinned_outstanding() const {
  std::lock_guard lock(mu_);
  return pinned_outstanding_;
}

uint64_t HostCopier::copies_issued() const {
  std::lock_guard lock(mu_);
  return sequence_;
}

void HostCopier::run() {
  std::unique_lock lock(mu_);
  for (;;) {
    auto runnable = queue_.end();
    cv_.wait(lock, [&] {
      runnable = queue_.begin();
      while (runnable != queue_.end() && slots_[runnable->slot].held) ++runnable;
      return runnable != queue_.end() || (stop_ && queue_.empty());
    });
    if (runnable == queue_.end()) return;  // stopping, nothing left
    const HostCopyRecord job = *runnable;
    queue_.erase(runnable);
    lock.unlock();
    Status status;
    if (hooks_.before_copy) status = hooks_.before_copy(job);
    if (status.ok()) std::memcpy(job.dst, job.src, job.bytes);
    if (hooks_.after_copy) hooks_.after_copy(job, status);
    lock.lock();
    slots_[job.slot].result = std::move(status);
    slots_[job.slot].busy = false;
    cv_.notify_all();
  }
}

}  // namespace kvgate::transport::staging
