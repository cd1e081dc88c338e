#include "engine/cpu/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <climits>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace kvgate::engine::cpu {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Sleeps while *addr == expected (spurious wake-ups are fine: callers loop).
void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
#else
  std::this_thread::yield();
#endif
}

void futex_wake_all(std::atomic<uint32_t>* addr) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
#endif
}

// Spins until pred() holds or about `spin_us` have passed; returns pred().
// The clock is read only every 64 polls to keep the poll loop tight.
template <typename Pred>
bool spin_until(Pred pred, int spin_us) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::microseconds(spin_us);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    if (Clock::now() >= deadline) return pred();
  }
}

constexpr uint64_t pack(uint32_t round, uint64_t n, uint64_t next) {
  return (static_cast<uint64_t>(round) << 32) | (n << 16) | next;
}
constexpr uint64_t claim_n(uint64_t v) {
  return (v >> 16) & 0xffff;
}
constexpr uint64_t claim_next(uint64_t v) {
  return v & 0xffff;
}

}  // namespace

ThreadPool::ThreadPool(int n_threads, int spin_us)
    : n_threads_(n_threads > 0
                     ? n_threads
                     : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))),
      spin_us_(spin_us < 0 ? 0 : spin_us) {
  workers_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker_main(i); });
}

ThreadPool::~ThreadPool() {
  if (workers_.empty()) return;
  stop_ = true;
  generation_.fetch_add(1, std::memory_order_seq_cst);
  futex_wake_all(&generation_);
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_erased(int64_t n_shares, Trampoline call, void* ctx) {
  if (n_threads_ == 1 || n_shares <= 1) {
    for (int64_t s = 0; s < n_shares; ++s) call(ctx, s, 0);
    return;
  }
  for (int64_t base = 0; base < n_shares; base += kMaxSharesPerRound) {
    run_round(base, std::min(kMaxSharesPerRound, n_shares - base), call, ctx);
  }
}

void ThreadPool::run_round(int64_t base, int64_t n, Trampoline call, void* ctx) {
  call_ = call;
  ctx_ = ctx;
  base_ = base;
  done_.store(0, std::memory_order_relaxed);
  // Publishes call_/ctx_/base_ to whoever claims a share of this round.
  claim_.store(pack(++round_, static_cast<uint64_t>(n), 0), std::memory_order_release);
  // seq_cst pairs with the workers' seq_cst increment of sleepers_: either a
  // worker sees the new generation before it sleeps, or we see it asleep.
  generation_.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&generation_);

  work(0);

  // Only shares already claimed by running workers are left.
  const uint32_t want = static_cast<uint32_t>(n);
  auto finished = [this, want] { return done_.load(std::memory_order_acquire) == want; };
  if (spin_until(finished, spin_us_)) return;
  owner_sleeping_.store(1, std::memory_order_seq_cst);
  for (;;) {
    const uint32_t d = done_.load(std::memory_order_seq_cst);
    if (d == want) break;
    futex_wait(&done_, d);
  }
  owner_sleeping_.store(0, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_acquire);
}

void ThreadPool::work(int thread) {
  uint64_t v = claim_.load(std::memory_order_acquire);
  for (;;) {
    const uint64_t n = claim_n(v), next = claim_next(v);
    if (next >= n) return;
    // Success means the round is still open (its last share is not done),
    // so call_/ctx_/base_ are this round's and stay valid while we run.
    if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      continue;
    }
    call_(ctx_, base_ + static_cast<int64_t>(next), thread);
    const uint32_t d = done_.fetch_add(1, std::memory_order_seq_cst) + 1;
    if (d == n && owner_sleeping_.load(std::memory_order_seq_cst) != 0) futex_wake_all(&done_);
    v = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_main(int index) {
  // Generation 0 is the constructor's; reading generation_ here instead
  // would skip a round published before this thread got scheduled.
  uint32_t seen = 0;
  for (;;) {
    auto changed = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(changed, spin_us_)) {
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      while (generation_.load(std::memory_order_seq_cst) == seen) futex_wait(&generation_, seen);
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_) return;
    work(index);
  }
}

}  // namespace kvgate::engine::cpu
