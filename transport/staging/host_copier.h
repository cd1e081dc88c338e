// HostCopier: the DeviceCopier over plain host memory (it stands in for
// device memory on machines without a GPU, and is what the CPU tests of the
// staging path run). Copies run on a worker thread the copier owns, so a
// copy really completes after copy_*_async returned, and slots complete in
// an order the caller does not control — as streams do on a GPU.
//
// For tests (never used by the nodes):
//   - hold(slot)/release(slot): copies of a held slot stay queued (not run)
//     until it is released; other slots go on. That makes the completion
//     order a test's choice without sleeping.
//   - HostCopierHooks::before_copy runs on the worker thread right before a
//     copy; a non-OK Status fails that copy (nothing is copied) — fault
//     injection — and it may record or check the copy (e.g. that its
//     destination is not a buffer the transport still reads).
//
// Threading: the owner thread calls every public method; the worker thread
// runs copies and hooks. State shared by the two is behind one mutex.
// Blocking: wait() up to its deadline; the destructor joins the worker
// after the copies already issued have run (held slots are released).
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "transport/staging/device_copier.h"

namespace kvgate::transport::staging {

enum class CopyDirection : uint8_t { kToHost, kToDevice };

struct HostCopyRecord {
  uint64_t sequence = 0;  // issue order, from 1
  uint32_t slot = 0;
  CopyDirection direction = CopyDirection::kToHost;
  std::byte* dst = nullptr;
  const std::byte* src = nullptr;
  size_t bytes = 0;
};

struct HostCopierHooks {
  // Worker thread, before the copy; non-OK fails it.
  std::function<Status(const HostCopyRecord&)> before_copy;
  // Worker thread, after the copy ran (or failed), before it is reported
  // complete to poll().
  std::function<void(const HostCopyRecord&, const Status&)> after_copy;
};

class HostCopier final : public DeviceCopier {
 public:
  explicit HostCopier(uint32_t slots, HostCopierHooks hooks = {});
  ~HostCopier() override;

  std::string_view name() const override { return "host"; }
  uint32_t slot_count() const override { return static_cast<uint32_t>(slots_.size()); }
  Status copy_to_host_async(uint32_t slot, std::byte* host_dst, const std::byte* dev_src,
                            size_t bytes) override;
  Status copy_to_device_async(uint32_t slot, std::byte* dev_dst, const std::byte* host_src,
                              size_t bytes) override;
  Status poll(uint32_t slot) override;
  Status wait(uint32_t slot, Clock::time_point deadline) override;
  Result<std::byte*> allocate_pinned(size_t bytes) override;
  void free_pinned(std::byte* p) override;

  // Tests.
  void hold(uint32_t slot);
  void release(uint32_t slot);
  void hold_all();
  void release_all();
  // Pinned allocations not yet freed.
  size_t pinned_outstanding() const;
  // Copies issued so far.
  uint64_t copies_issued() const;

 private:
  struct Slot {
    bool busy = false;  // issued, not yet reported complete
    bool held = false;
    Status result;
  };
  Status issue(uint32_t slot, CopyDirection dir, std::byte* dst, const std::byte* src,
               size_t bytes);
  void run();

  HostCopierHooks hooks_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;
  std::deque<HostCopyRecord> queue_;
  uint64_t sequence_ = 0;
  size_t pinned_outstanding_ = 0;
  bool stop_ = false;
  std::thread worker_;  // last: started once the state above exists
};

}  // namespace kvgate::transport::staging
