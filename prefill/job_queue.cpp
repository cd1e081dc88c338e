#include "prefill/job_queue.h"

#include <algorithm>
#include <string>

namespace kvgate::prefill {

JobQueue::JobQueue(int64_t max_jobs, int64_t max_tokens)
    : max_jobs_(max_jobs), max_tokens_(max_tokens) {}

Status JobQueue::push(QueuedJob job) {
  const auto tokens = static_cast<int64_t>(job.job.prompt_token_ids.size());
  const RequestId id = job.job.request_id;
  {
    std::lock_guard lock(mu_);
    if (closed_) return unavailable("prefill node is shutting down");
    // A running job that was cancelled (a failed attempt of this request)
    // no longer counts: the coordinator may place the next attempt here
    // while the engine finishes the old one and throws its result away.
    const auto run = running_.find(id);
    if ((run != running_.end() && !run->second) ||
        std::any_of(jobs_.begin(), jobs_.end(),
                    [&](const QueuedJob& q) { return q.job.request_id == id; })) {
      return failed_precondition("request " + std::to_string(id.value()) +
                                 " is already queued or running on this prefill node");
    }
    if (static_cast<int64_t>(jobs_.size()) >= max_jobs_) {
      return resource_exhausted("prefill queue full: " + std::to_string(jobs_.size()) +
                                " jobs queued (prefill.max_queued_jobs " +
                                std::to_string(max_jobs_) + ")");
    }
    if (queued_tokens_ + tokens > max_tokens_) {
      return resource_exhausted("prefill queue full: " + std::to_string(queued_tokens_) + " + " +
                                std::to_string(tokens) +
                                " prompt tokens exceed prefill.max_queued_tokens " +
                                std::to_string(max_tokens_));
    }
    queued_tokens_ += tokens;
    jobs_.push_back(std::move(job));
  }
  cv_.notify_all();
  return Status();
}

CancelOutcome JobQueue::cancel(RequestId request, std::optional<QueuedJob>* dropped) {
  std::unique_lock lock(mu_);
  auto it = std::find_if(jobs_.begin(), jobs_.end(),
                         [&](const QueuedJob& q) { return q.job.request_id == request; });
  if (it != jobs_.end()) {
    queued_tokens_ -= static_cast<int64_t>(it->job.prompt_token_ids.size());
    if (dropped != nullptr) *dropped = std::move(*it);
    jobs_.erase(it);
    return CancelOutcome::kDroppedQueued;
  }
  if (auto run = running_.find(request); run != running_.end()) {
    if (!run->second) ++cancels_;
    run->second = true;
    lock.unlock();
    cv_.notify_all();
    return CancelOutcome::kRunning;
  }
  return CancelOutcome::kUnknown;
}

void JobQueue::post(control::Message message) {
  {
    std::lock_guard lock(mu_);
    messages_.push_back(std::move(message));
  }
  cv_.notify_all();
}

QueueStats JobQueue::stats() const {
  std::lock_guard lock(mu_);
  return {static_cast<int64_t>(jobs_.size()), queued_tokens_, !running_.empty(),
          static_cast<int64_t>(running_.size())};
}

void JobQueue::close() {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

void JobQueue::set_paused(bool paused) {
  {
    std::lock_guard lock(mu_);
    paused_ = paused;
  }
  cv_.notify_all();
}

std::optional<QueuedJob> JobQueue::next_job(Clock::duration timeout) {
  std::vector<QueuedJob> jobs = next_jobs(timeout, 1, 0, [](const QueuedJob&) { return false; });
  if (jobs.empty()) return std::nullopt;
  return std::move(jobs[0]);
}

std::vector<QueuedJob> JobQueue::next_jobs(Clock::duration timeout, int64_t max_jobs,
                                           int64_t max_tokens,
                                           const std::function<bool(const QueuedJob&)>& batchable) {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return closed_ || (!paused_ && !jobs_.empty()); });
  std::vector<QueuedJob> out;
  if (closed_ || paused_ || jobs_.empty()) return out;
  int64_t tokens = 0;
  auto take = [&] {
    QueuedJob job = std::move(jobs_.front());
    jobs_.pop_front();
    const auto n = static_cast<int64_t>(job.job.prompt_token_ids.size());
    queued_tokens_ -= n;
    tokens += n;
    // A cancelled earlier attempt of the same request may still be
    // running: the new one takes its place in the map, not cancelled.
    running_[job.job.request_id] = false;
    out.push_back(std::move(job));
  };
  take();
  if (!batchable || !batchable(out[0])) return out;
  while (!jobs_.empty() && static_cast<int64_t>(out.size()) < max_jobs &&
         tokens + static_cast<int64_t>(jobs_.front().job.prompt_token_ids.size()) <= max_tokens &&
         batchable(jobs_.front())) {
    take();
  }
  return out;
}

void JobQueue::finish_running(RequestId id) {
  std::lock_guard lock(mu_);
  running_.erase(id);
}

bool JobQueue::cancel_requested(RequestId id) const {
  std::lock_guard lock(mu_);
  auto it = running_.find(id);
  return it != running_.end() && it->second;
}

std::vector<control::Message> JobQueue::take_messages() {
  std::lock_guard lock(mu_);
  std::vector<control::Message> out;
  out.swap(messages_);
  return out;
}

void JobQueue::wait(Clock::duration timeout) {
  std::unique_lock lock(mu_);
  const uint64_t cancels = cancels_;
  cv_.wait_for(lock, timeout, [&] { return closed_ || cancels_ != cancels || !messages_.empty(); });
}

bool JobQueue::closed() const {
  std::lock_guard lock(mu_);
  return closed_;
}

}  // namespace kvgate::prefill
