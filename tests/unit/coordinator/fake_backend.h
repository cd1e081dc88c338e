// A Backend test double driven by the test thread: it records what is
// submitted and cancelled, and the test decides when a request starts,
// produces tokens or ends.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <vector>

#include "coordinator/backend.h"

namespace kvgate::coordinator::testing {

class FakeBackend final : public Backend {
 public:
  Status submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!submit_status_.ok()) return submit_status_;
    submitted_.push_back(request);
    sinks_[request.id.value()] = std::move(sink);
    cv_.notify_all();
    return Status();
  }
  void cancel(RequestId id) override {
    std::shared_ptr<GenerationSink> sink;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_.push_back(id);
      auto it = sinks_.find(id.value());
      if (it != sinks_.end()) {
        sink = std::move(it->second);
        sinks_.erase(it);
      }
      cv_.notify_all();
    }
    if (sink) sink->on_error(Status(StatusCode::kCancelled, "cancelled"));
  }
  BackendHealth health() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return health_;
  }
  std::vector<BackendModel> models() const override { return {{"fake", 64}}; }

  // Test controls.
  void set_health(BackendHealth h) {
    std::lock_guard<std::mutex> lock(mu_);
    health_ = std::move(h);
  }
  void set_submit_status(Status s) {
    std::lock_guard<std::mutex> lock(mu_);
    submit_status_ = std::move(s);
  }
  // Waits (with a deadline) until `n` requests have been submitted.
  bool wait_submitted(size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return submitted_.size() >= n; });
  }
  bool wait_cancelled(size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return cancelled_.size() >= n; });
  }
  GenerationRequest submitted(size_t i) {
    std::lock_guard<std::mutex> lock(mu_);
    return submitted_.at(i);
  }
  std::vector<RequestId> cancelled() {
    std::lock_guard<std::mutex> lock(mu_);
    return cancelled_;
  }
  std::shared_ptr<GenerationSink> sink(RequestId id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sinks_.find(id.value());
    return it == sinks_.end() ? nullptr : it->second;
  }
  // Ends a request (the sink is dropped afterwards).
  void finish(RequestId id, GenerationResult r) {
    auto s = take(id);
    if (s) s->on_done(r);
  }
  void fail(RequestId id, Status st) {
    auto s = take(id);
    if (s) s->on_error(st);
  }

 private:
  std::shared_ptr<GenerationSink> take(RequestId id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sinks_.find(id.value());
    if (it == sinks_.end()) return nullptr;
    auto s = std::move(it->second);
    sinks_.erase(it);
    return s;
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  BackendHealth health_{true, {}};
  Status submit_status_;
  std::vector<GenerationRequest> submitted_;
  std::vector<RequestId> cancelled_;
  std::map<uint64_t, std::shared_ptr<GenerationSink>> sinks_;
};

}  // namespace kvgate::coordinator::testing
