#include "kvstore/page_pool.h"

#include <limits>
#include <string>

namespace kvgate::kvstore {

Result<std::unique_ptr<PagePool>> PagePool::create(int64_t page_bytes, int64_t capacity_bytes) {
  if (page_bytes < 64 || page_bytes % 64 != 0) {
    return invalid_argument("page pool: page_bytes " + std::to_string(page_bytes) +
                            " is not a positive multiple of 64");
  }
  const int64_t n_pages = capacity_bytes / page_bytes;
  if (capacity_bytes < page_bytes) {
    return invalid_argument("page pool: capacity " + std::to_string(capacity_bytes) +
                            " bytes holds no page of " + std::to_string(page_bytes) + " bytes");
  }
  if (n_pages > std::numeric_limits<int32_t>::max()) {
    return invalid_argument("page pool: " + std::to_string(n_pages) +
                            " pages exceed the page id range");
  }
  std::byte* arena = nullptr;
  try {
    arena = static_cast<std::byte*>(
        ::operator new[](static_cast<size_t>(n_pages * page_bytes), std::align_val_t{64}));
  } catch (const std::bad_alloc&) {
    return resource_exhausted("page pool: cannot allocate " + std::to_string(n_pages * page_bytes) +
                              " bytes");
  }
  return std::unique_ptr<PagePool>(new PagePool(page_bytes, n_pages, arena));
}

PagePool::PagePool(int64_t page_bytes, int64_t n_pages, std::byte* arena)
    : page_bytes_(page_bytes), n_pages_(n_pages), arena_(arena), in_use_(n_pages, 0) {
  free_list_.reserve(n_pages);
  // Popped from the back: low pages go out first, which keeps a lightly
  // used pool compact.
  for (int64_t i = n_pages - 1; i >= 0; --i) free_list_.push_back(static_cast<int32_t>(i));
}

Result<PageId> PagePool::allocate() {
  if (free_list_.empty()) {
    return resource_exhausted("page pool: all " + std::to_string(n_pages_) + " pages of " +
                              std::to_string(page_bytes_) + " bytes are in use");
  }
  const int32_t id = free_list_.back();
  free_list_.pop_back();
  in_use_[id] = 1;
  return PageId{id};
}

Status PagePool::free(PageId page) {
  if (page.value < 0 || page.value >= n_pages_) {
    return invalid_argument("page pool: page " + std::to_string(page.value) +
                            " is not from this pool");
  }
  if (!in_use_[page.value]) {
    return invalid_argument("page pool: page " + std::to_string(page.value) + " is already free");
  }
  in_use_[page.value] = 0;
  free_list_.push_back(page.value);
  return Status();
}

}  // namespace kvgate::kvstore
