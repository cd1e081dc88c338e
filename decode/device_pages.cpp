#include "decode/device_pages.h"

#include <algorithm>
#include <string>

#include "kvstore/wire_image.h"

namespace kvgate::decode {

LeaseChargedPages::LeaseChargedPages(kvstore::LeaseManager* manager, LeaseId lease,
                                     kvstore::PageSource* device)
    : manager_(manager), lease_(lease), device_(device) {}

LeaseChargedPages::~LeaseChargedPages() {
  // The cache drawing from this source is gone first (it is declared
  // after it); anything still charged goes back to the lease.
  for (kvstore::PageId p : charge_) (void)manager_->return_page(lease_, p);
}

Result<kvstore::PageId> LeaseChargedPages::allocate() {
  KVGATE_ASSIGN_OR_RETURN(const kvstore::PageId host, manager_->take_page(lease_));
  auto page = device_->allocate();
  if (!page.ok()) {
    (void)manager_->return_page(lease_, host);
    return page.status();
  }
  charge_.push_back(host);
  ++held_;
  return *page;
}

Status LeaseChargedPages::free(kvstore::PageId page) {
  KVGATE_RETURN_IF_ERROR(device_->free(page));
  --held_;
  if (unbacked_ > 0) {
    --unbacked_;
    return Status();
  }
  if (charge_.empty()) return internal_error("device pages: a page freed that was never charged");
  const kvstore::PageId host = charge_.back();
  charge_.pop_back();
  return manager_->return_page(lease_, host);
}

int64_t LeaseChargedPages::free_pages() const {
  return std::min(manager_->pages_left(lease_), device_->free_pages());
}

Result<kvstore::CompressedKvCache> move_to_device(std::optional<kvstore::CompressedKvCache>& host,
                                                 LeaseChargedPages& pages) {
  if (!host) return invalid_argument("move to device: no cache");
  kvstore::PageSource* dev = pages.device_;
  KVGATE_ASSIGN_OR_RETURN(const kvstore::WireImage image, kvstore::export_wire_image(*host));
  if (image.page_bytes != dev->page_bytes()) {
    return invalid_argument("move to device: device pages of " + std::to_string(dev->page_bytes()) +
                            " bytes, the cache's of " + std::to_string(image.page_bytes));
  }
  const kvstore::PagePool* host_pool = pages.manager_->pool();
  std::vector<kvstore::PageId> got;
  got.reserve(image.pages.size());
  const auto undo = [&] {
    for (auto p = got.rbegin(); p != got.rend(); ++p) (void)dev->free(*p);
  };
  for (kvstore::PageId hp : image.pages) {
    auto d = dev->allocate();
    if (!d.ok()) {
      undo();
      return Status(d.status().code(), "move to device: " + d.status().message());
    }
    got.push_back(*d);
    dev->write(dev->data(*d), host_pool->data(hp), image.page_bytes);
  }
  // The adopted pages are the device cache's from here; their lease pages
  // are still the host cache's, so they start unbacked.
  const auto n = static_cast<int64_t>(got.size());
  pages.held_ += n;
  pages.unbacked_ += n;
  auto cache = kvstore::adopt_wire_image(host->layout(), &pages, image.descriptor, got);
  if (!cache.ok()) {
    pages.held_ -= n;
    pages.unbacked_ -= n;
    undo();
    return cache.status();
  }
  host.reset();  // its pages go back to the lease
  // Back the device pages with as many lease pages (just freed, so there).
  auto backing = pages.manager_->take_pages(pages.lease_, pages.unbacked_);
  if (backing.ok()) {
    pages.charge_.insert(pages.charge_.end(), backing->begin(), backing->end());
    pages.unbacked_ = 0;
  }
  // Else (cannot happen: the host cache held at least these pages) the
  // pages stay unbacked: free() then returns nothing to the lease for them.
  return std::move(*cache);
}

}  // namespace kvgate::decode
