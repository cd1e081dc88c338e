// KV in device memory on a decode node (engine.backend: cuda): the
// request's lease is still kept — and the transport still lands — in the
// node's host page pool (so placement, leases, Extend and the transport are
// unchanged), and each admitted cache is then moved into a device page pool
// (move_to_device), where decode runs.
//
// LeaseChargedPages: the PageSource a device cache draws from. Every device
// page it holds is charged against the request's lease by one host page
// taken from the lease (held, unused), so the lease's budget, pages_left()
// and the coordinator's accounting are those of the host path exactly, and
// — with the device pool at least as large as the host pool — a device
// allocation never fails where the lease allows it. data() and the memory
// operations are the device pool's.
//
// move_to_device: exports the host cache's wire image, writes each page
// into a fresh device page (PageSource::write: staged and batched by a
// DevicePagePool, flushed by the caller before the next kernel), adopts
// the image on those pages, destroys the host cache (its pages go back to
// the lease) and takes as many lease pages to back the device pages — so
// the lease never needs twice the pages, and ends charged exactly as
// before the move.
//
// Threading: the decode engine's thread, as every PageSource.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "common/status.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/lease_manager.h"
#include "kvstore/page_pool.h"

namespace kvgate::decode {

class LeaseChargedPages final : public kvstore::PageSource {
 public:
  // `manager`, `device` must outlive this; device pages of `device`'s size
  // equal to the lease pool's.
  LeaseChargedPages(kvstore::LeaseManager* manager, LeaseId lease, kvstore::PageSource* device);
  ~LeaseChargedPages() override;
  LeaseChargedPages(const LeaseChargedPages&) = delete;
  LeaseChargedPages& operator=(const LeaseChargedPages&) = delete;

  // A device page charged with one lease page; the lease's error
  // (OUT_OF_RANGE "reservation overrun") or the device pool's.
  Result<kvstore::PageId> allocate() override;
  // Frees the device page and returns one of the charged lease pages.
  Status free(kvstore::PageId page) override;
  std::byte* data(kvstore::PageId page) override { return device_->data(page); }
  const std::byte* data(kvstore::PageId page) const override { return device_->data(page); }
  int64_t page_bytes() const override { return device_->page_bytes(); }
  int64_t free_pages() const override;
  bool host_accessible() const override { return device_->host_accessible(); }
  void copy(std::byte* dst, const std::byte* src, int64_t bytes) override {
    device_->copy(dst, src, bytes);
  }
  void write(std::byte* dst, const void* src, int64_t bytes) override {
    device_->write(dst, src, bytes);
  }
  void read(void* dst, const std::byte* src, int64_t bytes) override {
    device_->read(dst, src, bytes);
  }

  // Device pages held (== lease pages charged once backed).
  int64_t held() const { return held_; }

 private:
  friend Result<kvstore::CompressedKvCache> move_to_device(
      std::optional<kvstore::CompressedKvCache>& host, LeaseChargedPages& pages);
  kvstore::LeaseManager* manager_;
  LeaseId lease_;
  kvstore::PageSource* device_;
  std::vector<kvstore::PageId> charge_;  // lease pages backing the device pages
  int64_t held_ = 0;
  int64_t unbacked_ = 0;  // device pages adopted before their lease pages were free
};

// Moves `host` (a cache on the request's lease, host-accessible pages)
// into device pages drawn through `pages` (on the same lease). On success
// `host` is reset (its pages are back with the lease)
// and the returned cache continues exactly where it left off. On error the
// host cache is unchanged and no device page is kept.
Result<kvstore::CompressedKvCache> move_to_device(std::optional<kvstore::CompressedKvCache>& host,
                                                 LeaseChargedPages& pages);

}  // namespace kvgate::decode
