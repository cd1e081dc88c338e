// A fork-join pool for the CPU kernels: persistent workers, the caller takes
// part.
//
// Decode issues ~200 parallel regions per token, each a few µs long, so a
// region must start in about a microsecond: idle workers spin on an atomic
// generation counter for `spin_us` before they sleep on a futex, and the
// caller wakes sleepers only when there are any. No allocation per region.
//
// Work is split into shares that pool threads claim from one atomic; the
// caller claims shares too and returns once every share is done. It never
// waits for a worker that has not started: on an oversubscribed machine a
// descheduled worker just finds nothing left when it runs, and the region
// degrades to fewer threads instead of stalling for a scheduler tick.
//
// Threading: one owner thread (the engine loop) constructs the pool and calls
// run*(); they are not reentrant and must not be called from inside a task.
// Shares of one region may run concurrently and must not wait on each other.
// Tasks must not throw (a throw inside a worker terminates the process).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace kvgate::engine::cpu {

class ThreadPool {
 public:
  static constexpr int kDefaultSpinUs = 50;

  // n_threads >= 1 counts the caller; 0 = std::thread::hardware_concurrency().
  explicit ThreadPool(int n_threads, int spin_us = kDefaultSpinUs);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(share, size()) once for every share in [0, size()) and returns
  // when all have finished. Blocks the caller. A share is a slice of the
  // work, not an OS thread: several may run on the same thread (one after
  // another). Accepts any callable, including std::function; not copied.
  template <typename F>
  void run(F&& fn) {
    const int n = n_threads_;
    run_shares(n, [&fn, n](int64_t share, int) { fn(static_cast<int>(share), n); });
  }

  // Runs fn(share, thread) once for every share in [0, n_shares), where
  // `thread` in [0, size()) is the pool thread executing it (0 = the caller;
  // use it to pick per-thread scratch). Returns when all have finished.
  template <typename F>
  void run_shares(int64_t n_shares, F&& fn) {
    using Fn = std::remove_reference_t<F>;
    run_erased(
        n_shares,
        [](void* ctx, int64_t share, int thread) { (*static_cast<Fn*>(ctx))(share, thread); },
        const_cast<void*>(static_cast<const void*>(std::addressof(fn))));
  }

 private:
  using Trampoline = void (*)(void* ctx, int64_t share, int thread);

  // claim_ packs the region number (high 32 bits), its share count (16) and
  // the next unclaimed share (16): one CAS both checks the region and claims.
  static constexpr int64_t kMaxSharesPerRound = 0xffff;

  void run_erased(int64_t n_shares, Trampoline call, void* ctx);
  void run_round(int64_t base, int64_t n, Trampoline call, void* ctx);
  // Claims and runs shares of the current round until none are left.
  void work(int thread);
  void worker_main(int index);

  const int n_threads_;
  const int spin_us_;
  std::vector<std::thread> workers_;

  // The current round's task. Written by the owner before it publishes the
  // round in claim_ (release); read only by a thread that has claimed a
  // share of that round, which keeps the round (and these fields) alive.
  Trampoline call_ = nullptr;
  void* ctx_ = nullptr;
  int64_t base_ = 0;    // share index of this round's share 0
  uint32_t round_ = 0;  // owner-only counter
  bool stop_ = false;

  // Each on its own cache line: workers poll generation_ and claim_, the
  // owner polls done_.
  alignas(64) std::atomic<uint64_t> claim_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};  // futex word: "new round"
  alignas(64) std::atomic<uint32_t> done_{0};        // shares finished this round
  alignas(64) std::atomic<int32_t> sleepers_{0};     // workers in (or entering) futex wait
  std::atomic<int32_t> owner_sleeping_{0};           // the owner waits on done_
};

}  // namespace kvgate::engine::cpu
