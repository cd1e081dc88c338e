// PageOpRecorder: the batch of page byte ops a DevicePagePool
// (engine/cuda/device_page_pool.h) records between flushes, cut into
// phases that one kernel launch each may run concurrently. Plain C++ (no
// CUDA), so the batching rules are tested on any machine
// (tests/unit/kvstore/page_source_ops_test.cpp runs the whole cache on a
// source that executes each phase's ops in reverse order).
//
// Rule: the ops of a batch take effect as if run in record order. Within a
// phase no op reads a page another op of the phase writes, and no two ops
// write overlapping bytes, so its ops may run in any order or at once. A
// new phase starts at an op that would break this: it reads a page the
// current phase writes, writes a page the current phase reads (both page-
// granular: the cache's batches never mix them on one page, except when a
// step's new rows are written before its retained rows were flushed), or
// writes bytes overlapping a write of the current phase (exact ranges:
// rows of one page are written side by side all the time). The decode hot
// path (begin_append: rows copied from ring pages into retained pages,
// positions written) is one phase.
//
// Cost per op: O(1) plus, for a write to a page the phase already writes,
// a walk over that page's writes in the phase (<= rows per page).
//
// Threading: the owner thread of its pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/status.h"
#include "engine/cuda/page_ops.h"

namespace kvgate::engine::cuda {

class PageOpRecorder {
 public:
  // Over `n_pages` pages of `page_bytes` from `arena` (an address range;
  // never dereferenced).
  PageOpRecorder(const std::byte* arena, int64_t page_bytes, int64_t n_pages);

  // INVALID_ARGUMENT (naming `what`) unless [p, p + bytes) lies inside one
  // page of the arena and bytes is in [1, 2^32).
  Status check(const std::byte* p, int64_t bytes, const char* what) const;
  // Appends `op` (dst and, unless staged, src: arena addresses) after the
  // checks above (on error nothing is recorded).
  Status record(const PageOpDesc& op);

  const std::vector<PageOpDesc>& ops() const { return ops_; }
  // Index of each phase's first op (increasing; empty without ops).
  const std::vector<int32_t>& phase_starts() const { return phase_starts_; }
  // Phase i covers ops [phase_begin(i), phase_end(i)).
  int64_t phase_begin(size_t i) const { return phase_starts_[i]; }
  int64_t phase_end(size_t i) const {
    return i + 1 < phase_starts_.size() ? phase_starts_[i + 1] : static_cast<int64_t>(ops_.size());
  }
  // Forgets the batch (after a flush ran it).
  void clear();

 private:
  int64_t page_of(uint64_t address) const {
    return static_cast<int64_t>((address - arena_) / static_cast<uint64_t>(page_bytes_));
  }
  void next_phase();

  uint64_t arena_;
  int64_t page_bytes_;
  int64_t n_pages_;
  std::vector<PageOpDesc> ops_;
  std::vector<int32_t> prev_write_;  // previous op of the same phase writing the same page
  std::vector<int32_t> phase_starts_;
  // Per page: the phase stamp that last read / wrote it (== phase_ while
  // that phase is current) and the last op writing it then.
  std::vector<uint32_t> read_phase_;
  std::vector<uint32_t> write_phase_;
  std::vector<int32_t> last_write_op_;
  uint32_t phase_ = 1;
};

}  // namespace kvgate::engine::cuda
