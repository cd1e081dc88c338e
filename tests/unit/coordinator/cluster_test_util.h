// Test helpers for the cluster side of the coordinator: a recording sink, a
// recording NodeLink, a small synthetic model config and its predictor.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "coordinator/backend.h"
#include "coordinator/footprint_predictor.h"
#include "coordinator/membership.h"
#include "engine/kv_policy.h"
#include "engine/model.h"
#include "engine/policy_cache.h"

namespace kvgate::coordinator::testing {

// Records every sink call; thread-safe; waits with deadlines.
class RecordingSink final : public GenerationSink {
 public:
  void on_started() override {
    std::lock_guard<std::mutex> lock(mu_);
    ++started_;
    cv_.notify_all();
  }
  void on_tokens(std::string_view text, int32_t n_tokens) override {
    std::lock_guard<std::mutex> lock(mu_);
    text_ += text;
    tokens_ += n_tokens;
    ++token_calls_;
    cv_.notify_all();
  }
  void on_done(const GenerationResult& result) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++terminal_;
    done_ = result;
    cv_.notify_all();
  }
  void on_error(const Status& status) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++terminal_;
    error_ = status;
    cv_.notify_all();
  }
  bool wait_terminal(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return terminal_ > 0; });
  }
  bool wait_started(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return started_ > 0; });
  }
  int started() const { std::lock_guard<std::mutex> l(mu_); return started_; }
  int terminal() const { std::lock_guard<std::mutex> l(mu_); return terminal_; }
  std::string text() const { std::lock_guard<std::mutex> l(mu_); return text_; }
  int tokens() const { std::lock_guard<std::mutex> l(mu_); return tokens_; }
  int token_calls() const { std::lock_guard<std::mutex> l(mu_); return token_calls_; }
  std::optional<GenerationResult> done() const { std::lock_guard<std::mutex> l(mu_); return done_; }
  std::optional<Status> error() const { std::lock_guard<std::mutex> l(mu_); return error_; }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int started_ = 0;
  int terminal_ = 0;
  int tokens_ = 0;
  int token_calls_ = 0;
  std::string text_;
  std::optional<GenerationResult> done_;
  std::optional<Status> error_;
};

// A NodeLink that records what the scheduler sends.
class FakeLink final : public NodeLink {
 public:
  void send(const control::Message& message) override { sent.push_back(message); }
  void close(const Status& reason) override {
    closed = true;
    close_reason = reason;
  }
  template <typename T>
  std::vector<T> all() const {
    std::vector<T> out;
    for (const auto& m : sent) {
      if (const T* t = std::get_if<T>(&m)) out.push_back(*t);
    }
    return out;
  }
  template <typename T>
  size_t count() const { return all<T>().size(); }

  std::vector<control::Message> sent;
  bool closed = false;
  Status close_reason;
};

// A small Llama-shaped config: 4 layers, 2 KV heads, head_dim 8.
inline engine::LlamaConfig small_model_config() {
  engine::LlamaConfig c;
  c.architecture = "llama";
  c.n_layers = 4;
  c.n_embd = 32;
  c.n_ff = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.n_vocab = 100;
  c.n_ctx_train = 4096;
  return c;
}

inline engine::KvPolicyConfig small_policy(engine::KvPolicy p, double keep_rate = 0.3,
                                           int64_t budget = 0) {
  engine::KvPolicyConfig c;
  c.policy = p;
  c.n_sink_tokens = 2;
  c.n_window_tokens = 8;
  c.pod_group_layers = 2;
  c.keep_rate = keep_rate;
  c.budget_tokens = budget;
  return c;
}

inline std::shared_ptr<const engine::PolicyPlan> small_plan(const engine::KvPolicyConfig& policy) {
  auto plan = engine::plan_kv_policy(small_model_config(), policy);
  if (!plan.ok()) return nullptr;
  return *plan;
}

inline FootprintPredictor small_predictor(engine::KvPolicy p = engine::KvPolicy::kH2o,
                                          double keep_rate = 0.3, int64_t page_tokens = 4) {
  auto plan = small_plan(small_policy(p, keep_rate));
  auto predictor = FootprintPredictor::create(*plan, page_tokens);
  return std::move(*predictor);
}

}  // namespace kvgate::coordinator::testing
