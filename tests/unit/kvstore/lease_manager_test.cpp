#include "kvstore/lease_manager.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kvstore/compressed_cache.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::kvstore {
namespace {

using std::chrono::milliseconds;
using Clock = LeaseClock;

constexpr int64_t kPage = 256;

struct Fixture {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<LeaseManager> leases;
};

Fixture make(int64_t n_pages) {
  Fixture f;
  auto pool = PagePool::create(kPage, kPage * n_pages);
  EXPECT_TRUE(pool.ok()) << pool.status().to_string();
  f.pool = std::move(*pool);
  auto m = LeaseManager::create(f.pool.get());
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  f.leases = std::move(*m);
  return f;
}

bool has(const Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

void expect_invariant(const LeaseManager& m, const PagePool& pool) {
  const LeaseStats s = m.stats();
  EXPECT_EQ(s.free_bytes + s.reserved_bytes + s.used_bytes, s.capacity_bytes);
  EXPECT_EQ(s.capacity_bytes, pool.capacity_bytes());
  EXPECT_EQ(s.taken_pages, pool.used_pages());
  EXPECT_LE(s.taken_pages * kPage, s.reserved_bytes + s.used_bytes);
}

const Clock::time_point t0{};

TEST(LeaseManager, CreateChecksThePool) {
  EXPECT_EQ(LeaseManager::create(nullptr).status().code(), StatusCode::kInvalidArgument);
  auto pool = PagePool::create(kPage, kPage * 4);
  ASSERT_TRUE(pool.ok());
  auto page = (*pool)->allocate();
  ASSERT_TRUE(page.ok());
  auto m = LeaseManager::create(pool->get());
  EXPECT_EQ(m.status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*pool)->free(*page).ok());
  EXPECT_TRUE(LeaseManager::create(pool->get()).ok());
}

TEST(LeaseManager, GrantCommitReleaseCycle) {
  Fixture f = make(10);
  LeaseManager& m = *f.leases;
  EXPECT_EQ(m.stats(), (LeaseStats{10 * kPage, 10 * kPage, 0, 0, 0, 0, 0}));

  auto a = m.grant(RequestId{1}, 3 * kPage + 1, milliseconds(100), t0);  // 4 pages
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  EXPECT_EQ(m.stats(), (LeaseStats{10 * kPage, 6 * kPage, 4 * kPage, 0, 1, 0, 0}));
  auto info = m.info(*a);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->request_id, RequestId{1});
  EXPECT_EQ(info->state, LeaseState::kReserved);
  EXPECT_EQ(info->granted_bytes, 4 * kPage);
  EXPECT_EQ(info->deadline, t0 + milliseconds(100));
  EXPECT_EQ(*m.find(RequestId{1}), *a);

  // Commit 2 pages' worth plus a byte: keeps 3 pages, returns 1.
  ASSERT_TRUE(m.commit(*a, 2 * kPage + 1, t0 + milliseconds(99)).ok());
  EXPECT_EQ(m.stats(), (LeaseStats{10 * kPage, 7 * kPage, 0, 3 * kPage, 0, 1, 0}));
  EXPECT_EQ(m.info(*a)->state, LeaseState::kCommitted);
  EXPECT_EQ(m.info(*a)->granted_bytes, 3 * kPage);
  // Committed leases never expire.
  EXPECT_TRUE(m.expire(t0 + std::chrono::hours(1)).empty());
  EXPECT_EQ(m.commit(*a, kPage, t0).code(), StatusCode::kFailedPrecondition);

  ASSERT_TRUE(m.release(*a).ok());
  EXPECT_EQ(m.stats(), (LeaseStats{10 * kPage, 10 * kPage, 0, 0, 0, 0, 0}));
  EXPECT_EQ(m.find(RequestId{1}).status().code(), StatusCode::kNotFound);
  expect_invariant(m, *f.pool);
}

TEST(LeaseManager, ExhaustionIsExact) {
  Fixture f = make(8);
  LeaseManager& m = *f.leases;
  ASSERT_TRUE(m.grant(RequestId{1}, 3 * kPage - 5, milliseconds(10), t0).ok());  // 3 pages
  ASSERT_EQ(m.free_bytes(), 5 * kPage);

  auto over = m.grant(RequestId{2}, m.free_bytes() + 1, milliseconds(10), t0);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), StatusCode::kResourceExhausted);
  // The message gives what was needed and what is free.
  EXPECT_TRUE(has(over.status(), "needs " + std::to_string(6 * kPage) + " bytes"))
      << over.status().to_string();
  EXPECT_TRUE(has(over.status(), std::to_string(5 * kPage) + " bytes free"))
      << over.status().to_string();
  EXPECT_EQ(m.free_bytes(), 5 * kPage);
  EXPECT_EQ(m.stats().reserved_leases, 1);
  // A failed grant does not bind the request.
  EXPECT_EQ(m.find(RequestId{2}).status().code(), StatusCode::kNotFound);

  auto exact = m.grant(RequestId{2}, m.free_bytes(), milliseconds(10), t0);
  ASSERT_TRUE(exact.ok()) << exact.status().to_string();
  EXPECT_EQ(m.free_bytes(), 0);
  EXPECT_EQ(m.grant(RequestId{3}, 1, milliseconds(10), t0).status().code(),
            StatusCode::kResourceExhausted);
  expect_invariant(m, *f.pool);
}

TEST(LeaseManager, GrantRejectsBadInputsAndDuplicateRequests) {
  Fixture f = make(8);
  LeaseManager& m = *f.leases;
  EXPECT_EQ(m.grant(RequestId{}, 10, milliseconds(10), t0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(m.grant(RequestId{1}, 0, milliseconds(10), t0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(m.grant(RequestId{1}, -1, milliseconds(10), t0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(m.grant(RequestId{1}, 10, milliseconds(0), t0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(m.grant(RequestId{1}, 10, Clock::duration::max(), t0 + milliseconds(1)).status().code(),
            StatusCode::kInvalidArgument);
  // Huge sizes do not overflow the page rounding.
  EXPECT_EQ(m.grant(RequestId{1}, INT64_MAX, milliseconds(10), t0).status().code(),
            StatusCode::kResourceExhausted);

  auto a = m.grant(RequestId{1}, 10, milliseconds(10), t0);
  ASSERT_TRUE(a.ok());
  auto dup = m.grant(RequestId{1}, 10, milliseconds(10), t0);
  EXPECT_EQ(dup.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(has(dup.status(), "lease " + std::to_string(a->value()))) << dup.status().to_string();
  ASSERT_TRUE(m.release(*a).ok());
  auto again = m.grant(RequestId{1}, 10, milliseconds(10), t0);
  ASSERT_TRUE(again.ok());
  EXPECT_NE(*again, *a);  // ids are never reused
  // Once expired, the request may be granted again too.
  EXPECT_EQ(m.expire(t0 + milliseconds(10)).size(), 1u);
  EXPECT_TRUE(m.grant(RequestId{1}, 10, milliseconds(10), t0).ok());
  EXPECT_EQ(m.stats().free_bytes, 7 * kPage);
}

TEST(LeaseManager, ExtendIsAtomic) {
  Fixture f = make(8);
  LeaseManager& m = *f.leases;
  auto a = m.grant(RequestId{1}, 2 * kPage, milliseconds(10), t0);
  auto b = m.grant(RequestId{2}, 3 * kPage, milliseconds(10), t0);
  ASSERT_TRUE(a.ok() && b.ok());
  const LeaseStats before = m.stats();

  // 4 pages needed (3 full + 1 byte), 3 free: refused, nothing changes.
  auto no = m.extend(*a, 3 * kPage + 1, t0);
  ASSERT_FALSE(no.ok());
  EXPECT_EQ(no.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(has(no.status(), std::to_string(3 * kPage) + " bytes free"))
      << no.status().to_string();
  EXPECT_EQ(m.stats(), before);
  EXPECT_EQ(m.info(*a)->granted_bytes, 2 * kPage);

  // Exactly the free bytes: granted, and the deadline stays.
  auto yes = m.extend(*a, 3 * kPage, t0 + milliseconds(5));
  ASSERT_TRUE(yes.ok()) << yes.status().to_string();
  EXPECT_EQ(*yes, 5 * kPage);
  EXPECT_EQ(m.info(*a)->granted_bytes, 5 * kPage);
  EXPECT_EQ(m.info(*a)->deadline, t0 + milliseconds(10));
  EXPECT_EQ(m.stats().free_bytes, 0);
  EXPECT_EQ(m.stats().reserved_bytes, 8 * kPage);

  EXPECT_EQ(m.extend(*a, 0, t0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.extend(LeaseId{99}, 1, t0).status().code(), StatusCode::kNotFound);
  // Past its deadline an uncommitted lease cannot grow.
  ASSERT_TRUE(m.release(*b).ok());
  EXPECT_EQ(m.extend(*a, 1, t0 + milliseconds(10)).status().code(), StatusCode::kDeadlineExceeded);
  // A committed lease can (decode growth), counted as used.
  ASSERT_TRUE(m.commit(*a, 5 * kPage, t0 + milliseconds(9)).ok());
  auto grown = m.extend(*a, 1, t0 + std::chrono::hours(1));
  ASSERT_TRUE(grown.ok());
  EXPECT_EQ(*grown, 6 * kPage);
  EXPECT_EQ(m.stats().used_bytes, 6 * kPage);
  expect_invariant(m, *f.pool);
}

TEST(LeaseManager, CommitChecks) {
  Fixture f = make(8);
  LeaseManager& m = *f.leases;
  auto a = m.grant(RequestId{1}, 3 * kPage - 100, milliseconds(10), t0);  // 3 pages
  ASSERT_TRUE(a.ok());

  Status over = m.commit(*a, 3 * kPage + 1, t0);
  EXPECT_EQ(over.code(), StatusCode::kOutOfRange);
  // Names the actual and the reserved bytes.
  EXPECT_TRUE(has(over, std::to_string(3 * kPage + 1))) << over.to_string();
  EXPECT_TRUE(has(over, std::to_string(3 * kPage) + " bytes reserved")) << over.to_string();
  EXPECT_EQ(m.info(*a)->state, LeaseState::kReserved);

  EXPECT_EQ(m.commit(*a, -1, t0).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.commit(LeaseId{42}, 1, t0).code(), StatusCode::kNotFound);
  EXPECT_EQ(m.commit(*a, 1, t0 + milliseconds(10)).code(), StatusCode::kDeadlineExceeded);

  // Pages taken beyond what the commit keeps: return them first.
  auto pages = m.take_pages(*a, 2);
  ASSERT_TRUE(pages.ok());
  Status too_few = m.commit(*a, kPage, t0);
  EXPECT_EQ(too_few.code(), StatusCode::kFailedPrecondition) << too_few.to_string();
  EXPECT_EQ(m.stats().reserved_bytes, 3 * kPage);
  ASSERT_TRUE(m.return_page(*a, (*pages)[1]).ok());
  ASSERT_TRUE(m.commit(*a, kPage, t0).ok());
  EXPECT_EQ(m.stats(), (LeaseStats{8 * kPage, 7 * kPage, 0, kPage, 0, 1, 1}));
  // Commit of zero bytes (a lease that ends up empty) is allowed.
  auto b = m.grant(RequestId{2}, 1, milliseconds(10), t0);
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(m.commit(*b, 0, t0).ok());
  EXPECT_EQ(m.info(*b)->granted_bytes, 0);
  EXPECT_EQ(m.take_page(*b).status().code(), StatusCode::kOutOfRange);
  expect_invariant(m, *f.pool);
}

TEST(LeaseManager, ReleaseTwiceIsNotFound) {
  Fixture f = make(4);
  LeaseManager& m = *f.leases;
  auto a = m.grant(RequestId{1}, kPage, milliseconds(10), t0);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(m.take_pages(*a, 1).ok());
  ASSERT_TRUE(m.release(*a).ok());
  EXPECT_EQ(f.pool->used_pages(), 0);
  const LeaseStats after = m.stats();
  Status twice = m.release(*a);
  EXPECT_EQ(twice.code(), StatusCode::kNotFound);
  EXPECT_EQ(m.stats(), after);
  EXPECT_EQ(f.pool->used_pages(), 0);
  EXPECT_EQ(m.release(LeaseId{}).code(), StatusCode::kNotFound);
  EXPECT_EQ(m.release(LeaseId{12345}).code(), StatusCode::kNotFound);
  // Expired leases are gone too.
  auto b = m.grant(RequestId{2}, kPage, milliseconds(10), t0);
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(m.expire(t0 + milliseconds(10)).size(), 1u);
  EXPECT_EQ(m.release(*b).code(), StatusCode::kNotFound);
  EXPECT_EQ(m.stats().free_bytes, 4 * kPage);
}

TEST(LeaseManager, ExpiryFreesExactlyTheUncommittedPastDeadline) {
  Fixture f = make(16);
  LeaseManager& m = *f.leases;
  auto a = m.grant(RequestId{1}, kPage, milliseconds(10), t0);     // expires at 10
  auto b = m.grant(RequestId{2}, 2 * kPage, milliseconds(5), t0);  // expires at 5
  auto c = m.grant(RequestId{3}, kPage, milliseconds(10), t0);     // committed
  auto d = m.grant(RequestId{4}, kPage, milliseconds(11), t0);     // alive at 10
  auto e = m.grant(RequestId{5}, 3 * kPage, milliseconds(3), t0 + milliseconds(7));  // 10
  ASSERT_TRUE(a.ok() && b.ok() && c.ok() && d.ok() && e.ok());
  ASSERT_TRUE(m.take_pages(*b, 2).ok());
  ASSERT_TRUE(m.commit(*c, kPage, t0 + milliseconds(1)).ok());

  EXPECT_TRUE(m.expire(t0 + milliseconds(4)).empty());
  EXPECT_EQ(m.expire(t0 + milliseconds(5)),
            (std::vector<ExpiredLease>{{*b, RequestId{2}, 2 * kPage}}));
  EXPECT_EQ(f.pool->used_pages(), 0);
  // The deadline is the boundary: expired at now >= deadline, not before.
  EXPECT_TRUE(m.expire(t0 + milliseconds(10) - Clock::duration(1)).empty());
  const auto expired = m.expire(t0 + milliseconds(10));
  EXPECT_EQ(expired,
            (std::vector<ExpiredLease>{{*a, RequestId{1}, kPage}, {*e, RequestId{5}, 3 * kPage}}));
  EXPECT_TRUE(m.info(*c).ok());
  EXPECT_TRUE(m.info(*d).ok());
  EXPECT_EQ(m.stats(), (LeaseStats{16 * kPage, 14 * kPage, kPage, kPage, 1, 1, 0}));
  EXPECT_EQ(m.expire(t0 + milliseconds(11)).size(), 1u);
  EXPECT_TRUE(m.expire(t0 + std::chrono::hours(24)).empty());
  EXPECT_EQ(m.stats().reserved_leases, 0);
  EXPECT_EQ(m.stats().committed_leases, 1);
  expect_invariant(m, *f.pool);
}

TEST(LeaseManager, TakePagesNeverBeyondTheReservation) {
  Fixture f = make(8);
  LeaseManager& m = *f.leases;
  auto a = m.grant(RequestId{1}, 3 * kPage, milliseconds(10), t0);
  auto b = m.grant(RequestId{2}, 2 * kPage, milliseconds(10), t0);
  ASSERT_TRUE(a.ok() && b.ok());

  auto two = m.take_pages(*a, 2);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(two->size(), 2u);
  EXPECT_EQ(m.pages_left(*a), 1);
  auto over = m.take_pages(*a, 2);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), StatusCode::kOutOfRange);
  EXPECT_TRUE(has(over.status(), "reservation overrun")) << over.status().to_string();
  // Took nothing.
  EXPECT_EQ(f.pool->used_pages(), 2);
  EXPECT_EQ(m.pages(*a).size(), 2u);
  EXPECT_EQ(m.stats().taken_pages, 2);

  auto last = m.take_page(*a);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(m.take_page(*a).status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(m.take_pages(*a, 0)->size(), 0u);
  EXPECT_EQ(m.take_pages(*a, -1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.take_pages(LeaseId{77}, 1).status().code(), StatusCode::kNotFound);

  // Pages are distinct, in take order, and owned: b cannot return a's.
  std::vector<PageId> a_pages(m.pages(*a).begin(), m.pages(*a).end());
  EXPECT_EQ(a_pages, (std::vector<PageId>{(*two)[0], (*two)[1], *last}));
  EXPECT_EQ(m.return_page(*b, a_pages[0]).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.return_page(*a, PageId{-1}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.return_page(*a, PageId{1000}).code(), StatusCode::kInvalidArgument);
  // Returning one frees budget for one more; returning it twice is refused.
  ASSERT_TRUE(m.return_page(*a, a_pages[0]).ok());
  EXPECT_EQ(m.return_page(*a, a_pages[0]).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.pages_left(*a), 1);
  EXPECT_EQ(f.pool->used_pages(), 2);
  EXPECT_EQ(m.pages(*a).size(), 2u);
  EXPECT_EQ(m.pages(*a)[0], a_pages[2]);  // the last page moved into its place

  // b's budget is its own, even with free pool pages.
  ASSERT_TRUE(m.take_pages(*b, 2).ok());
  EXPECT_EQ(m.take_page(*b).status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(f.pool->used_pages(), 4);
  ASSERT_TRUE(m.release(*a).ok());
  ASSERT_TRUE(m.release(*b).ok());
  EXPECT_EQ(f.pool->used_pages(), 0);
  expect_invariant(m, *f.pool);
}

TEST(LeaseManager, LeasePagesViewChargesTheLease) {
  Fixture f = make(8);
  LeaseManager& m = *f.leases;
  auto a = m.grant(RequestId{1}, 2 * kPage, milliseconds(10), t0);
  ASSERT_TRUE(a.ok());
  LeasePages view(&m, *a);
  EXPECT_EQ(view.page_bytes(), kPage);
  EXPECT_EQ(view.free_pages(), 2);  // the lease's budget, not the pool's 8
  auto p = view.allocate();
  auto q = view.allocate();
  ASSERT_TRUE(p.ok() && q.ok());
  EXPECT_EQ(view.data(*p), f.pool->data(*p));
  view.data(*q)[kPage - 1] = std::byte{7};
  EXPECT_EQ(f.pool->data(*q)[kPage - 1], std::byte{7});
  EXPECT_EQ(view.free_pages(), 0);
  auto r = view.allocate();
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange);
  EXPECT_TRUE(has(r.status(), "reservation overrun"));
  ASSERT_TRUE(view.free(*p).ok());
  EXPECT_EQ(view.free_pages(), 1);
  EXPECT_EQ(view.free(*p).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(m.commit(*a, kPage, t0).ok());  // one page taken, one kept
  ASSERT_TRUE(m.release(*a).ok());
  // After release the view has no budget and its pages are not its own.
  EXPECT_EQ(view.free_pages(), 0);
  EXPECT_EQ(view.free(*q).code(), StatusCode::kNotFound);
  EXPECT_EQ(view.allocate().status().code(), StatusCode::kNotFound);
  EXPECT_EQ(f.pool->used_pages(), 0);
}

TEST(LeaseManager, DestructorReturnsTakenPages) {
  auto pool = PagePool::create(kPage, kPage * 4);
  ASSERT_TRUE(pool.ok());
  {
    auto m = LeaseManager::create(pool->get());
    ASSERT_TRUE(m.ok());
    auto a = (*m)->grant(RequestId{1}, 3 * kPage, milliseconds(10), t0);
    ASSERT_TRUE(a.ok());
    ASSERT_TRUE((*m)->take_pages(*a, 3).ok());
    EXPECT_EQ((*pool)->used_pages(), 3);
  }
  EXPECT_EQ((*pool)->used_pages(), 0);
}

// A naive model: a list of leases with their bytes, checked against the
// manager after every one of 10,000 random operations.
TEST(LeaseManager, RandomOperationsMatchANaiveModel) {
  constexpr int64_t kPages = 40;
  Fixture f = make(kPages);
  LeaseManager& m = *f.leases;

  struct ModelLease {
    uint64_t request = 0;
    bool committed = false;
    int64_t bytes = 0;  // page-rounded
    Clock::time_point deadline;
    std::vector<PageId> pages;
  };
  std::map<uint64_t, ModelLease> model;  // by lease id
  std::vector<uint64_t> dead;            // released or expired ids
  auto round_up = [](int64_t b) { return (b + kPage - 1) / kPage * kPage; };
  auto model_sum = [&](bool committed) {
    int64_t s = 0;
    for (auto& [id, l] : model) s += l.committed == committed ? l.bytes : 0;
    return s;
  };
  auto model_free = [&] { return kPages * kPage - model_sum(false) - model_sum(true); };

  std::mt19937_64 rng(20240607);
  auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  auto any_lease = [&]() -> uint64_t {
    // Mostly live leases, sometimes dead or never-granted ids.
    if (!model.empty() && pick(10) < 8) return std::next(model.begin(), pick(model.size()))->first;
    if (!dead.empty() && pick(2) == 0) return dead[pick(dead.size())];
    return 1000000 + pick(100);
  };
  Clock::time_point now = t0;
  uint64_t next_request = 1;
  int counts[8] = {};
  std::map<std::string, int> outcomes;  // how each operation ended, to show coverage
  const char* const kNames[8] = {"grant",  "extend", "commit", "release",
                                 "expire", "take",   "return", "cycle"};

  for (int op = 0; op < 10000; ++op) {
    const int kind = static_cast<int>(pick(8));
    ++counts[kind];
    switch (kind) {
      case 0: {  // grant (sometimes for a request that holds a lease)
        uint64_t req = next_request++;
        if (!model.empty() && pick(8) == 0)
          req = std::next(model.begin(), pick(model.size()))->second.request;
        const int64_t bytes = 1 + static_cast<int64_t>(pick(12 * kPage));
        const auto ttl = milliseconds(1 + pick(20));
        auto r = m.grant(RequestId{req}, bytes, ttl, now);
        const bool dup = std::any_of(model.begin(), model.end(),
                                     [&](auto& kv) { return kv.second.request == req; });
        if (dup) {
          ASSERT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
          ++outcomes[std::string(kNames[kind]) + ":kFailedPrecondition"];
        } else if (round_up(bytes) > model_free()) {
          ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
          ++outcomes[std::string(kNames[kind]) + ":kResourceExhausted"];
        } else {
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          ASSERT_EQ(model.count(r->value()), 0u);
          model[r->value()] = {req, false, round_up(bytes), now + ttl, {}};
          ++outcomes["grant:ok"];
        }
        break;
      }
      case 1: {  // extend
        const uint64_t id = any_lease();
        const int64_t extra = 1 + static_cast<int64_t>(pick(4 * kPage));
        auto r = m.extend(LeaseId{id}, extra, now);
        auto it = model.find(id);
        if (it == model.end()) {
          ASSERT_EQ(r.status().code(), StatusCode::kNotFound);
          ++outcomes[std::string(kNames[kind]) + ":kNotFound"];
        } else if (!it->second.committed && now >= it->second.deadline) {
          ASSERT_EQ(r.status().code(), StatusCode::kDeadlineExceeded);
          ++outcomes[std::string(kNames[kind]) + ":kDeadlineExceeded"];
        } else if (round_up(extra) > model_free()) {
          ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
          ++outcomes[std::string(kNames[kind]) + ":kResourceExhausted"];
        } else {
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          it->second.bytes += round_up(extra);
          ++outcomes["extend:ok"];
          ASSERT_EQ(*r, it->second.bytes);
        }
        break;
      }
      case 2: {  // commit
        const uint64_t id = any_lease();
        auto it = model.find(id);
        const int64_t granted = it == model.end() ? 4 * kPage : it->second.bytes;
        const int64_t actual = static_cast<int64_t>(pick(granted + kPage + 1));
        Status s = m.commit(LeaseId{id}, actual, now);
        if (it == model.end()) {
          ASSERT_EQ(s.code(), StatusCode::kNotFound);
          ++outcomes[std::string(kNames[kind]) + ":kNotFound"];
        } else if (it->second.committed) {
          ASSERT_EQ(s.code(), StatusCode::kFailedPrecondition);
          ++outcomes[std::string(kNames[kind]) + ":kFailedPrecondition"];
        } else if (now >= it->second.deadline) {
          ASSERT_EQ(s.code(), StatusCode::kDeadlineExceeded);
          ++outcomes[std::string(kNames[kind]) + ":kDeadlineExceeded"];
        } else if (actual > granted) {
          ASSERT_EQ(s.code(), StatusCode::kOutOfRange);
          ++outcomes[std::string(kNames[kind]) + ":kOutOfRange"];
        } else if (static_cast<int64_t>(it->second.pages.size()) * kPage > round_up(actual)) {
          ASSERT_EQ(s.code(), StatusCode::kFailedPrecondition);
          ++outcomes[std::string(kNames[kind]) + ":kFailedPrecondition"];
        } else {
          ASSERT_TRUE(s.ok()) << s.to_string();
          it->second.committed = true;
          ++outcomes["commit:ok"];
          it->second.bytes = round_up(actual);
        }
        break;
      }
      case 3: {  // release
        const uint64_t id = any_lease();
        Status s = m.release(LeaseId{id});
        if (model.erase(id) == 0) {
          ASSERT_EQ(s.code(), StatusCode::kNotFound);
          ++outcomes[std::string(kNames[kind]) + ":kNotFound"];
        } else {
          ASSERT_TRUE(s.ok());
          dead.push_back(id);
          ++outcomes["release:ok"];
        }
        break;
      }
      case 4: {  // advance time and expire
        now += milliseconds(pick(6));
        // Half the time only the clock moves, so leases past their deadline
        // meet extend and commit before expire() reclaims them.
        if (pick(2) == 0) break;
        auto expired = m.expire(now);
        std::vector<uint64_t> want;
        for (auto& [id, l] : model) {
          if (!l.committed && l.deadline <= now) want.push_back(id);
        }
        std::vector<uint64_t> got;
        for (const ExpiredLease& e : expired) {
          got.push_back(e.lease_id.value());
          ASSERT_EQ(e.request_id.value(), model.at(e.lease_id.value()).request);
          ASSERT_EQ(e.granted_bytes, model.at(e.lease_id.value()).bytes);
        }
        std::sort(got.begin(), got.end());
        ASSERT_EQ(got, want);
        outcomes["expire:leases"] += static_cast<int>(want.size());
        for (uint64_t id : want) {
          model.erase(id);
          dead.push_back(id);
        }
        break;
      }
      case 5: {  // take pages
        const uint64_t id = any_lease();
        const int64_t n = static_cast<int64_t>(pick(4));
        auto r = m.take_pages(LeaseId{id}, n);
        auto it = model.find(id);
        if (it == model.end()) {
          ASSERT_EQ(r.status().code(), StatusCode::kNotFound);
          ++outcomes[std::string(kNames[kind]) + ":kNotFound"];
        } else if ((static_cast<int64_t>(it->second.pages.size()) + n) * kPage > it->second.bytes) {
          ASSERT_EQ(r.status().code(), StatusCode::kOutOfRange);
          ++outcomes[std::string(kNames[kind]) + ":kOutOfRange"];
        } else {
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          ASSERT_EQ(static_cast<int64_t>(r->size()), n);
          it->second.pages.insert(it->second.pages.end(), r->begin(), r->end());
          ++outcomes["take:ok"];
        }
        break;
      }
      case 6: {  // return a page (sometimes someone else's)
        const uint64_t id = any_lease();
        auto it = model.find(id);
        if (it == model.end()) {
          ASSERT_EQ(m.return_page(LeaseId{id}, PageId{0}).code(), StatusCode::kNotFound);
          ++outcomes[std::string(kNames[kind]) + ":kNotFound"];
          break;
        }
        auto& pages = it->second.pages;
        const PageId stray{static_cast<int32_t>(pick(kPages))};
        if (pages.empty() ||
            (pick(4) == 0 && std::find(pages.begin(), pages.end(), stray) == pages.end())) {
          // Free, or another lease's: refused, nothing changes.
          ASSERT_EQ(m.return_page(LeaseId{id}, stray).code(), StatusCode::kInvalidArgument);
          ++outcomes["return:kInvalidArgument"];
          break;
        }
        const size_t i = pick(pages.size());
        ASSERT_TRUE(m.return_page(LeaseId{id}, pages[i]).ok());
        pages.erase(pages.begin() + static_cast<std::ptrdiff_t>(i));
        ++outcomes["return:ok"];
        break;
      }
      case 7: {  // a cycle on a fresh request: grant, take, commit, release
        const uint64_t req = next_request++;
        auto r = m.grant(RequestId{req}, kPage, milliseconds(5), now);
        if (model_free() < kPage) {
          ASSERT_EQ(r.status().code(), StatusCode::kResourceExhausted);
          ++outcomes[std::string(kNames[kind]) + ":kResourceExhausted"];
          break;
        }
        ASSERT_TRUE(r.ok());
        ASSERT_TRUE(m.take_page(*r).ok());
        ASSERT_TRUE(m.commit(*r, kPage, now).ok());
        ASSERT_TRUE(m.release(*r).ok());
        dead.push_back(r->value());
        ++outcomes["cycle:ok"];
        break;
      }
    }

    // The manager agrees with the model, and the invariant holds.
    const LeaseStats s = m.stats();
    ASSERT_EQ(s.reserved_bytes, model_sum(false)) << "op " << op;
    ASSERT_EQ(s.used_bytes, model_sum(true)) << "op " << op;
    ASSERT_EQ(s.free_bytes, model_free()) << "op " << op;
    ASSERT_EQ(s.free_bytes + s.reserved_bytes + s.used_bytes, s.capacity_bytes);
    int64_t taken = 0;
    int64_t n_committed = 0;
    for (auto& [id, l] : model) {
      taken += static_cast<int64_t>(l.pages.size());
      n_committed += l.committed ? 1 : 0;
    }
    ASSERT_EQ(s.taken_pages, taken);
    ASSERT_EQ(f.pool->used_pages(), taken);
    ASSERT_EQ(s.committed_leases, n_committed);
    ASSERT_EQ(s.reserved_leases, static_cast<int64_t>(model.size()) - n_committed);
  }
  // Every kind of operation ran, and every outcome of it was reached.
  for (int c : counts) EXPECT_GT(c, 500);
  std::string summary;
  for (auto& [name, n] : outcomes) summary += name + "=" + std::to_string(n) + " ";
  for (const char* name : {"grant:ok",
                           "grant:kFailedPrecondition",
                           "grant:kResourceExhausted",
                           "extend:ok",
                           "extend:kNotFound",
                           "extend:kDeadlineExceeded",
                           "extend:kResourceExhausted",
                           "commit:ok",
                           "commit:kNotFound",
                           "commit:kFailedPrecondition",
                           "commit:kDeadlineExceeded",
                           "commit:kOutOfRange",
                           "release:ok",
                           "release:kNotFound",
                           "expire:leases",
                           "take:ok",
                           "take:kNotFound",
                           "take:kOutOfRange",
                           "return:ok",
                           "return:kNotFound",
                           "return:kInvalidArgument",
                           "cycle:ok"}) {
    EXPECT_GE(outcomes[name], 20) << name << " in " << summary;
  }
  std::printf("%s\n", summary.c_str());
  for (auto& [id, l] : model) {
    std::set<int32_t> want;
    for (PageId p : l.pages) want.insert(p.value);
    std::set<int32_t> got;
    for (PageId p : m.pages(LeaseId{id})) got.insert(p.value);
    EXPECT_EQ(got, want);
    ASSERT_TRUE(m.release(LeaseId{id}).ok());
  }
  EXPECT_EQ(m.stats().free_bytes, kPages * kPage);
  EXPECT_EQ(f.pool->used_pages(), 0);
}

// A cache drawing on a lease through LeasePages (as a PageSource*): its
// pages are charged to the lease; an append past the lease is
// RESOURCE_EXHAUSTED and changes nothing; an extend makes room; destroying
// the cache returns every page to the lease.
TEST(LeaseManager, CacheOnLeasePagesStaysWithinTheLease) {
  // 64-byte pages hold 4 K/V rows of head_dim 8; 2 layers x 1 head, dense
  // map, 1 sink + window 2; every token kept.
  auto pool = PagePool::create(64, 64 * 256);
  ASSERT_TRUE(pool.ok());
  auto m = LeaseManager::create(pool->get());
  ASSERT_TRUE(m.ok());
  auto lease = (*m)->grant(RequestId{3}, 64 * 6, milliseconds(10), t0);
  ASSERT_TRUE(lease.ok());
  auto pages = std::make_unique<LeasePages>(m->get(), *lease);
  const KvLayout layout = testing::make_layout(*BlockMap::dense(2, 1), 8, 1, 2);
  std::mt19937 rng(3);
  const testing::History hist(layout, 64, 1.0, rng);
  {
    auto cache = CompressedKvCache::create(layout, pages.get());
    ASSERT_TRUE(cache.ok()) << cache.status().to_string();
    int64_t j = 0;
    Status st;
    for (; j < 64; ++j) {
      const int64_t held = cache->n_pages();
      st = cache->append(j, hist.token(j), hist.token_flags(j));
      if (!st.ok()) {
        EXPECT_EQ(cache->n_tokens(), j);
        EXPECT_EQ(cache->n_pages(), held);
        break;
      }
      EXPECT_EQ((*m)->info(*lease)->taken_pages, cache->n_pages());
    }
    EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.to_string();
    EXPECT_LE(cache->n_pages(), 6);
    EXPECT_EQ(pages->free_pages(), 6 - cache->n_pages());
    // The view itself refuses past the lease, as "reservation overrun".
    while (pages->free_pages() > 0) ASSERT_TRUE((*m)->take_page(*lease).ok());
    PageSource& src = *pages;
    EXPECT_EQ(src.allocate().status().code(), StatusCode::kOutOfRange);
    ASSERT_TRUE((*m)->extend(*lease, 64 * 16, t0).ok());
    EXPECT_TRUE(cache->append(j, hist.token(j), hist.token_flags(j)).ok());
    EXPECT_EQ(cache->n_tokens(), j + 1);
  }
  // The cache's pages are back; the stray pages taken above stay taken.
  const int64_t stray = (*m)->info(*lease)->taken_pages;
  EXPECT_EQ((*pool)->used_pages(), stray);
  ASSERT_TRUE((*m)->release(*lease).ok());
  EXPECT_EQ((*pool)->used_pages(), 0);
}

}  // namespace
}  // namespace kvgate::kvstore
