// JobQueue: what the prefill node's control connections hand to its engine
// thread — prefill jobs, bounded by count and prompt tokens
// (prefill.max_queued_jobs / max_queued_tokens), cancels, and the decode
// nodes' answers (ExtendResult, TransferResult) for the job that runs.
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

  // Cancel{request}: a queued job is removed (returned in `dropped`); the
  // running job is flagged (the engine sees it with cancel_requested()).
  CancelOutcome cancel(RequestId request, std::optional<QueuedJob>* dropped = nullptr);

  // A message from a decode node for the engine (ExtendResult, TransferResult, Error).
  void post(control::Message message);

  QueueStats stats() const;

  // Wakes every waiter; later pushes fail; next_job returns nothing.
  void close();
  // Tests: while paused, next_job hands out nothing (jobs stay queued).
  void set_paused(bool paused);

  // ---- engine thread
  // The oldest queued job (it becomes the running one), or nothing after
  // `timeout` or once closed.
  std::optional<QueuedJob> next_job(Clock::duration timeout);
  // The running job is over (done, failed or cancelled).
  void finish_running();
  // True once Cancel named the running job.
  bool cancel_requested() const;
  // Messages posted since the last call, in arrival order.
  std::vector<control::Message> take_messages();
  // Sleeps until a message or cancel arrives, `timeout` passes or close().
  void wait(Clock::duration timeout);
  bool closed() const;

 private:
  const int64_t max_jobs_;
  const int64_t max_tokens_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<QueuedJob> jobs_;
  int64_t queued_tokens_ = 0;
  RequestId running_;
  bool cancel_running_ = false;
  std::vector<control::Message> messages_;
  bool closed_ = false;
  bool paused_ = false;
};

}  // namespace kvgate::prefill
