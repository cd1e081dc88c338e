// kvstore on pages the host must not touch: a PageSource whose data()
// addresses lie inside an mmap(PROT_NONE) reservation, with a shadow host
// arena at the same offsets where copy()/write()/read() are applied. Any
// direct dereference of page memory by kvstore code faults (the test binary
// dies with SIGSEGV), so a passing run shows that every page byte the cache,
// the wire export and adoption touch goes through the ops. The transcript
// of page_ops_scenario.h must equal that of a PagePool: same page bytes,
// view rows, positions, bytes() and capacity_bytes().
//
// In deferred mode the source batches copy()/write() as DevicePagePool does
// (engine/cuda/page_op_recorder.h: the same recorder) and runs a batch at
// flush() — each phase's ops in REVERSE order, the adversarial order for a
// phase whose ops were wrongly assumed independent — so the batching rules
// a GPU flush relies on are checked on the whole cache here too.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <string>
#include <vector>

#include "engine/cuda/page_op_recorder.h"
#include "kv_test_util.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/lease_manager.h"
#include "kvstore/page_pool.h"
#include "kvstore/wire_image.h"
#include "page_ops_scenario.h"

namespace kvgate::kvstore::testing {
namespace {

// PagePool's free-list semantics over an address range nobody may touch.
class InaccessiblePageSource final : public PageSource {
 public:
  InaccessiblePageSource(int64_t page_bytes, int64_t n_pages, bool deferred = false)
      : deferred_(deferred),
        page_bytes_(page_bytes),
        n_pages_(n_pages),
        shadow_(static_cast<size_t>(page_bytes * n_pages), std::byte{0}),
        in_use_(static_cast<size_t>(n_pages), 0) {
    void* p = mmap(nullptr, static_cast<size_t>(page_bytes * n_pages), PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    EXPECT_NE(p, MAP_FAILED);
    reserved_ = static_cast<std::byte*>(p);
    recorder_ = std::make_unique<engine::cuda::PageOpRecorder>(reserved_, page_bytes, n_pages);
    for (int64_t i = n_pages - 1; i >= 0; --i) free_list_.push_back(static_cast<int32_t>(i));
  }
  ~InaccessiblePageSource() override {
    munmap(reserved_, static_cast<size_t>(page_bytes_ * n_pages_));
  }

  Result<PageId> allocate() override {
    if (free_list_.empty()) return resource_exhausted("inaccessible source: full");
    const int32_t id = free_list_.back();
    free_list_.pop_back();
    in_use_[id] = 1;
    return PageId{id};
  }
  Status free(PageId page) override {
    if (page.value < 0 || page.value >= n_pages_ || !in_use_[page.value]) {
      return invalid_argument("inaccessible source: bad free of page " +
                              std::to_string(page.value));
    }
    in_use_[page.value] = 0;
    free_list_.push_back(page.value);
    return Status();
  }
  std::byte* data(PageId page) override { return reserved_ + page.value * page_bytes_; }
  const std::byte* data(PageId page) const override { return reserved_ + page.value * page_bytes_; }
  int64_t page_bytes() const override { return page_bytes_; }
  int64_t free_pages() const override { return static_cast<int64_t>(free_list_.size()); }

  bool host_accessible() const override { return false; }
  void copy(std::byte* dst, const std::byte* src, int64_t bytes) override {
    ++copies_;
    if (deferred_) {
      shadow(dst, bytes, true);  // the checks
      shadow(src, bytes, true);
      const Status st =
          recorder_->record({reinterpret_cast<uint64_t>(dst), reinterpret_cast<uint64_t>(src),
                             static_cast<uint32_t>(bytes), 0});
      EXPECT_TRUE(st.ok()) << st.to_string();
      return;
    }
    std::memcpy(shadow(dst, bytes, true), shadow(src, bytes, true), static_cast<size_t>(bytes));
  }
  void write(std::byte* dst, const void* src, int64_t bytes) override {
    ++writes_;
    if (deferred_) {
      shadow(dst, bytes, true);
      const auto at = static_cast<uint64_t>(staging_.size());
      const auto* b = static_cast<const std::byte*>(src);
      staging_.insert(staging_.end(), b, b + bytes);
      const Status st =
          recorder_->record({reinterpret_cast<uint64_t>(dst), at, static_cast<uint32_t>(bytes), 1});
      EXPECT_TRUE(st.ok()) << st.to_string();
      return;
    }
    std::memcpy(shadow(dst, bytes, true), src, static_cast<size_t>(bytes));
  }
  void read(void* dst, const std::byte* src, int64_t bytes) override {
    ++reads_;
    flush();
    std::memcpy(dst, shadow(src, bytes, false), static_cast<size_t>(bytes));
  }

  // Deferred mode: runs the batch, phase by phase, each phase's ops last
  // first (any order must give the same bytes).
  void flush() {
    const auto& ops = recorder_->ops();
    for (size_t p = 0; p < recorder_->phase_starts().size(); ++p) {
      ++phases_;
      for (int64_t i = recorder_->phase_end(p) - 1; i >= recorder_->phase_begin(p); --i) {
        const engine::cuda::PageOpDesc& op = ops[static_cast<size_t>(i)];
        const std::byte* from =
            op.staged ? staging_.data() + op.src
                      : shadow(reinterpret_cast<const std::byte*>(op.src), op.bytes, true, false);
        std::memcpy(shadow(reinterpret_cast<const std::byte*>(op.dst), op.bytes, true, false), from,
                    op.bytes);
      }
    }
    if (!ops.empty()) {
      ++flushes_;
      recorder_->clear();
    }
    staging_.clear();
  }
  int64_t pending_phases() const { return static_cast<int64_t>(recorder_->phase_starts().size()); }
  int64_t pending_ops() const { return static_cast<int64_t>(recorder_->ops().size()); }
  int64_t phases() const { return phases_; }
  const std::vector<std::byte>& shadow_bytes() const { return shadow_; }

  int64_t copies() const { return copies_; }
  int64_t writes() const { return writes_; }
  int64_t reads() const { return reads_; }

 private:
  bool deferred_;

  // The shadow bytes of [p, p + bytes), which must be in allocated pages
  // (within one page for copy/write, as PageSource requires).
  // At a deferred flush the page may have been freed since the op was
  // recorded (a cache destroyed before the flush): harmless, as on a GPU —
  // a later owner's ops come later in record order — so not checked then.
  std::byte* shadow(const std::byte* p, int64_t bytes, bool one_page, bool held = true) {
    const int64_t off = p - reserved_;
    EXPECT_TRUE(off >= 0 && bytes > 0 && off + bytes <= page_bytes_ * n_pages_)
        << "op outside the pages: offset " << off << ", " << bytes << " bytes";
    if (one_page) {
      EXPECT_EQ(off / page_bytes_, (off + bytes - 1) / page_bytes_) << "op crosses a page";
    }
    for (int64_t pg = off / page_bytes_; pg <= (off + bytes - 1) / page_bytes_; ++pg) {
      if (held) {
        EXPECT_TRUE(in_use_[pg]) << "op on free page " << pg;
      }
    }
    return shadow_.data() + off;
  }

  int64_t page_bytes_;
  int64_t n_pages_;
  std::byte* reserved_ = nullptr;
  std::vector<std::byte> shadow_;
  std::vector<int32_t> free_list_;
  std::vector<uint8_t> in_use_;
  int64_t copies_ = 0, writes_ = 0, reads_ = 0;
  std::unique_ptr<engine::cuda::PageOpRecorder> recorder_;
  std::vector<std::byte> staging_;
  int64_t phases_ = 0, flushes_ = 0;
};

constexpr int64_t kPageBytes = 64;
constexpr int64_t kPages = 4096;

// A PagePool zeroed like the shadow (its arena starts uninitialized).
std::unique_ptr<PagePool> zeroed_pool() {
  auto pool = make_pool(kPageBytes, kPageBytes * kPages);
  std::memset(pool->arena(), 0, static_cast<size_t>(kPageBytes * kPages));
  return pool;
}

TEST(PageSourceOps, PagePoolIsHostAccessibleAndCopies) {
  auto pool = zeroed_pool();
  PageSource& src = *pool;
  EXPECT_TRUE(src.host_accessible());
  const PageId a = *src.allocate();
  const PageId b = *src.allocate();
  const char text[] = "0123456789abcdef";
  src.write(src.data(a) + 8, text, 16);
  src.copy(src.data(b), src.data(a) + 8, 16);
  char back[16];
  src.read(back, src.data(b), 16);
  EXPECT_EQ(std::memcmp(back, text, 16), 0);
  EXPECT_EQ(std::memcmp(pool->data(a) + 8, text, 16), 0);  // host memory: direct too
}

TEST(PageSourceOps, InaccessibleSourceFaultsOnDirectAccess) {
  // The guard the other tests rely on: touching data() kills the process.
  InaccessiblePageSource src(kPageBytes, 4);
  const PageId p = *src.allocate();
  EXPECT_DEATH(
      {
        volatile std::byte b = *src.data(p);
        (void)b;
      },
      "");
}

// The whole scenario on the inaccessible source and on a PagePool.
TEST(PageSourceOps, CacheOnInaccessiblePagesMatchesPagePool) {
  for (const auto& [name, layout] : page_scenario_layouts()) {
    SCOPED_TRACE(name);
    InaccessiblePageSource dev(kPageBytes, kPages);
    auto host = zeroed_pool();
    {
      Result<CompressedKvCache> c = CompressedKvCache::create(layout, &dev);
      ASSERT_TRUE(c.ok());
      EXPECT_FALSE(c->host_accessible());
    }
    const Transcript on_dev = run_page_scenario(dev, layout, 11);
    const Transcript on_host = run_page_scenario(*host, layout, 11);
    ASSERT_GT(on_host.records.size(), 100u);
    expect_same_transcript(on_dev, on_host);
    EXPECT_EQ(std::memcmp(dev.shadow_bytes().data(), host->arena(), kPages * kPageBytes), 0);
    // The ops were used (rows retained page to page, positions written,
    // adopt read the positions), and every page went back.
    EXPECT_GT(dev.copies(), 0);
    EXPECT_GT(dev.writes(), 0);
    EXPECT_GT(dev.reads(), 0);
    EXPECT_EQ(dev.free_pages(), kPages);
    EXPECT_EQ(host->free_pages(), kPages);
  }
}

// The same with ops batched as on a GPU (flushed at every third step and
// by every read), each phase's ops run in reverse.
TEST(PageSourceOps, CacheOnDeferredPagesMatchesPagePool) {
  for (const auto& [name, layout] : page_scenario_layouts()) {
    SCOPED_TRACE(name);
    InaccessiblePageSource dev(kPageBytes, kPages, /*deferred=*/true);
    auto host = zeroed_pool();
    const Transcript on_dev = run_page_scenario(dev, layout, 13, [&](int64_t step) {
      if (step % 3 == 0) dev.flush();
    });
    const Transcript on_host = run_page_scenario(*host, layout, 13);
    ASSERT_GT(on_host.records.size(), 100u);
    expect_same_transcript(on_dev, on_host);
    dev.flush();
    EXPECT_GT(dev.phases(), 0);
    // Every byte of the arena, free pages too (what the GPU test checks).
    EXPECT_EQ(std::memcmp(dev.shadow_bytes().data(), host->arena(), kPages * kPageBytes), 0);
    EXPECT_EQ(dev.free_pages(), kPages);
  }
}

// A decode step (begin_append, tokens leaving the window with flag 1) is
// one phase: one launch on a GPU.
TEST(PageSourceOps, DecodeStepIsOnePhase) {
  const KvLayout layout = page_scenario_layouts()[1].second;
  InaccessiblePageSource dev(kPageBytes, kPages, /*deferred=*/true);
  std::mt19937 rng(5);
  const int64_t n = 40;
  History hist(layout, n, 1.0, rng);  // every leaving token retained in every slot
  Result<CompressedKvCache> cache = CompressedKvCache::create(layout, &dev);
  ASSERT_TRUE(cache.ok());
  int64_t steps_with_retain = 0;
  for (int64_t j = 0; j < n; ++j) {
    dev.flush();
    ASSERT_TRUE(cache->begin_append(j, hist.token_flags(j)).ok());
    if (dev.pending_ops() > 0) {
      ++steps_with_retain;
      const int64_t slots = layout.blocks.n_slots();
      EXPECT_GE(dev.pending_ops(), 3 * slots) << "K, V..., position, gate row per slot";
      EXPECT_EQ(dev.pending_phases(), 1) << "step " << j;
    }
    dev.flush();  // before the step's kernels write the new rows
    scenario_append_rows(dev, *cache, hist, j);
  }
  EXPECT_GT(steps_with_retain, 10);
}

// A cache on a lease of a deferred inaccessible source (a GPU decode
// node's leases over its DevicePagePool): the same transcript.
TEST(PageSourceOps, CacheOnLeasedDeferredPagesMatchesPagePool) {
  const KvLayout layout = page_scenario_layouts()[2].second;
  InaccessiblePageSource dev(kPageBytes, kPages, /*deferred=*/true);
  auto mgr = LeaseManager::create(&dev, kPages);
  ASSERT_TRUE(mgr.ok()) << mgr.status().to_string();
  EXPECT_EQ((*mgr)->pool(), nullptr);
  EXPECT_EQ((*mgr)->source(), &dev);
  Result<LeaseId> lease =
      (*mgr)->grant(RequestId{1}, kPages * kPageBytes, std::chrono::hours(1), LeaseClock::now());
  ASSERT_TRUE(lease.ok()) << lease.status().to_string();
  LeasePages pages(mgr->get(), *lease);
  EXPECT_FALSE(static_cast<PageSource&>(pages).host_accessible());
  auto host = zeroed_pool();
  const Transcript on_dev = run_page_scenario(pages, layout, 17, [&](int64_t step) {
    if (step % 2 == 0) dev.flush();
  });
  const Transcript on_host = run_page_scenario(*host, layout, 17);
  ASSERT_GT(on_host.records.size(), 100u);
  expect_same_transcript(on_dev, on_host);
  EXPECT_EQ(pages.free_pages(), kPages);
  ASSERT_TRUE((*mgr)->release(*lease).ok());
  EXPECT_EQ(dev.free_pages(), kPages);
  // The source must be untouched, and the count right.
  const PageId taken = *dev.allocate();
  EXPECT_EQ(LeaseManager::create(&dev, kPages).status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(dev.free(taken).ok());
  EXPECT_EQ(LeaseManager::create(&dev, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(LeaseManager::create(nullptr, 4).status().code(), StatusCode::kInvalidArgument);
}

// The recorder's phases on small sequences, and on random ones: running
// each phase in reverse gives the bytes of running every op in order.
TEST(PageOpRecorder, PhasesFollowDependencies) {
  std::vector<std::byte> arena(4 * 64);
  engine::cuda::PageOpRecorder rec(arena.data(), 64, 4);
  auto at = [&](int64_t page, int64_t off) {
    return reinterpret_cast<uint64_t>(arena.data() + page * 64 + off);
  };
  // Side-by-side writes of one page, copies from another: one phase.
  ASSERT_TRUE(rec.record({at(0, 0), 0, 16, 1}).ok());
  ASSERT_TRUE(rec.record({at(0, 16), 16, 16, 1}).ok());
  ASSERT_TRUE(rec.record({at(0, 32), at(1, 0), 16, 0}).ok());
  ASSERT_TRUE(rec.record({at(2, 0), at(1, 16), 16, 0}).ok());
  EXPECT_EQ(rec.phase_starts().size(), 1u);
  ASSERT_TRUE(rec.record({at(0, 8), 0, 4, 1}).ok());  // overlaps a write: WAW
  EXPECT_EQ(rec.phase_starts().size(), 2u);
  ASSERT_TRUE(rec.record({at(3, 0), at(0, 48), 4, 0}).ok());  // reads a written page: RAW
  EXPECT_EQ(rec.phase_starts().size(), 3u);
  ASSERT_TRUE(rec.record({at(0, 60), 0, 4, 1}).ok());  // writes a page read: WAR
  EXPECT_EQ(rec.phase_starts().size(), 4u);
  EXPECT_EQ(rec.phase_begin(3), 6);
  EXPECT_EQ(rec.phase_end(3), 7);
  // Not inside one page of the arena.
  EXPECT_EQ(rec.record({at(0, 60), 0, 8, 1}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(rec.record({at(3, 0), at(0, 0) - 1, 4, 0}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(rec.record({at(4, 0), 0, 4, 1}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(rec.ops().size(), 7u);
  rec.clear();
  EXPECT_TRUE(rec.ops().empty());
  ASSERT_TRUE(rec.record({at(0, 8), 0, 4, 1}).ok());  // a new batch, a fresh phase
  EXPECT_EQ(rec.phase_starts().size(), 1u);

  std::mt19937 rng(9);
  for (int round = 0; round < 300; ++round) {
    std::vector<std::byte> a(4 * 64), b;
    for (auto& x : a) x = static_cast<std::byte>(rng());
    b = a;
    std::vector<std::byte> staging(4096);
    for (auto& x : staging) x = static_cast<std::byte>(rng());
    engine::cuda::PageOpRecorder r(a.data(), 64, 4);
    std::uniform_int_distribution<int> page(0, 3), off(0, 60), len(1, 16);
    const int n_ops = 1 + static_cast<int>(rng() % 40);
    for (int i = 0; i < n_ops; ++i) {
      const int bytes = len(rng);
      const int d_off = std::min(off(rng), 64 - bytes);
      const uint64_t dst = reinterpret_cast<uint64_t>(a.data() + page(rng) * 64 + d_off);
      engine::cuda::PageOpDesc op{dst, 0, static_cast<uint32_t>(bytes), 0};
      if (rng() % 2) {
        op.staged = 1;
        op.src = rng() % (4096 - 16);
      } else {
        int s_page = page(rng);
        int s_off = std::min(off(rng), 64 - bytes);
        op.src = reinterpret_cast<uint64_t>(a.data() + s_page * 64 + s_off);
        // A copy's own ranges must not overlap (PageSource::copy).
        if (op.src < dst + bytes && dst < op.src + bytes) continue;
      }
      ASSERT_TRUE(r.record(op).ok());
    }
    // In order, on b.
    auto run = [&](std::vector<std::byte>& mem, const engine::cuda::PageOpDesc& op) {
      const auto shift = [&](uint64_t p) {
        return mem.data() + (p - reinterpret_cast<uint64_t>(a.data()));
      };
      const std::byte* from = op.staged ? staging.data() + op.src : shift(op.src);
      std::memmove(shift(op.dst), from, op.bytes);
    };
    for (const auto& op : r.ops()) run(b, op);
    for (size_t p = 0; p < r.phase_starts().size(); ++p) {
      for (int64_t i = r.phase_end(p) - 1; i >= r.phase_begin(p); --i) run(a, r.ops()[i]);
    }
    ASSERT_EQ(a, b) << "round " << round;
  }
}

// Adopt's position check reads the landed pages through read(): a corrupted
// position page is still refused (DATA_LOSS) on inaccessible pages.
TEST(PageSourceOps, AdoptChecksPositionsThroughRead) {
  const KvLayout layout = page_scenario_layouts()[0].second;
  InaccessiblePageSource dev(kPageBytes, kPages);
  std::mt19937 rng(3);
  const int64_t n = 30;
  History hist(layout, n, 1.0, rng);  // every distant token retained
  Result<CompressedKvCache> c = CompressedKvCache::build_from_dense(
      layout, &dev, n, hist.dense(), hist.prefix_flags(n), hist.dense_gate());
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  ASSERT_GT(c->retained_tokens(0), 1);
  Result<WireImage> image = export_wire_image(*c);
  ASSERT_TRUE(image.ok());
  std::vector<PageId> landed;
  for (PageId from : image->pages) {
    const PageId to = *dev.allocate();
    dev.copy(dev.data(to), dev.data(from), kPageBytes);
    landed.push_back(to);
  }
  // Slot 0's first position page sits after its ring, K and V pages: find
  // it as the page holding retained_position(0, 0) .. in wire order it is
  // the first page whose int32 at 0 equals that position and at 4 the next.
  const int32_t p0 = c->retained_position(0, 0);
  const int32_t p1 = c->retained_position(0, 1);
  int64_t pos_page = -1;
  for (size_t i = 0; i < landed.size() && pos_page < 0; ++i) {
    int32_t two[2];
    dev.read(two, dev.data(landed[i]), sizeof(two));
    if (two[0] == p0 && two[1] == p1) pos_page = static_cast<int64_t>(i);
  }
  ASSERT_GE(pos_page, 0);
  const int32_t swapped[2] = {p1, p0};
  dev.write(dev.data(landed[static_cast<size_t>(pos_page)]), swapped, sizeof(swapped));
  Result<CompressedKvCache> adopted = adopt_wire_image(layout, &dev, image->descriptor, landed);
  ASSERT_FALSE(adopted.ok());
  EXPECT_EQ(adopted.status().code(), StatusCode::kDataLoss) << adopted.status().to_string();
  for (PageId p : landed) ASSERT_TRUE(dev.free(p).ok());
}

// LeasePages forwards the ops to its (host) pool.
TEST(PageSourceOps, LeasePagesForwardsToThePool) {
  auto pool = zeroed_pool();
  auto mgr = LeaseManager::create(pool.get());
  ASSERT_TRUE(mgr.ok());
  Result<LeaseId> lease =
      (*mgr)->grant(RequestId{1}, 4 * kPageBytes, std::chrono::hours(1), LeaseClock::now());
  ASSERT_TRUE(lease.ok()) << lease.status().to_string();
  LeasePages pages(mgr->get(), *lease);
  PageSource& src = pages;
  EXPECT_TRUE(src.host_accessible());
  const PageId a = *src.allocate();
  const PageId b = *src.allocate();
  const uint32_t v = 0xC0FFEEu;
  src.write(src.data(a) + 4, &v, 4);
  src.copy(src.data(b), src.data(a) + 4, 4);
  uint32_t back = 0;
  src.read(&back, src.data(b), 4);
  EXPECT_EQ(back, v);
  EXPECT_EQ(std::memcmp(pool->data(b), &v, 4), 0);
  ASSERT_TRUE(src.free(a).ok());
  ASSERT_TRUE(src.free(b).ok());
}

}  // namespace
}  // namespace kvgate::kvstore::testing
