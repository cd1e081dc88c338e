#include "engine/cuda/device_page_pool.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "engine/cuda/device_buffer.h"

namespace kvgate::engine::cuda {
namespace {

// Staged write bytes are placed at 16-byte offsets so that aligned rows
// take the kernel's 16-byte path.
constexpr int64_t kStagingAlign = 16;
constexpr int64_t kInitialStagingBytes = int64_t{64} << 10;
constexpr int64_t kInitialOps = 1024;

int64_t grown(int64_t cap, int64_t need, int64_t initial) {
  int64_t c = std::max(cap, initial);
  while (c < need) c *= 2;
  return c;
}

}  // namespace

Result<std::unique_ptr<DevicePagePool>> DevicePagePool::create(int64_t page_bytes,
                                                               int64_t capacity_bytes) {
  if (page_bytes < 64 || page_bytes % 64 != 0) {
    return invalid_argument("device page pool: page_bytes " + std::to_string(page_bytes) +
                            " is not a positive multiple of 64");
  }
  if (capacity_bytes < page_bytes) {
    return invalid_argument("device page pool: capacity " + std::to_string(capacity_bytes) +
                            " bytes holds no page of " + std::to_string(page_bytes) + " bytes");
  }
  const int64_t n_pages = capacity_bytes / page_bytes;
  if (n_pages > std::numeric_limits<int32_t>::max()) {
    return invalid_argument("device page pool: " + std::to_string(n_pages) +
                            " pages exceed the page id range");
  }
  const int64_t bytes = n_pages * page_bytes;
  void* arena = nullptr;
  KVGATE_RETURN_IF_ERROR(
      cuda_status(cudaMalloc(&arena, static_cast<size_t>(bytes)),
                  "device page pool: cudaMalloc of " + std::to_string(bytes) + " bytes"));
  // Zeroed, so a page's never-written rows read the same on every run.
  Status st =
      cuda_status(cudaMemset(arena, 0, static_cast<size_t>(bytes)), "device page pool: memset");
  if (st.ok()) st = cuda_status(cudaDeviceSynchronize(), "device page pool: memset");
  cudaEvent_t done = nullptr;
  if (st.ok()) {
    st = cuda_status(cudaEventCreateWithFlags(&done, cudaEventDisableTiming),
                     "device page pool: event create");
  }
  if (!st.ok()) {
    (void)cudaFree(arena);
    return st;
  }
  std::unique_ptr<DevicePagePool> pool(
      new DevicePagePool(page_bytes, n_pages, static_cast<std::byte*>(arena)));
  pool->done_ = done;
  return pool;
}

DevicePagePool::DevicePagePool(int64_t page_bytes, int64_t n_pages, std::byte* arena)
    : page_bytes_(page_bytes),
      n_pages_(n_pages),
      arena_(arena),
      in_use_(static_cast<size_t>(n_pages), 0),
      recorder_(arena, page_bytes, n_pages) {
  free_list_.reserve(static_cast<size_t>(n_pages));
  // Low pages first, as PagePool: same ids for the same calls.
  for (int64_t i = n_pages - 1; i >= 0; --i) free_list_.push_back(static_cast<int32_t>(i));
}

DevicePagePool::~DevicePagePool() {
  if (in_flight_) (void)cudaEventSynchronize(done_);
  if (done_ != nullptr) (void)cudaEventDestroy(done_);
  if (pinned_staging_ != nullptr) (void)cudaFreeHost(pinned_staging_);
  if (pinned_ops_ != nullptr) (void)cudaFreeHost(pinned_ops_);
  if (dev_staging_ != nullptr) (void)cudaFree(dev_staging_);
  if (dev_ops_ != nullptr) (void)cudaFree(dev_ops_);
  (void)cudaFree(arena_);
}

Result<kvstore::PageId> DevicePagePool::allocate() {
  if (free_list_.empty()) {
    return resource_exhausted("device page pool: all " + std::to_string(n_pages_) + " pages of " +
                              std::to_string(page_bytes_) + " bytes are in use");
  }
  const int32_t id = free_list_.back();
  free_list_.pop_back();
  in_use_[id] = 1;
  return kvstore::PageId{id};
}

Status DevicePagePool::free(kvstore::PageId page) {
  if (page.value < 0 || page.value >= n_pages_) {
    return invalid_argument("device page pool: page " + std::to_string(page.value) +
                            " is not from this pool");
  }
  if (!in_use_[page.value]) {
    return invalid_argument("device page pool: page " + std::to_string(page.value) +
                            " is already free");
  }
  in_use_[page.value] = 0;
  free_list_.push_back(page.value);
  return Status();
}

void DevicePagePool::fail(Status st) {
  if (status_.ok()) status_ = std::move(st);
}

void DevicePagePool::wait_last_flush() {
  if (!in_flight_) return;
  // Normally long done (the previous step's uploads); the pinned buffers
  // may be rewritten only once the copies that read them finished.
  const Status st = cuda_status(cudaEventSynchronize(done_), "device page pool: flush wait");
  if (!st.ok()) fail(st);
  in_flight_ = false;
}

void DevicePagePool::copy(std::byte* dst, const std::byte* src, int64_t bytes) {
  if (!status_.ok()) return;  // broken: every op is dropped (flush reports it)
  wait_last_flush();
  const Status st =
      recorder_.record({reinterpret_cast<uint64_t>(dst), reinterpret_cast<uint64_t>(src),
                        static_cast<uint32_t>(bytes), 0});
  if (!st.ok()) fail(st);
}

void DevicePagePool::write(std::byte* dst, const void* src, int64_t bytes) {
  if (!status_.ok()) return;  // broken: every op is dropped (flush reports it)
  Status st = recorder_.check(dst, bytes, "write to");
  if (!st.ok()) {
    fail(st);
    return;
  }
  wait_last_flush();
  const int64_t at = (staged_bytes_ + kStagingAlign - 1) / kStagingAlign * kStagingAlign;
  if (at + bytes > pinned_staging_cap_) {
    const int64_t cap = grown(pinned_staging_cap_, at + bytes, kInitialStagingBytes);
    void* p = nullptr;
    st = cuda_status(cudaMallocHost(&p, static_cast<size_t>(cap)),
                     "device page pool: pinned staging of " + std::to_string(cap) + " bytes");
    if (!st.ok()) {
      fail(st);
      return;
    }
    if (staged_bytes_ > 0) std::memcpy(p, pinned_staging_, static_cast<size_t>(staged_bytes_));
    if (pinned_staging_ != nullptr) (void)cudaFreeHost(pinned_staging_);
    pinned_staging_ = static_cast<std::byte*>(p);
    pinned_staging_cap_ = cap;
  }
  std::memcpy(pinned_staging_ + at, src, static_cast<size_t>(bytes));
  staged_bytes_ = at + bytes;
  st = recorder_.record({reinterpret_cast<uint64_t>(dst), static_cast<uint64_t>(at),
                         static_cast<uint32_t>(bytes), 1});
  if (!st.ok()) fail(st);
}

Status DevicePagePool::run_batch(cudaStream_t stream) {
  const std::vector<Op>& ops = recorder_.ops();
  const auto n = static_cast<int64_t>(ops.size());
  const auto op_bytes = static_cast<int64_t>(sizeof(Op));
  if (n > pinned_ops_cap_) {
    const int64_t cap = grown(pinned_ops_cap_, n, kInitialOps);
    if (pinned_ops_ != nullptr) (void)cudaFreeHost(pinned_ops_);
    pinned_ops_ = nullptr;
    pinned_ops_cap_ = 0;
    void* p = nullptr;
    KVGATE_RETURN_IF_ERROR(cuda_status(cudaMallocHost(&p, static_cast<size_t>(cap * op_bytes)),
                                       "device page pool: pinned descriptors"));
    pinned_ops_ = static_cast<Op*>(p);
    pinned_ops_cap_ = cap;
  }
  // Growing a device buffer frees the old one, which the previous flush's
  // kernels may still read: cudaFree waits for the device.
  if (n > dev_ops_cap_) {
    const int64_t cap = grown(dev_ops_cap_, n, kInitialOps);
    if (dev_ops_ != nullptr) (void)cudaFree(dev_ops_);
    dev_ops_ = nullptr;
    dev_ops_cap_ = 0;
    void* p = nullptr;
    KVGATE_RETURN_IF_ERROR(cuda_status(cudaMalloc(&p, static_cast<size_t>(cap * op_bytes)),
                                       "device page pool: descriptors"));
    dev_ops_ = static_cast<Op*>(p);
    dev_ops_cap_ = cap;
  }
  if (staged_bytes_ > dev_staging_cap_) {
    const int64_t cap = grown(dev_staging_cap_, staged_bytes_, kInitialStagingBytes);
    if (dev_staging_ != nullptr) (void)cudaFree(dev_staging_);
    dev_staging_ = nullptr;
    dev_staging_cap_ = 0;
    void* p = nullptr;
    KVGATE_RETURN_IF_ERROR(
        cuda_status(cudaMalloc(&p, static_cast<size_t>(cap)), "device page pool: staging"));
    dev_staging_ = static_cast<std::byte*>(p);
    dev_staging_cap_ = cap;
  }
  std::memcpy(pinned_ops_, ops.data(), static_cast<size_t>(n * op_bytes));
  // The previous flush may have run on another stream: its kernels read the
  // device buffers this upload overwrites.
  KVGATE_RETURN_IF_ERROR(
      cuda_status(cudaStreamWaitEvent(stream, done_, 0), "device page pool: stream wait"));
  KVGATE_RETURN_IF_ERROR(
      cuda_status(cudaMemcpyAsync(dev_ops_, pinned_ops_, static_cast<size_t>(n * op_bytes),
                                  cudaMemcpyHostToDevice, stream),
                  "device page pool: descriptor upload"));
  if (staged_bytes_ > 0) {
    KVGATE_RETURN_IF_ERROR(cuda_status(
        cudaMemcpyAsync(dev_staging_, pinned_staging_, static_cast<size_t>(staged_bytes_),
                        cudaMemcpyHostToDevice, stream),
        "device page pool: staging upload"));
  }
  // Recorded from here on: the pinned buffers are in use until done_.
  Status st;
  for (size_t p = 0; p < recorder_.phase_starts().size() && st.ok(); ++p) {
    const int64_t begin = recorder_.phase_begin(p);
    st = cuda_status(
        launch_page_ops(dev_ops_ + begin, recorder_.phase_end(p) - begin, dev_staging_, stream),
        "device page pool: page ops launch");
    if (st.ok()) ++launches_;
  }
  const Status rec = cuda_status(cudaEventRecord(done_, stream), "device page pool: event record");
  if (rec.ok()) in_flight_ = true;
  return st.ok() ? rec : st;
}

Status DevicePagePool::flush(cudaStream_t stream) {
  if (status_.ok() && !recorder_.ops().empty()) {
    wait_last_flush();
    if (status_.ok()) {
      const Status st = run_batch(stream);
      if (!st.ok()) fail(st);
    }
  }
  if (!recorder_.ops().empty()) recorder_.clear();
  staged_bytes_ = 0;
  return status_;
}

void DevicePagePool::read(void* dst, const std::byte* src, int64_t bytes) {
  if (bytes <= 0) return;
  const int64_t off = src - arena_;
  Status st;
  if (src < arena_ || off > capacity_bytes() || bytes > capacity_bytes() - off) {
    st = invalid_argument("device page pool: read of " + std::to_string(bytes) +
                          " bytes at arena offset " + std::to_string(off) + " is outside it");
  }
  if (st.ok()) st = flush(read_stream_);
  // An earlier flush on another stream may still be writing these bytes.
  if (st.ok()) {
    st = cuda_status(cudaStreamWaitEvent(read_stream_, done_, 0), "device page pool: read wait");
  }
  if (st.ok()) {
    st = cuda_status(
        cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, read_stream_),
        "device page pool: read");
  }
  if (st.ok()) {
    st = cuda_status(cudaStreamSynchronize(read_stream_), "device page pool: read");
  }
  if (!st.ok()) {
    fail(st);
    std::memset(dst, 0, static_cast<size_t>(bytes));
  }
}

}  // namespace kvgate::engine::cuda
