// DevicePagePool: the KV page pool of a GPU decode node — PagePool's pages
// and free-list semantics (kvstore/page_pool.h) over one cudaMalloc'd arena.
//
// data(page) is a DEVICE address: host code does pointer arithmetic on it
// and hands it to kernels (CompressedKvCache::new_k_row(), SegmentView::
// page(), ...) but never dereferences it (host_accessible() is false). The
// cache reaches page bytes only through the PageSource memory operations:
//   copy()  page -> page (a leaving token's retained K/V/gate rows):
//           recorded, no device work;
//   write() host -> page (a retained token's position, a prefill's rows):
//           the bytes are staged in a pinned host buffer, the op recorded;
//   read()  page -> host (adopt's position check, retained_position()):
//           flush() on the read stream, then a synchronous copy (blocks).
// flush(stream) runs every recorded op: it uploads the descriptors and the
// staged bytes (two cudaMemcpyAsync from pinned memory) and launches ONE
// kernel over the descriptor array — per "phase": ops are executed as if
// in record order, so an op that depends on an earlier pending op of the
// batch (reads a page it writes, writes a page it reads, overwrites its
// bytes) starts a new phase, which takes a launch of its own (the rules:
// engine/cuda/page_op_recorder.h). The decode hot path (begin_append's retained rows and
// positions, flushed before the step's kernels) is one phase: one launch.
//
// When to flush: after the cache's calls of a step (begin_append,
// append, fill_slot, build_from_dense, a page copy) and BEFORE any kernel
// reads or overwrites the pages they touched — in a decode step, after
// begin_append() and before the kernels write the new K/V/gate rows (the
// retained copies read the leaving token's ring rows, which the new token
// overwrites) and before attention reads the retained lists. flush() on
// the compute stream orders everything without a host wait.
//
// Errors: allocate() RESOURCE_EXHAUSTED when every page is in use; free()
// INVALID_ARGUMENT for a page not from this pool or already free (the pool
// unchanged), as PagePool. The ops return nothing: a CUDA failure (or an op
// outside the arena, a caller bug) is kept as the pool's sticky status,
// returned by flush() and status(); a failed read() fills its bytes with 0.
//
// Threading: one owner thread, as every PageSource. No CUDA header here
// (cudaStream_t/cudaEvent_t are declared as the runtime declares them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "engine/cuda/page_op_recorder.h"
#include "engine/cuda/page_ops.h"  // cudaStream_t, PageOpDesc
#include "kvstore/page_pool.h"

typedef struct CUevent_st* cudaEvent_t;  // as in the CUDA runtime's driver_types.h

namespace kvgate::engine::cuda {

class DevicePagePool final : public kvstore::PageSource {
 public:
  // page_bytes a positive multiple of 64, capacity_bytes rounded down to
  // whole pages (at least one): INVALID_ARGUMENT otherwise. cudaMalloc's
  // the arena (RESOURCE_EXHAUSTED when the device lacks the memory,
  // UNAVAILABLE without a device) and zeroes it (synchronously).
  static Result<std::unique_ptr<DevicePagePool>> create(int64_t page_bytes, int64_t capacity_bytes);

  DevicePagePool(const DevicePagePool&) = delete;
  DevicePagePool& operator=(const DevicePagePool&) = delete;
  // Waits for its last flush, frees the arena and buffers. Pending
  // (unflushed) ops are dropped.
  ~DevicePagePool() override;

  Result<kvstore::PageId> allocate() override;
  Status free(kvstore::PageId page) override;
  std::byte* data(kvstore::PageId page) override { return arena_ + page.value * page_bytes_; }
  const std::byte* data(kvstore::PageId page) const override {
    return arena_ + page.value * page_bytes_;
  }
  int64_t page_bytes() const override { return page_bytes_; }
  int64_t free_pages() const override { return static_cast<int64_t>(free_list_.size()); }

  bool host_accessible() const override { return false; }
  // Recorded; run by the next flush() (or read()).
  void copy(std::byte* dst, const std::byte* src, int64_t bytes) override;
  // `src` is staged at once (reusable on return); the op runs at flush().
  void write(std::byte* dst, const void* src, int64_t bytes) override;
  // flush(read stream), then a copy to the host; blocks until done.
  void read(void* dst, const std::byte* src, int64_t bytes) override;

  // Runs the recorded ops on `stream` (asynchronously: one launch per
  // phase, see above) and clears the record. Work already queued on another
  // stream by an earlier flush is waited for on the device (an event), not
  // on the host. Returns the sticky status (the first failure of any op or
  // flush so far; pending ops are dropped then). OK with nothing recorded.
  Status flush(cudaStream_t stream);
  // The stream read() flushes on and copies with (default: the legacy
  // default stream). Kernels the caller queued elsewhere that write pages
  // must be finished (or ordered before this stream) before a read().
  void set_read_stream(cudaStream_t stream) { read_stream_ = stream; }
  Status status() const { return status_; }

  // Recorded ops not yet flushed, and the launches their flush will take.
  int64_t pending_ops() const { return static_cast<int64_t>(recorder_.ops().size()); }
  int64_t pending_phases() const { return static_cast<int64_t>(recorder_.phase_starts().size()); }
  // Kernel launches of all flushes so far (tests, metrics).
  int64_t launches() const { return launches_; }

  // The arena (device memory), e.g. for registering with a transport.
  std::byte* arena() const { return arena_; }
  int64_t n_pages() const { return n_pages_; }
  int64_t capacity_bytes() const { return n_pages_ * page_bytes_; }
  int64_t used_pages() const { return n_pages_ - free_pages(); }

 private:
  using Op = PageOpDesc;

  DevicePagePool(int64_t page_bytes, int64_t n_pages, std::byte* arena);

  // Before touching the pinned buffers: the last flush's uploads are done.
  void wait_last_flush();
  void fail(Status st);
  // The flush's CUDA calls (flush() keeps the record consistent around it).
  Status run_batch(cudaStream_t stream);

  int64_t page_bytes_;
  int64_t n_pages_;
  std::byte* arena_;  // device
  std::vector<int32_t> free_list_;
  std::vector<uint8_t> in_use_;
  PageOpRecorder recorder_;  // the batch, in phases (page_op_recorder.h)

  // Buffers: pinned host staging (write bytes) and descriptors, and their
  // device copies, grown on demand.
  std::byte* pinned_staging_ = nullptr;
  int64_t pinned_staging_cap_ = 0;
  int64_t staged_bytes_ = 0;
  Op* pinned_ops_ = nullptr;
  int64_t pinned_ops_cap_ = 0;
  std::byte* dev_staging_ = nullptr;
  int64_t dev_staging_cap_ = 0;
  Op* dev_ops_ = nullptr;
  int64_t dev_ops_cap_ = 0;
  cudaEvent_t done_ = nullptr;  // recorded after each flush's launches
  bool in_flight_ = false;      // done_ recorded and not yet waited for

  cudaStream_t read_stream_ = nullptr;
  Status status_;
  int64_t launches_ = 0;
};

}  // namespace kvgate::engine::cuda
