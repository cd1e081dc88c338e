// PageSource: where a CompressedKvCache takes its pages from — a PagePool
// directly (prefill node, tests, local generation) or a request's lease on
// the decode node's pool (LeasePages, kvstore/lease_manager.h), so that a
// cache can never outgrow what its request reserved.
//
// PagePool: fixed-size pages carved from one arena allocated at start-up,
// so the arena can be registered with the transport once (DESIGN.md §5) and
// the per-token path never calls the system allocator.
//
// The pool never hands out more than its capacity: allocate() returns
// RESOURCE_EXHAUSTED when no page is free. Accounting is in bytes.
//
// Memory operations: data(page) is an ADDRESS, not necessarily one the
// host may dereference. A source whose host_accessible() is false (a GPU
// decode node's pool, engine/cuda/device_page_pool.h) hands out device
// addresses: host code may do pointer arithmetic on them and pass them to
// kernels, but reads and writes page bytes only through copy()/write()/
// read(). Host pools (PagePool) do a plain memcpy; callers that run per
// token (CompressedKvCache) test host_accessible() once per operation and
// memcpy directly, so the CPU path pays one predictable branch per row.
//
// Threading: not synchronized. One owner thread (the engine loop that owns
// the caches drawing from it) calls every method, of a PageSource too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "common/status.h"

namespace kvgate::kvstore {

// Index of a page within its pool.
struct PageId {
  int32_t value = -1;
  bool operator==(const PageId&) const = default;
};

// The calls a cache makes on its pages. Implementations hand out pages of
// one fixed size; data() of a page is valid while the page is allocated.
// A cache holds a PageSource* and never owns it: the source must outlive
// every cache drawing from it.
class PageSource {
 public:
  virtual ~PageSource() = default;

  // A page, or an error (RESOURCE_EXHAUSTED for an empty pool, OUT_OF_RANGE
  // "reservation overrun" past a lease). Callers that must not fail half
  // way check free_pages() first.
  virtual Result<PageId> allocate() = 0;
  // Returns a page taken from this source (INVALID_ARGUMENT otherwise).
  virtual Status free(PageId page) = 0;
  // Unchecked: `page` must be allocated from this source.
  virtual std::byte* data(PageId page) = 0;
  virtual const std::byte* data(PageId page) const = 0;
  virtual int64_t page_bytes() const = 0;
  // Pages allocate() can still hand out (the budget of this source).
  virtual int64_t free_pages() const = 0;

  // Whether host code may dereference data() addresses. Constant for the
  // source's lifetime (callers cache it).
  virtual bool host_accessible() const = 0;
  // Byte operations on page memory. `dst`/`src` are data() addresses (plus
  // an offset) of allocated pages; for copy() and write() the range must
  // lie within one page (every row, position and gate row does). No errors
  // are returned: a device source records a failure and reports it at its
  // flush (DevicePagePool::flush); a bad range is a caller bug.
  //
  // copy: `bytes` from page memory to page memory (ranges not overlapping).
  // write: `bytes` from host memory `src` to page memory; `src` may be
  //   reused as soon as the call returns (a device source stages the bytes).
  // A host source runs both at once; a device source may defer them until
  // its flush, but executes them as if in call order (a later op sees an
  // earlier one's bytes) and before any later read().
  virtual void copy(std::byte* dst, const std::byte* src, int64_t bytes) = 0;
  virtual void write(std::byte* dst, const void* src, int64_t bytes) = 0;
  // read: `bytes` of page memory into host memory `dst`, synchronously
  // (a device source first executes its deferred ops; it may block).
  virtual void read(void* dst, const std::byte* src, int64_t bytes) = 0;

 protected:
  PageSource() = default;
  PageSource(const PageSource&) = default;
  PageSource& operator=(const PageSource&) = default;
};

// Final, so calls through a PagePool* or PagePool& (the kernels' and the
// lease manager's) are direct and data() stays inline.
class PagePool final : public PageSource {
 public:
  // Pages are 64-byte aligned, so page_bytes must be a multiple of 64.
  // capacity_bytes is rounded down to whole pages and must hold at least one.
  // Allocates the arena (uninitialized); RESOURCE_EXHAUSTED if the system
  // has no memory for it.
  static Result<std::unique_ptr<PagePool>> create(int64_t page_bytes, int64_t capacity_bytes);

  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  // A free page, or RESOURCE_EXHAUSTED. O(1).
  Result<PageId> allocate() override;
  // Returns a page. INVALID_ARGUMENT for an id not from this pool or a page
  // already free (the pool is unchanged then). O(1).
  Status free(PageId page) override;

  // Unchecked: `page` must be allocated from this pool.
  std::byte* data(PageId page) override { return arena_.get() + page.value * page_bytes_; }
  const std::byte* data(PageId page) const override {
    return arena_.get() + page.value * page_bytes_;
  }

  // The arena, for registering with a transport.
  std::byte* arena() { return arena_.get(); }

  // Host memory: every op is a plain memcpy, done at once.
  bool host_accessible() const override { return true; }
  void copy(std::byte* dst, const std::byte* src, int64_t bytes) override {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
  }
  void write(std::byte* dst, const void* src, int64_t bytes) override {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
  }
  void read(void* dst, const std::byte* src, int64_t bytes) override {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
  }

  int64_t page_bytes() const override { return page_bytes_; }
  int64_t n_pages() const { return n_pages_; }
  int64_t capacity_bytes() const { return n_pages_ * page_bytes_; }
  int64_t used_pages() const { return n_pages_ - static_cast<int64_t>(free_list_.size()); }
  int64_t free_pages() const override { return static_cast<int64_t>(free_list_.size()); }
  int64_t used_bytes() const { return used_pages() * page_bytes_; }
  int64_t free_bytes() const { return free_pages() * page_bytes_; }

 private:
  struct AlignedDelete {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };

  PagePool(int64_t page_bytes, int64_t n_pages, std::byte* arena);

  int64_t page_bytes_;
  int64_t n_pages_;
  std::unique_ptr<std::byte[], AlignedDelete> arena_;
  std::vector<int32_t> free_list_;  // stack of free page indices
  std::vector<uint8_t> in_use_;     // by page index: catches double frees
};

}  // namespace kvgate::kvstore
