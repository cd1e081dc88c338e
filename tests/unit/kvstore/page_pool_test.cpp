#include "kvstore/page_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <vector>

namespace kvgate::kvstore {
namespace {

TEST(PagePool, AllocatesUpToCapacityThenResourceExhausted) {
  auto pool = PagePool::create(256, 256 * 5 + 100);  // rounded down to 5 pages
  ASSERT_TRUE(pool.ok()) << pool.status().to_string();
  PagePool& p = **pool;
  EXPECT_EQ(p.n_pages(), 5);
  EXPECT_EQ(p.capacity_bytes(), 1280);
  std::vector<PageId> pages;
  std::set<const std::byte*> addrs;
  for (int i = 0; i < 5; ++i) {
    auto id = p.allocate();
    ASSERT_TRUE(id.ok());
    pages.push_back(*id);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p.data(*id)) % 64, 0u);
    addrs.insert(p.data(*id));
    EXPECT_LE(p.used_bytes(), p.capacity_bytes());
  }
  EXPECT_EQ(addrs.size(), 5u);
  EXPECT_EQ(p.used_bytes(), 1280);
  EXPECT_EQ(p.free_bytes(), 0);
  auto none = p.allocate();
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(p.used_bytes(), 1280);

  ASSERT_TRUE(p.free(pages[2]).ok());
  EXPECT_EQ(p.used_bytes(), 1024);
  EXPECT_EQ(p.free_bytes(), 256);
  auto again = p.allocate();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, pages[2]);
  for (PageId id : pages) ASSERT_TRUE(p.free(id).ok());
  EXPECT_EQ(p.used_bytes(), 0);
}

TEST(PagePool, RejectsBadFreesAndBadShapes) {
  auto pool = PagePool::create(64, 64 * 2);
  ASSERT_TRUE(pool.ok());
  PagePool& p = **pool;
  auto id = p.allocate();
  ASSERT_TRUE(id.ok());
  EXPECT_TRUE(p.free(*id).ok());
  Status twice = p.free(*id);
  EXPECT_EQ(twice.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(twice.message().find("already free"), std::string::npos);
  EXPECT_EQ(p.free(PageId{7}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(p.free(PageId{}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(p.used_pages(), 0);

  EXPECT_FALSE(PagePool::create(0, 1024).ok());
  EXPECT_FALSE(PagePool::create(100, 1024).ok());  // not a multiple of 64
  EXPECT_FALSE(PagePool::create(128, 64).ok());    // no whole page
}

// The pool through the PageSource interface a cache uses: same pages, same
// data, same accounting, same errors.
TEST(PagePool, IsAPageSource) {
  auto pool = PagePool::create(128, 128 * 3);
  ASSERT_TRUE(pool.ok());
  PageSource& src = **pool;
  EXPECT_EQ(src.page_bytes(), 128);
  EXPECT_EQ(src.free_pages(), 3);
  auto a = src.allocate();
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(src.data(*a), (*pool)->data(*a));
  EXPECT_EQ(static_cast<const PageSource&>(src).data(*a), (*pool)->arena() + a->value * 128);
  EXPECT_EQ(src.free_pages(), 2);
  EXPECT_EQ((*pool)->used_pages(), 1);
  ASSERT_TRUE(src.free(*a).ok());
  EXPECT_EQ(src.free(*a).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(src.allocate().ok() && src.allocate().ok() && src.allocate().ok());
  EXPECT_EQ(src.allocate().status().code(), StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace kvgate::kvstore
