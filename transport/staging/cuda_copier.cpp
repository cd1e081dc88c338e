// CudaCopier (cuda_copier.h). Compiled only with KVGATE_CUDA; plain C++
// against the CUDA runtime API (no kernels, no nvcc).
#include "transport/staging/cuda_copier.h"

#include <cuda_runtime.h>

#include <string>
#include <thread>
#include <vector>

namespace kvgate::transport::staging {
namespace {

Status cuda_error(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return Status();
  const std::string msg = "cuda: " + what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
  switch (e) {
    case cudaErrorMemoryAllocation:
      return resource_exhausted(msg);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return unavailable(msg);
    case cudaErrorInvalidValue:
      return invalid_argument(msg);
    default:
      return internal_error(msg);
  }
}

class CudaCopier final : public DeviceCopier {
 public:
  ~CudaCopier() override {
    for (Slot& s : slots_) {
      if (s.stream != nullptr) (void)cudaStreamSynchronize(s.stream);
      if (s.event != nullptr) (void)cudaEventDestroy(s.event);
      if (s.stream != nullptr) (void)cudaStreamDestroy(s.stream);
    }
  }

  static Result<std::unique_ptr<DeviceCopier>> create(uint32_t slots) {
    if (slots == 0) return invalid_argument("cuda copier: 0 slots");
    int devices = 0;
    if (cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess || devices == 0)
      return unavailable("cuda copier: no CUDA device (" +
                         std::string(e == cudaSuccess ? "none found" : cudaGetErrorString(e)) + ")");
    std::unique_ptr<CudaCopier> c(new CudaCopier());
    c->slots_.resize(slots);
    for (Slot& s : c->slots_) {
      KVGATE_RETURN_IF_ERROR(cuda_error(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking),
                                        "cudaStreamCreateWithFlags"));
      // Timing off: the event is only a completion flag (cheaper to record).
      KVGATE_RETURN_IF_ERROR(cuda_error(cudaEventCreateWithFlags(&s.event, cudaEventDisableTiming),
                                        "cudaEventCreateWithFlags"));
    }
    return std::unique_ptr<DeviceCopier>(std::move(c));
  }

  std::string_view name() const override { return "cuda"; }
  uint32_t slot_count() const override { return static_cast<uint32_t>(slots_.size()); }

  Status copy_to_host_async(uint32_t slot, std::byte* host_dst, const std::byte* dev_src,
                            size_t bytes) override {
    return issue(slot, host_dst, dev_src, bytes, cudaMemcpyDeviceToHost);
  }
  Status copy_to_device_async(uint32_t slot, std::byte* dev_dst, const std::byte* host_src,
                              size_t bytes) override {
    return issue(slot, dev_dst, host_src, bytes, cudaMemcpyHostToDevice);
  }

  Status poll(uint32_t slot) override {
    if (slot >= slots_.size()) return bad_slot(slot);
    Slot& s = slots_[slot];
    if (!s.issued) return s.result;
    const cudaError_t e = cudaEventQuery(s.event);
    if (e == cudaErrorNotReady) return Status(StatusCode::kInProgress, "copy in flight");
    s.issued = false;
    s.result = cuda_error(e, "copy on slot " + std::to_string(slot));
    return s.result;
  }

  Status wait(uint32_t slot, Clock::time_point deadline) override {
    for (;;) {
      Status s = poll(slot);
      if (s.code() != StatusCode::kInProgress) return s;
      if (Clock::now() >= deadline)
        return Status(StatusCode::kDeadlineExceeded,
                      "cuda copier: slot " + std::to_string(slot) + " still copying at the deadline");
      std::this_thread::yield();
    }
  }

  Result<std::byte*> allocate_pinned(size_t bytes) override {
    void* p = nullptr;
    KVGATE_RETURN_IF_ERROR(cuda_error(cudaHostAlloc(&p, bytes, cudaHostAllocPortable),
                                      "cudaHostAlloc(" + std::to_string(bytes) + ")"));
    return static_cast<std::byte*>(p);
  }
  void free_pinned(std::byte* p) override {
    if (p != nullptr) (void)cudaFreeHost(p);
  }

 private:
  struct Slot {
    cudaStream_t stream = nullptr;
    cudaEvent_t event = nullptr;
    bool issued = false;
    Status result;
  };
  CudaCopier() = default;

  Status bad_slot(uint32_t slot) const {
    return invalid_argument("cuda copier: slot " + std::to_string(slot) + " of " +
                            std::to_string(slots_.size()));
  }

  Status issue(uint32_t slot, void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    if (dst == nullptr || src == nullptr || bytes == 0)
      return invalid_argument("cuda copier: a copy needs two pointers and a non-zero size");
    if (slot >= slots_.size()) return bad_slot(slot);
    if (poll(slot).code() == StatusCode::kInProgress)
      return failed_precondition("cuda copier: slot " + std::to_string(slot) +
                                 " still has a copy in flight");
    Slot& s = slots_[slot];
    KVGATE_RETURN_IF_ERROR(cuda_error(cudaMemcpyAsync(dst, src, bytes, kind, s.stream),
                                      "cudaMemcpyAsync(" + std::to_string(bytes) + ")"));
    KVGATE_RETURN_IF_ERROR(cuda_error(cudaEventRecord(s.event, s.stream), "cudaEventRecord"));
    s.issued = true;
    s.result = Status();
    return Status();
  }

  std::vector<Slot> slots_;
};

}  // namespace

Result<std::unique_ptr<DeviceCopier>> create_cuda_copier(uint32_t slots) {
  return CudaCopier::create(slots);
}

}  // namespace kvgate::transport::staging
