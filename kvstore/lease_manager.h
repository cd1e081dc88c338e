// LeaseManager: the decode node's KV pool accounting as leases (DESIGN.md §5).
//
// A lease reserves bytes of one PagePool (or another PageSource: create(source,
// n_pages), e.g. a GPU node's DevicePagePool) for one request, so no other
// request can take them. Its life, driven by the control messages of
// common/control_protocol.h:
//
//   grant   (Reserve -> ReserveGrant/ReserveDeny)  reserved, expires at
//                                                  now + ttl unless committed
//   extend  (Extend -> ExtendResult)               more reserved bytes, all
//                                                  or nothing
//   commit  (Commit, after the KV arrived and      used for actual_bytes; the
//            verified)                             rest goes back to free; no
//                                                  longer expires
//   release (Release, Cancel, finish)              everything back to free
//   expire  (the engine loop's timer)              uncommitted leases past
//                                                  their deadline, freed and
//                                                  returned for cancelling
//
// Accounting is in bytes and page-granular: every byte count a lease holds
// is rounded up to whole pages of the pool (a grant of 1 byte holds one
// page), so what was granted can always be handed out as pages. Then
//
//   free_bytes + reserved_bytes + used_bytes == capacity_bytes   (always)
//
// where reserved is the sum over uncommitted leases and used the sum over
// committed ones; all three are multiples of page_bytes. A grant of exactly
// free_bytes succeeds; one byte more fails.
//
// Pages: take_pages()/take_page() hand out pool pages charged against a
// lease, never more than it holds (OUT_OF_RANGE "reservation overrun");
// return_page() gives one back; release and expiry return all of them.
// The manager must be the pool's only client (create() checks that the pool
// is untouched): pages taken from the pool directly would not be accounted.
// A lease's pages are laid out for the transfer in pages() order.
//
// Caches: LeasePages (below) is a request's lease as a PageSource, so a
// CompressedKvCache built on it (decode node: adopt_wire_image of the
// landed KV) takes and returns its pages against that lease.
//
// Time is passed in (`now`), never read here, so behaviour is deterministic.
// A lease is expired once now >= its deadline (granted_at + ttl); until
// expire() reclaims it, extend and commit on it fail with DEADLINE_EXCEEDED
// and take_pages still works within what it holds.
//
// Threading: not synchronized. One owner thread (the decode engine loop,
// which also owns the pool and the caches) calls every method, LeasePages
// included. No call blocks.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/control_protocol.h"
#include "common/status.h"
#include "kvstore/page_pool.h"

namespace kvgate::kvstore {

using LeaseClock = std::chrono::steady_clock;

enum class LeaseState : uint8_t {
  kReserved = 1,   // granted, not committed: counts as reserved, expires
  kCommitted = 2,  // KV arrived and verified: counts as used, never expires
};

// A lease as seen from outside (a copy; cheap).
struct LeaseInfo {
  LeaseId lease_id;
  RequestId request_id;
  LeaseState state = LeaseState::kReserved;
  int64_t granted_bytes = 0;          // what the lease holds now (page-granular)
  int64_t taken_pages = 0;            // pages handed out against it
  LeaseClock::time_point deadline{};  // meaningful while kReserved
};

// Freed by expire(): what the caller needs to cancel the transfer and tell
// the coordinator (Release with reason "expired").
struct ExpiredLease {
  LeaseId lease_id;
  RequestId request_id;
  int64_t granted_bytes = 0;
  bool operator==(const ExpiredLease&) const = default;
};

// For Heartbeat (pool_free/reserved/used_bytes) and metrics.
// free_bytes + reserved_bytes + used_bytes == capacity_bytes.
struct LeaseStats {
  int64_t capacity_bytes = 0;
  int64_t free_bytes = 0;
  int64_t reserved_bytes = 0;  // held by uncommitted leases
  int64_t used_bytes = 0;      // held by committed leases
  int64_t reserved_leases = 0;
  int64_t committed_leases = 0;
  int64_t taken_pages = 0;  // pool pages handed out (<= (reserved + used) / page_bytes)
  bool operator==(const LeaseStats&) const = default;
};

class LeaseManager {
 public:
  // A manager over `pool`, which must outlive it and have no page in use
  // (FAILED_PRECONDITION otherwise; INVALID_ARGUMENT for a null pool).
  static Result<std::unique_ptr<LeaseManager>> create(PagePool* pool);
  // The same over any page source with page ids in [0, n_pages) — e.g. a
  // GPU decode node's engine/cuda DevicePagePool — which must outlive the
  // manager and have all n_pages free (FAILED_PRECONDITION otherwise;
  // INVALID_ARGUMENT for a null source or n_pages < 1). Leases and
  // LeasePages behave as over a PagePool; LeasePages' memory operations
  // are the source's.
  static Result<std::unique_ptr<LeaseManager>> create(PageSource* source, int64_t n_pages);

  LeaseManager(const LeaseManager&) = delete;
  LeaseManager& operator=(const LeaseManager&) = delete;
  // Returns every page still taken to the pool.
  ~LeaseManager();

  // Reserves `bytes` (> 0, rounded up to whole pages) for `request` until
  // now + ttl (ttl > 0). Errors: INVALID_ARGUMENT (bytes <= 0, ttl <= 0 or
  // past the clock's range, request id 0), FAILED_PRECONDITION (the request
  // already holds a lease; names it), RESOURCE_EXHAUSTED (retryable; the
  // message gives the bytes needed and free). On error nothing changes.
  // Lease ids are never reused.
  Result<LeaseId> grant(RequestId request, int64_t bytes, LeaseClock::duration ttl,
                        LeaseClock::time_point now);

  // Adds ceil(extra_bytes / page_bytes) pages to what the lease holds, all
  // or nothing; returns the new granted_bytes. The deadline does not move.
  // A committed lease may grow too (decode growth past the commit), counted
  // as used. Errors: INVALID_ARGUMENT (extra_bytes <= 0), NOT_FOUND,
  // DEADLINE_EXCEEDED (uncommitted and past its deadline), RESOURCE_EXHAUSTED
  // (needed and free bytes in the message; the lease is unchanged).
  Result<int64_t> extend(LeaseId lease, int64_t extra_bytes, LeaseClock::time_point now);

  // The KV arrived and verified: the lease becomes used for actual_bytes
  // (>= 0, rounded up to pages, <= granted_bytes), returns the rest to free
  // and stops expiring. Errors: INVALID_ARGUMENT (actual_bytes < 0),
  // NOT_FOUND, FAILED_PRECONDITION (already committed; or more pages taken
  // than actual_bytes keeps: return them first), DEADLINE_EXCEEDED (past its
  // deadline), OUT_OF_RANGE (actual_bytes > granted_bytes; names both). On
  // error nothing changes.
  Status commit(LeaseId lease, int64_t actual_bytes, LeaseClock::time_point now);

  // Finish or cancel: the lease's bytes and taken pages go back to the pool.
  // NOT_FOUND for a lease that is unknown, already released or expired
  // (nothing changes). Any cache drawing on the lease must be gone first:
  // its pages are free after this.
  Status release(LeaseId lease);

  // Frees every uncommitted lease with deadline <= now (bytes and pages) and
  // returns them, in deadline order, so the caller can cancel their
  // transfers. Committed leases never expire.
  std::vector<ExpiredLease> expire(LeaseClock::time_point now);

  // Hands out n >= 0 pages of the pool charged against the lease; the lease
  // may hold at most granted_bytes / page_bytes pages. OUT_OF_RANGE
  // ("reservation overrun", taking nothing) beyond that; NOT_FOUND;
  // INVALID_ARGUMENT for n < 0. Allocates the returned vector.
  Result<std::vector<PageId>> take_pages(LeaseId lease, int64_t n);
  // One page (no allocation): same rules as take_pages(lease, 1).
  Result<PageId> take_page(LeaseId lease);
  // Gives back one page taken against `lease`. NOT_FOUND for an unknown
  // lease; INVALID_ARGUMENT for a page the lease does not hold. O(1); moves
  // the lease's last page into the returned page's place in pages().
  Status return_page(LeaseId lease, PageId page);

  // Pages the lease may still take (0 for an unknown lease).
  int64_t pages_left(LeaseId lease) const;
  // The lease's taken pages in take order (until a return_page), for the
  // pool descriptor. Empty for an unknown lease. Valid until the next
  // mutating call.
  std::span<const PageId> pages(LeaseId lease) const;

  Result<LeaseInfo> info(LeaseId lease) const;
  // The live lease of a request (Cancel carries only the request id).
  Result<LeaseId> find(RequestId request) const;

  LeaseStats stats() const;
  // Largest grant that would succeed now (ReserveDeny::available_bytes).
  int64_t free_bytes() const { return free_pages_ * page_bytes_; }
  int64_t page_bytes() const { return page_bytes_; }
  int64_t capacity_bytes() const { return n_pages_ * page_bytes_; }
  // The PagePool the manager was created on (null over another source).
  PagePool* pool() const { return pool_; }
  // The page source (the PagePool, or the one given).
  PageSource* source() const { return source_; }

 private:
  struct Lease {
    RequestId request;
    LeaseState state = LeaseState::kReserved;
    int64_t granted_pages = 0;
    LeaseClock::time_point deadline{};
    std::vector<PageId> pages;  // taken against this lease
  };

  LeaseManager(PageSource* source, PagePool* pool, int64_t n_pages);

  // Pages holding `bytes` (>= 0), without overflow.
  int64_t pages_for(int64_t bytes) const;
  Lease* find_lease(LeaseId lease);
  const Lease* find_lease(LeaseId lease) const;
  // Returns the lease's bytes and pages and forgets it. `it` is valid.
  void drop(std::unordered_map<LeaseId, Lease>::iterator it);
  Status not_found_status(LeaseId lease) const;

  PageSource* source_;
  PagePool* pool_;  // source_ when it is a PagePool (direct data() calls), else null
  int64_t page_bytes_;
  int64_t n_pages_;
  int64_t free_pages_;      // not held by any lease
  int64_t reserved_pages_;  // held by kReserved leases
  int64_t used_pages_;      // held by kCommitted leases
  int64_t taken_pages_ = 0;
  uint64_t next_lease_ = 1;
  std::unordered_map<LeaseId, Lease> leases_;
  std::unordered_map<RequestId, LeaseId> by_request_;
  std::set<std::pair<LeaseClock::time_point, LeaseId>> deadlines_;  // kReserved only
  // By page index: the lease holding the page (0: none) and its index in
  // that lease's `pages`, for O(1) return_page and a check against strays.
  std::vector<uint64_t> page_owner_;
  std::vector<int64_t> page_slot_;
};

// A request's lease as a PageSource: a CompressedKvCache created on it
// (CompressedKvCache::create(layout, &lease_pages), adopt_wire_image) draws
// and returns its pages against the lease, so the cache cannot outgrow what
// the request reserved. allocate() past the lease is OUT_OF_RANGE
// "reservation overrun"; free_pages() is the lease's remaining budget, which
// is what the cache checks before taking anything, so an append past the
// lease is RESOURCE_EXHAUSTED and leaves the cache unchanged (extend() the
// lease, then retry).
//
// Ownership and lifetime: a small value (manager pointer + lease id) that
// borrows the manager. A cache keeps the PageSource* it was given, so the
// owner (the decode engine's per-sequence state) keeps this object at a
// stable address — e.g. in a std::unique_ptr next to the cache — for as
// long as the cache lives, and destroys in this order: the cache (its
// pages go back to the lease), then this object, then release() the lease.
// Copies are equivalent views of the same lease. Same owner thread as the
// manager.
class LeasePages final : public PageSource {
 public:
  LeasePages(LeaseManager* manager, LeaseId lease) : manager_(manager), lease_(lease) {}
  LeasePages(const LeasePages&) = default;
  LeasePages& operator=(const LeasePages&) = default;

  Result<PageId> allocate() override { return manager_->take_page(lease_); }
  Status free(PageId page) override { return manager_->return_page(lease_, page); }
  // Pages this view may still allocate (the lease's budget, not the pool's).
  int64_t free_pages() const override { return manager_->pages_left(lease_); }
  int64_t page_bytes() const override { return manager_->page_bytes(); }
  // Unchecked, as PagePool::data: `page` must be held. Over a PagePool a
  // direct (inlined) call; over another source, its data().
  std::byte* data(PageId page) override {
    PagePool* pool = manager_->pool();
    return pool != nullptr ? pool->data(page) : manager_->source()->data(page);
  }
  const std::byte* data(PageId page) const override {
    const PagePool* pool = manager_->pool();
    return pool != nullptr ? pool->data(page) : manager_->source()->data(page);
  }
  // The source's memory operations (a PagePool: host memory, memcpy).
  bool host_accessible() const override { return manager_->source()->host_accessible(); }
  void copy(std::byte* dst, const std::byte* src, int64_t bytes) override {
    manager_->source()->copy(dst, src, bytes);
  }
  void write(std::byte* dst, const void* src, int64_t bytes) override {
    manager_->source()->write(dst, src, bytes);
  }
  void read(void* dst, const std::byte* src, int64_t bytes) override {
    manager_->source()->read(dst, src, bytes);
  }
  LeaseId lease() const { return lease_; }
  LeaseManager* manager() const { return manager_; }

 private:
  LeaseManager* manager_;
  LeaseId lease_;
};

}  // namespace kvgate::kvstore
