#include "engine/cuda/page_op_recorder.h"

#include <algorithm>
#include <string>

namespace kvgate::engine::cuda {

PageOpRecorder::PageOpRecorder(const std::byte* arena, int64_t page_bytes, int64_t n_pages)
    : arena_(reinterpret_cast<uint64_t>(arena)),
      page_bytes_(page_bytes),
      n_pages_(n_pages),
      read_phase_(static_cast<size_t>(n_pages), 0),
      write_phase_(static_cast<size_t>(n_pages), 0),
      last_write_op_(static_cast<size_t>(n_pages), -1) {}

Status PageOpRecorder::check(const std::byte* p, int64_t bytes, const char* what) const {
  const auto a = reinterpret_cast<uint64_t>(p);
  const uint64_t end = static_cast<uint64_t>(n_pages_) * static_cast<uint64_t>(page_bytes_);
  const bool ok = a >= arena_ && a - arena_ < end && bytes > 0 && bytes < (int64_t{1} << 32) &&
                  page_of(a) == page_of(a + static_cast<uint64_t>(bytes) - 1);
  if (ok) return Status();
  return invalid_argument(std::string("page ops: ") + what + " of " + std::to_string(bytes) +
                          " bytes at arena offset " +
                          std::to_string(static_cast<int64_t>(a - arena_)) +
                          " is not inside one page");
}

void PageOpRecorder::next_phase() {
  ++phase_;
  if (phase_ == 0) {  // wrapped after 2^32 phases: old stamps could match again
    std::fill(read_phase_.begin(), read_phase_.end(), 0u);
    std::fill(write_phase_.begin(), write_phase_.end(), 0u);
    phase_ = 1;
  }
}

void PageOpRecorder::clear() {
  ops_.clear();
  prev_write_.clear();
  phase_starts_.clear();
  next_phase();  // every stamp of the batch goes stale
}

Status PageOpRecorder::record(const PageOpDesc& op) {
  KVGATE_RETURN_IF_ERROR(check(reinterpret_cast<const std::byte*>(op.dst), op.bytes, "op to"));
  if (!op.staged) {
    KVGATE_RETURN_IF_ERROR(
        check(reinterpret_cast<const std::byte*>(op.src), op.bytes, "copy from"));
  }
  const int64_t dst_page = page_of(op.dst);
  const int64_t src_page = op.staged ? -1 : page_of(op.src);
  bool hazard = phase_starts_.empty();
  if (!hazard && src_page >= 0 && write_phase_[src_page] == phase_) hazard = true;
  if (!hazard && read_phase_[dst_page] == phase_) hazard = true;
  if (!hazard && write_phase_[dst_page] == phase_) {
    for (int32_t i = last_write_op_[dst_page]; i >= 0; i = prev_write_[i]) {
      const PageOpDesc& o = ops_[static_cast<size_t>(i)];
      if (op.dst < o.dst + o.bytes && o.dst < op.dst + op.bytes) {
        hazard = true;
        break;
      }
    }
  }
  if (hazard) {
    if (!phase_starts_.empty()) next_phase();
    phase_starts_.push_back(static_cast<int32_t>(ops_.size()));
  }
  const auto idx = static_cast<int32_t>(ops_.size());
  prev_write_.push_back(write_phase_[dst_page] == phase_ ? last_write_op_[dst_page] : -1);
  write_phase_[dst_page] = phase_;
  last_write_op_[dst_page] = idx;
  if (src_page >= 0) read_phase_[src_page] = phase_;
  ops_.push_back(op);
  return Status();
}

}  // namespace kvgate::engine::cuda
