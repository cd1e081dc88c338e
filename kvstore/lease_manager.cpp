#include "kvstore/lease_manager.h"

#include <cassert>
#include <string>

namespace kvgate::kvstore {
namespace {

std::string lease_name(LeaseId lease) {
  return "lease " + std::to_string(lease.value());
}

}  // namespace

Result<std::unique_ptr<LeaseManager>> LeaseManager::create(PagePool* pool) {
  if (pool == nullptr) return invalid_argument("lease manager: no page pool");
  if (pool->used_pages() != 0) {
    return failed_precondition("lease manager: the pool already has " +
                               std::to_string(pool->used_pages()) +
                               " pages in use; the manager must be its only client");
  }
  return std::unique_ptr<LeaseManager>(new LeaseManager(pool, pool, pool->n_pages()));
}

Result<std::unique_ptr<LeaseManager>> LeaseManager::create(PageSource* source, int64_t n_pages) {
  if (source == nullptr) return invalid_argument("lease manager: no page source");
  if (n_pages < 1) {
    return invalid_argument("lease manager: a page source of " + std::to_string(n_pages) +
                            " pages");
  }
  if (source->free_pages() != n_pages) {
    return failed_precondition(
        "lease manager: the page source has " + std::to_string(source->free_pages()) + " of " +
        std::to_string(n_pages) + " pages free; the manager must be its only client");
  }
  return std::unique_ptr<LeaseManager>(new LeaseManager(source, nullptr, n_pages));
}

LeaseManager::LeaseManager(PageSource* source, PagePool* pool, int64_t n_pages)
    : source_(source),
      pool_(pool),
      page_bytes_(source->page_bytes()),
      n_pages_(n_pages),
      free_pages_(n_pages),
      reserved_pages_(0),
      used_pages_(0),
      page_owner_(n_pages, 0),
      page_slot_(n_pages, -1) {}

LeaseManager::~LeaseManager() {
  for (auto& [id, lease] : leases_) {
    for (PageId p : lease.pages) {
      [[maybe_unused]] const Status st = source_->free(p);
      assert(st.ok());
    }
  }
}

int64_t LeaseManager::pages_for(int64_t bytes) const {
  return bytes / page_bytes_ + (bytes % page_bytes_ != 0 ? 1 : 0);
}

LeaseManager::Lease* LeaseManager::find_lease(LeaseId lease) {
  auto it = leases_.find(lease);
  return it == leases_.end() ? nullptr : &it->second;
}

const LeaseManager::Lease* LeaseManager::find_lease(LeaseId lease) const {
  auto it = leases_.find(lease);
  return it == leases_.end() ? nullptr : &it->second;
}

Status LeaseManager::not_found_status(LeaseId lease) const {
  return not_found(lease_name(lease) + ": unknown, released or expired");
}

Result<LeaseId> LeaseManager::grant(RequestId request, int64_t bytes, LeaseClock::duration ttl,
                                    LeaseClock::time_point now) {
  if (!request.valid()) return invalid_argument("lease grant: request id 0");
  const std::string who = "lease grant for request " + std::to_string(request.value());
  if (bytes <= 0) return invalid_argument(who + ": " + std::to_string(bytes) + " bytes");
  if (ttl <= LeaseClock::duration::zero()) return invalid_argument(who + ": ttl is not positive");
  if (now > LeaseClock::time_point::max() - ttl) {
    return invalid_argument(who + ": ttl overflows the clock");
  }
  if (auto it = by_request_.find(request); it != by_request_.end()) {
    return failed_precondition(who + ": the request already holds " + lease_name(it->second));
  }
  const int64_t pages = pages_for(bytes);
  if (pages > free_pages_) {
    return resource_exhausted(who + ": needs " + std::to_string(pages * page_bytes_) + " bytes (" +
                              std::to_string(bytes) + " rounded up to " + std::to_string(pages) +
                              " pages of " + std::to_string(page_bytes_) + "), " +
                              std::to_string(free_bytes()) + " bytes free");
  }
  const LeaseId id{next_lease_++};
  Lease lease;
  lease.request = request;
  lease.state = LeaseState::kReserved;
  lease.granted_pages = pages;
  lease.deadline = now + ttl;
  deadlines_.emplace(lease.deadline, id);
  leases_.emplace(id, std::move(lease));
  by_request_.emplace(request, id);
  free_pages_ -= pages;
  reserved_pages_ += pages;
  return id;
}

Result<int64_t> LeaseManager::extend(LeaseId lease, int64_t extra_bytes,
                                     LeaseClock::time_point now) {
  Lease* l = find_lease(lease);
  if (l == nullptr) return not_found_status(lease);
  if (extra_bytes <= 0) {
    return invalid_argument(lease_name(lease) + ": extend by " + std::to_string(extra_bytes) +
                            " bytes");
  }
  if (l->state == LeaseState::kReserved && now >= l->deadline) {
    return Status(StatusCode::kDeadlineExceeded, lease_name(lease) + ": expired, cannot extend");
  }
  const int64_t pages = pages_for(extra_bytes);
  if (pages > free_pages_) {
    return resource_exhausted(lease_name(lease) + ": extend needs " +
                              std::to_string(pages * page_bytes_) + " more bytes (" +
                              std::to_string(pages) + " pages), " + std::to_string(free_bytes()) +
                              " bytes free");
  }
  free_pages_ -= pages;
  (l->state == LeaseState::kReserved ? reserved_pages_ : used_pages_) += pages;
  l->granted_pages += pages;
  return l->granted_pages * page_bytes_;
}

Status LeaseManager::commit(LeaseId lease, int64_t actual_bytes, LeaseClock::time_point now) {
  Lease* l = find_lease(lease);
  if (l == nullptr) return not_found_status(lease);
  const std::string who = lease_name(lease);
  if (actual_bytes < 0) {
    return invalid_argument(who + ": commit of " + std::to_string(actual_bytes) + " bytes");
  }
  if (l->state == LeaseState::kCommitted) return failed_precondition(who + ": already committed");
  if (now >= l->deadline) {
    return Status(StatusCode::kDeadlineExceeded, who + ": expired, cannot commit");
  }
  const int64_t granted_bytes = l->granted_pages * page_bytes_;
  if (actual_bytes > granted_bytes) {
    return out_of_range(who + ": commit of " + std::to_string(actual_bytes) +
                        " actual bytes exceeds the " + std::to_string(granted_bytes) +
                        " bytes reserved");
  }
  const int64_t keep = pages_for(actual_bytes);
  const auto taken = static_cast<int64_t>(l->pages.size());
  if (taken > keep) {
    return failed_precondition(
        who + ": " + std::to_string(taken) + " pages taken, more than the " + std::to_string(keep) +
        " pages of the " + std::to_string(actual_bytes) + " committed bytes; return pages first");
  }
  deadlines_.erase({l->deadline, lease});
  reserved_pages_ -= l->granted_pages;
  used_pages_ += keep;
  free_pages_ += l->granted_pages - keep;
  l->granted_pages = keep;
  l->state = LeaseState::kCommitted;
  return Status();
}

void LeaseManager::drop(std::unordered_map<LeaseId, Lease>::iterator it) {
  Lease& l = it->second;
  for (PageId p : l.pages) {
    [[maybe_unused]] const Status st = source_->free(p);
    assert(st.ok());
    page_owner_[p.value] = 0;
    page_slot_[p.value] = -1;
  }
  taken_pages_ -= static_cast<int64_t>(l.pages.size());
  if (l.state == LeaseState::kReserved) {
    reserved_pages_ -= l.granted_pages;
    deadlines_.erase({l.deadline, it->first});
  } else {
    used_pages_ -= l.granted_pages;
  }
  free_pages_ += l.granted_pages;
  by_request_.erase(l.request);
  leases_.erase(it);
}

Status LeaseManager::release(LeaseId lease) {
  auto it = leases_.find(lease);
  if (it == leases_.end()) return not_found_status(lease);
  drop(it);
  return Status();
}

std::vector<ExpiredLease> LeaseManager::expire(LeaseClock::time_point now) {
  std::vector<ExpiredLease> out;
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    const LeaseId id = deadlines_.begin()->second;
    auto it = leases_.find(id);
    assert(it != leases_.end() && it->second.state == LeaseState::kReserved);
    out.push_back({id, it->second.request, it->second.granted_pages * page_bytes_});
    drop(it);  // erases the deadline entry
  }
  return out;
}

Result<PageId> LeaseManager::take_page(LeaseId lease) {
  Lease* l = find_lease(lease);
  if (l == nullptr) return not_found_status(lease);
  if (static_cast<int64_t>(l->pages.size()) >= l->granted_pages) {
    return out_of_range(lease_name(lease) + ": reservation overrun: all " +
                        std::to_string(l->granted_pages) + " pages (" +
                        std::to_string(l->granted_pages * page_bytes_) + " bytes) taken");
  }
  Result<PageId> page = source_->allocate();
  if (!page.ok()) {
    // Only if someone took pages from the pool behind our back.
    return internal_error(
        "lease manager: pool has no page for a reserved one (used outside "
        "the manager?): " +
        page.status().message());
  }
  if (page->value < 0 || page->value >= n_pages_) {
    // A source whose ids are not [0, n_pages) (create() was told wrong).
    (void)source_->free(*page);
    return internal_error("lease manager: the page source handed out page " +
                          std::to_string(page->value) + ", not in [0, " + std::to_string(n_pages_) +
                          ")");
  }
  page_owner_[page->value] = lease.value();
  page_slot_[page->value] = static_cast<int64_t>(l->pages.size());
  l->pages.push_back(*page);
  ++taken_pages_;
  return page;
}

Result<std::vector<PageId>> LeaseManager::take_pages(LeaseId lease, int64_t n) {
  Lease* l = find_lease(lease);
  if (l == nullptr) return not_found_status(lease);
  if (n < 0) return invalid_argument(lease_name(lease) + ": take " + std::to_string(n) + " pages");
  const auto taken = static_cast<int64_t>(l->pages.size());
  if (n > l->granted_pages - taken) {
    return out_of_range(lease_name(lease) + ": reservation overrun: " + std::to_string(n) +
                        " pages asked, " + std::to_string(taken) + " of " +
                        std::to_string(l->granted_pages) + " already taken");
  }
  if (n > source_->free_pages()) {
    return internal_error("lease manager: pool has " + std::to_string(source_->free_pages()) +
                          " free pages for " + std::to_string(n) +
                          " reserved ones (used outside the manager?)");
  }
  std::vector<PageId> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    Result<PageId> page = take_page(lease);
    assert(page.ok());  // checked above: budget and pool both suffice
    out.push_back(*page);
  }
  return out;
}

Status LeaseManager::return_page(LeaseId lease, PageId page) {
  Lease* l = find_lease(lease);
  if (l == nullptr) return not_found_status(lease);
  if (page.value < 0 || page.value >= n_pages_ || page_owner_[page.value] != lease.value()) {
    return invalid_argument(lease_name(lease) + ": page " + std::to_string(page.value) +
                            " is not held by it");
  }
  const int64_t slot = page_slot_[page.value];
  const PageId last = l->pages.back();
  l->pages[slot] = last;
  page_slot_[last.value] = slot;
  l->pages.pop_back();
  page_owner_[page.value] = 0;
  page_slot_[page.value] = -1;
  --taken_pages_;
  [[maybe_unused]] const Status st = source_->free(page);
  assert(st.ok());
  return Status();
}

int64_t LeaseManager::pages_left(LeaseId lease) const {
  const Lease* l = find_lease(lease);
  return l == nullptr ? 0 : l->granted_pages - static_cast<int64_t>(l->pages.size());
}

std::span<const PageId> LeaseManager::pages(LeaseId lease) const {
  const Lease* l = find_lease(lease);
  if (l == nullptr) return {};
  return l->pages;
}

Result<LeaseInfo> LeaseManager::info(LeaseId lease) const {
  const Lease* l = find_lease(lease);
  if (l == nullptr) return not_found_status(lease);
  return LeaseInfo{lease,
                   l->request,
                   l->state,
                   l->granted_pages * page_bytes_,
                   static_cast<int64_t>(l->pages.size()),
                   l->deadline};
}

Result<LeaseId> LeaseManager::find(RequestId request) const {
  auto it = by_request_.find(request);
  if (it == by_request_.end()) {
    return not_found("request " + std::to_string(request.value()) + " holds no lease");
  }
  return it->second;
}

LeaseStats LeaseManager::stats() const {
  LeaseStats s;
  s.capacity_bytes = capacity_bytes();
  s.free_bytes = free_pages_ * page_bytes_;
  s.reserved_bytes = reserved_pages_ * page_bytes_;
  s.used_bytes = used_pages_ * page_bytes_;
  s.reserved_leases = static_cast<int64_t>(deadlines_.size());
  s.committed_leases = static_cast<int64_t>(leases_.size() - deadlines_.size());
  s.taken_pages = taken_pages_;
  return s;
}

}  // namespace kvgate::kvstore
