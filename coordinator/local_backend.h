// A Backend that runs the CPU engine in this process: `kvgate serve` and the
// end-to-end tests, until the placement backend (decode and prefill nodes)
// takes over.
//
// Owns the model (shared, immutable), its tokenizer, one CpuForward and one
// engine thread. Requests run one at a time, in arrival order, under the
// configured KV policy: one full-attention prefill, the policy's compression,
// then decode with sampling, stop strings and EOS (the same steps as
// engine::generate(), written out here so a cancelled request stops between
// two tokens instead of running to max_tokens).
//
// Threads: submit/cancel/health/models may be called from any thread and
// never block on compute; the engine thread owns the CpuForward and calls the
// sinks. Sinks of requests cancelled while still queued are called from the
// thread that calls cancel() (or shutdown()).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/config.h"
#include "coordinator/backend.h"
#include "coordinator/openai_api.h"
#include "engine/kv_policy.h"
#include "engine/kv_policy_spec.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "engine/tokenizer.h"

namespace kvgate::coordinator {

struct LocalBackendOptions {
  std::string model_name;             // served name
  int64_t context_tokens = 0;         // 0 = the model's training context
  engine::ForwardOptions forward;     // threads, ISA, prefill chunk
  engine::KvPolicyConfig kv_policy;   // checked against the model at start()
  int64_t max_queued_requests = 256;  // more: RESOURCE_EXHAUSTED (-> 429)
};

// engine::kv_policy_from_config (engine/kv_policy_spec.h) turns the `kv`
// section into the policy: the gate side file is loaded there.
using engine::kv_policy_from_config;

class LocalBackend final : public Backend {
 public:
  // Plans the KV policy against the model (errors come here, before any
  // thread starts), then starts the engine thread.
  static Result<std::unique_ptr<LocalBackend>> start(
      std::shared_ptr<const engine::LlamaModel> model, engine::Tokenizer tokenizer,
      LocalBackendOptions options);
  // Loads model.path with its tokenizer and the KV policy of `config`;
  // engine.threads / engine.isa / engine.max_batch_tokens and
  // coordinator.max_queued_requests apply. Errors name the file or key.
  static Result<std::unique_ptr<LocalBackend>> from_config(const NodeConfig& config);

  ~LocalBackend() override;  // shutdown()

  Status submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink) override;
  void cancel(RequestId id) override;
  BackendHealth health() const override;
  std::vector<BackendModel> models() const override;

  // What the HTTP front end needs to tokenize for this model (the tokenizer
  // is shared; the chat template is null when the model's is unsupported).
  ServedModel served_model() const;

  // Cancels every queued and running request (their sinks get CANCELLED),
  // then joins the engine thread. Idempotent; submit() fails afterwards.
  void shutdown();

 private:
  struct Job {
    GenerationRequest request;
    std::shared_ptr<GenerationSink> sink;
  };
  LocalBackend(std::shared_ptr<const engine::LlamaModel> model, engine::Tokenizer tokenizer,
               LocalBackendOptions options, std::shared_ptr<const engine::PolicyPlan> plan);
  void engine_loop();
  // Runs one request on the engine thread; the sink's terminal call is made
  // by the caller from the returned value.
  Result<GenerationResult> run(const Job& job);

  const std::shared_ptr<const engine::LlamaModel> model_;
  const std::shared_ptr<const engine::Tokenizer> tokenizer_;
  const LocalBackendOptions options_;
  const std::shared_ptr<const engine::PolicyPlan> plan_;
  std::unique_ptr<engine::CpuForward> forward_;  // engine thread only
  std::vector<float> logits_;                    // engine thread only

  mutable std::mutex mu_;  // guards the members below
  std::condition_variable cv_;
  std::deque<Job> queue_;
  bool stopping_ = false;
  RequestId running_id_;  // valid while a request runs
  std::atomic<bool> cancel_running_{false};
  std::thread thread_;
};

}  // namespace kvgate::coordinator
