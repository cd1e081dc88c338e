// JobQueue: what the prefill node's control connections hand to its engine
// thread — prefill jobs, bounded by count and prompt tokens
// (prefill.max_queued_jobs / max_queued_tokens), cancels, and the decode
// nodes' answers (ExtendResult, TransferResult) for the jobs that run.
// The engine takes a batch of jobs at a time (next_jobs); each stays
// "running" until finish_running(id).
//
// Threads: push/cancel/post/stats from any thread (the io_context);
// next_job/take_messages/wait/finish_running from the engine thread only.
// One mutex guards everything; nothing blocks but next_job() and wait(),
// which sleep on a condition variable until work arrives, the timeout
// passes or close() is called.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "common/control_protocol.h"
#include "common/status.h"
#include "engine/policy_cache.h"

namespace kvgate::control {
class Connection;
}

namespace kvgate::prefill {

using Clock = std::chrono::steady_clock;

// A job that passed its checks (check_job) and waits for the engine.
struct QueuedJob {
  control::PrefillJob job;
  std::shared_ptr<const engine::PolicyPlan> plan;  // resolved kv_policy
  // The connection the job came on: its Error goes back there. When that
  // connection is gone, the registration connection of the same
  // coordinator (coordinator index; -1: came on the listener).
  std::weak_ptr<control::Connection> origin;
  int coordinator = -1;
  Clock::time_point received_at;
  Clock::time_point deadline = Clock::time_point::max();  // from deadline_in
};

struct QueueStats {
  int64_t queued_jobs = 0;
  int64_t queued_tokens = 0;  // prompt tokens of the queued jobs
  bool running = false;       // a job is on the engine
  int64_t running_jobs = 0;
};

enum class CancelOutcome { kUnknown, kDroppedQueued, kRunning };

class JobQueue {
 public:
  JobQueue(int64_t max_jobs, int64_t max_tokens);

  // Queues a job. RESOURCE_EXHAUSTED (naming the limit) when the queue
  // holds max_jobs jobs or the job's tokens would pass max_tokens;
  // FAILED_PRECONDITION for a request id already queued or running;
  // UNAVAILABLE after close().
  Status push(QueuedJob job);

  // Cancel{request}: a queued job is removed (returned in `dropped`); a
  // running job is flagged (the engine sees it with cancel_requested(id)).
  CancelOutcome cancel(RequestId request, std::optional<QueuedJob>* dropped = nullptr);

  // A message from a decode node for the engine (ExtendResult, TransferResult, Error).
  void post(control::Message message);

  QueueStats stats() const;

  // Wakes every waiter; later pushes fail; next_job returns nothing.
  void close();
  // Tests: while paused, next_job hands out nothing (jobs stay queued).
  void set_paused(bool paused);

  // ---- engine thread
  // The oldest queued job (it becomes running), or nothing after `timeout`
  // or once closed.
  std::optional<QueuedJob> next_job(Clock::duration timeout);
  // The oldest queued job and, behind it, as many of the following queued
  // jobs (in order, none skipped) as `max_jobs` and `max_tokens` (prompt
  // tokens together; the first job always comes) allow while
  // batchable(job) holds for each of them, the first included (a job that
  // is not batchable comes alone). All become running. Empty after
  // `timeout` or once closed.
  std::vector<QueuedJob> next_jobs(Clock::duration timeout, int64_t max_jobs, int64_t max_tokens,
                                   const std::function<bool(const QueuedJob&)>& batchable);
  // A running job is over (done, failed or cancelled).
  void finish_running(RequestId id);
  // True once Cancel named this running job.
  bool cancel_requested(RequestId id) const;
  // Messages posted since the last call, in arrival order.
  std::vector<control::Message> take_messages();
  // Sleeps until a message or a cancel of a running job arrives, `timeout`
  // passes or close().
  void wait(Clock::duration timeout);
  bool closed() const;

 private:
  const int64_t max_jobs_;
  const int64_t max_tokens_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<QueuedJob> jobs_;
  int64_t queued_tokens_ = 0;
  std::map<RequestId, bool> running_;  // -> cancel requested
  uint64_t cancels_ = 0;               // running jobs cancelled so far (wakes wait())
  std::vector<control::Message> messages_;
  bool closed_ = false;
  bool paused_ = false;
};

}  // namespace kvgate::prefill
