// DevicePagePool (engine/cuda/device_page_pool.h) against PagePool: the same
// free-list semantics and errors, ops executed in record order across
// phases, the decode hot path in one launch, and every cache operation of
// tests/unit/kvstore/page_ops_scenario.h giving the same transcript and the
// same arena bytes on both. Skips without a device.
#include "engine/cuda/device_page_pool.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../unit/kvstore/page_ops_scenario.h"
#include "engine/cuda/device_buffer.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/page_pool.h"

namespace kvgate::engine::cuda {
namespace {

using kvstore::CompressedKvCache;
using kvstore::KvLayout;
using kvstore::PageId;
using kvstore::PagePool;
using kvstore::testing::History;
using kvstore::testing::Transcript;

#define SKIP_WITHOUT_DEVICE() \
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device"

constexpr int64_t kPageBytes = 64;
constexpr int64_t kPages = 4096;

std::unique_ptr<DevicePagePool> device_pool(int64_t page_bytes, int64_t capacity) {
  auto pool = DevicePagePool::create(page_bytes, capacity);
  EXPECT_TRUE(pool.ok()) << pool.status().to_string();
  return pool.ok() ? std::move(pool).value() : nullptr;
}

std::unique_ptr<PagePool> zeroed_host_pool() {
  auto pool = kvstore::testing::make_pool(kPageBytes, kPageBytes * kPages);
  std::memset(pool->arena(), 0, static_cast<size_t>(kPageBytes * kPages));
  return pool;
}

TEST(DevicePagePool, ArgumentsAreCheckedBeforeTheDevice) {
  EXPECT_EQ(DevicePagePool::create(100, 1000).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DevicePagePool::create(64, 63).status().code(), StatusCode::kInvalidArgument);
}

TEST(DevicePagePool, FreeListAsPagePool) {
  SKIP_WITHOUT_DEVICE();
  auto dev = device_pool(128, 3 * 128 + 5);
  ASSERT_NE(dev, nullptr);
  auto host = kvstore::testing::make_pool(128, 3 * 128 + 5);
  EXPECT_FALSE(dev->host_accessible());
  EXPECT_EQ(dev->n_pages(), 3);
  EXPECT_EQ(dev->capacity_bytes(), 3 * 128);
  for (int i = 0; i < 3; ++i) {
    const PageId d = *dev->allocate();
    EXPECT_EQ(d, *host->allocate());
    EXPECT_EQ(dev->data(d), dev->arena() + d.value * 128);
  }
  EXPECT_EQ(dev->allocate().status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(dev->free_pages(), 0);
  ASSERT_TRUE(dev->free(PageId{1}).ok());
  EXPECT_EQ(dev->free(PageId{1}).code(), StatusCode::kInvalidArgument);  // double free
  EXPECT_EQ(dev->free(PageId{3}).code(), StatusCode::kInvalidArgument);  // not from the pool
  EXPECT_EQ(dev->free(PageId{-1}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(dev->free_pages(), 1);
  EXPECT_EQ(*dev->allocate(), PageId{1});  // last freed first
}

// A write, a copy of what it wrote, and an overwrite of the source in one
// batch: three phases, executed in record order.
TEST(DevicePagePool, OpsRunInRecordOrder) {
  SKIP_WITHOUT_DEVICE();
  auto dev = device_pool(kPageBytes, 4 * kPageBytes);
  ASSERT_NE(dev, nullptr);
  const PageId a = *dev->allocate();
  const PageId b = *dev->allocate();
  std::vector<uint8_t> x(32), y(32);
  for (int i = 0; i < 32; ++i) {
    x[i] = static_cast<uint8_t>(i + 1);
    y[i] = static_cast<uint8_t>(200 - i);
  }
  dev->write(dev->data(a), x.data(), 32);
  x.assign(32, 0);  // staged: the caller's buffer is free at once
  dev->copy(dev->data(b) + 16, dev->data(a), 32);
  dev->write(dev->data(a), y.data(), 32);
  dev->write(dev->data(a) + 32, y.data(), 3);  // unaligned, beside the row: same phase
  EXPECT_EQ(dev->pending_ops(), 4);
  EXPECT_EQ(dev->pending_phases(), 3);
  ASSERT_TRUE(dev->flush(nullptr).ok());
  EXPECT_EQ(dev->launches(), 3);
  EXPECT_EQ(dev->pending_ops(), 0);
  std::vector<uint8_t> pa(kPageBytes), pb(kPageBytes);
  dev->read(pa.data(), dev->data(a), kPageBytes);
  dev->read(pb.data(), dev->data(b), kPageBytes);
  ASSERT_TRUE(dev->status().ok()) << dev->status().to_string();
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(pb[16 + i], i + 1) << i;
    EXPECT_EQ(pa[i], 200 - i) << i;
  }
  for (int i = 0; i < 3; ++i) EXPECT_EQ(pa[32 + i], 200 - i);
  // An op outside one page is a caller bug: sticky INVALID_ARGUMENT.
  dev->write(dev->data(a) + 60, y.data(), 8);
  EXPECT_EQ(dev->flush(nullptr).code(), StatusCode::kInvalidArgument);
}

// A decode step's begin_append with tokens leaving the window: its
// retained rows and positions are one phase, one launch.
TEST(DevicePagePool, DecodeStepIsOneLaunch) {
  SKIP_WITHOUT_DEVICE();
  auto dev = device_pool(kPageBytes, kPages * kPageBytes);
  ASSERT_NE(dev, nullptr);
  auto stream = CudaStream::create();
  ASSERT_TRUE(stream.ok());
  dev->set_read_stream(stream->get());
  const KvLayout layout = kvstore::testing::page_scenario_layouts()[1].second;  // gate, cache
  std::mt19937 rng(5);
  const int64_t n = 40;
  History hist(layout, n, 1.0, rng);  // every leaving token retained in every slot
  auto cache = CompressedKvCache::create(layout, dev.get());
  ASSERT_TRUE(cache.ok());
  int64_t steps_with_retain = 0;
  for (int64_t j = 0; j < n; ++j) {
    ASSERT_TRUE(dev->flush(stream->get()).ok());
    const std::vector<uint8_t> flags = hist.token_flags(j);
    ASSERT_TRUE(cache->begin_append(j, flags).ok());
    const int64_t launches = dev->launches();
    if (dev->pending_ops() > 0) {
      ++steps_with_retain;
      EXPECT_EQ(dev->pending_phases(), 1) << "step " << j;
      ASSERT_TRUE(dev->flush(stream->get()).ok());
      EXPECT_EQ(dev->launches(), launches + 1);
    }
    // The "kernels" of the step write the new rows (after the flush).
    kvstore::testing::scenario_append_rows(*dev, *cache, hist, j);
  }
  EXPECT_GT(steps_with_retain, 10);
  ASSERT_TRUE(stream->synchronize().ok());
  EXPECT_TRUE(dev->status().ok()) << dev->status().to_string();
}

// Every cache operation, on the device and on the host: same transcript,
// same arena bytes.
TEST(DevicePagePool, CacheOperationsMatchPagePool) {
  SKIP_WITHOUT_DEVICE();
  int variant = 0;
  for (const auto& [name, layout] : kvstore::testing::page_scenario_layouts()) {
    SCOPED_TRACE(name);
    auto dev = device_pool(kPageBytes, kPages * kPageBytes);
    ASSERT_NE(dev, nullptr);
    auto stream = CudaStream::create();
    ASSERT_TRUE(stream.ok());
    // Flushes on a non-blocking stream at some steps (reads flush the rest
    // on the read stream: the default one, or that stream).
    if (variant++ % 2 == 1) dev->set_read_stream(stream->get());
    auto between = [&](int64_t step) {
      if (step % 3 == 0) {
        const Status st = dev->flush(stream->get());
        EXPECT_TRUE(st.ok()) << st.to_string();
      }
    };
    auto host = zeroed_host_pool();
    const Transcript on_dev = kvstore::testing::run_page_scenario(*dev, layout, 21, between);
    const Transcript on_host = kvstore::testing::run_page_scenario(*host, layout, 21);
    ASSERT_GT(on_host.records.size(), 100u);
    kvstore::testing::expect_same_transcript(on_dev, on_host);
    ASSERT_TRUE(dev->flush(stream->get()).ok());
    ASSERT_TRUE(stream->synchronize().ok());
    std::vector<uint8_t> arena(static_cast<size_t>(kPages * kPageBytes));
    dev->read(arena.data(), dev->arena(), kPages * kPageBytes);
    ASSERT_TRUE(dev->status().ok()) << dev->status().to_string();
    EXPECT_EQ(std::memcmp(arena.data(), host->arena(), arena.size()), 0) << "arena bytes differ";
    EXPECT_EQ(dev->free_pages(), kPages);
    EXPECT_GT(dev->launches(), 0);
  }
}

}  // namespace
}  // namespace kvgate::engine::cuda
