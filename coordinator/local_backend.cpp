#include "coordinator/local_backend.h"

#include <filesystem>
#include <span>

#include "engine/chat_template.h"
#include "engine/gate_file.h"
#include "engine/sampler.h"

namespace kvgate::coordinator {

LocalBackend::LocalBackend(std::shared_ptr<const engine::LlamaModel> model,
                           engine::Tokenizer tokenizer, LocalBackendOptions options,
                           std::shared_ptr<const engine::PolicyPlan> plan)
    : model_(std::move(model)),
      tokenizer_(std::make_shared<const engine::Tokenizer>(std::move(tokenizer))),
      options_(std::move(options)),
      plan_(std::move(plan)) {}

Result<std::unique_ptr<LocalBackend>> LocalBackend::start(
    std::shared_ptr<const engine::LlamaModel> model, engine::Tokenizer tokenizer,
    LocalBackendOptions options) {
  if (!model) return invalid_argument("local backend: no model");
  const int64_t n_ctx = model->config().n_ctx_train;
  if (options.context_tokens <= 0 || options.context_tokens > n_ctx) {
    options.context_tokens = n_ctx;
  }
  if (options.model_name.empty()) return invalid_argument("local backend: empty model name");
  auto plan = engine::plan_kv_policy(model->config(), options.kv_policy);
  if (!plan.ok()) return plan.status();
  std::unique_ptr<LocalBackend> b(
      new LocalBackend(std::move(model), std::move(tokenizer), std::move(options), *plan));
  b->forward_ = std::make_unique<engine::CpuForward>(*b->model_, b->options_.forward);
  b->logits_.resize(static_cast<size_t>(b->model_->config().n_vocab));
  b->thread_ = std::thread([raw = b.get()] { raw->engine_loop(); });
  return b;
}

Result<std::unique_ptr<LocalBackend>> LocalBackend::from_config(const NodeConfig& config) {
  const std::string& path = config.model.path;
  if (path.empty()) return invalid_argument("model.path: required");
  auto with_path = [&](const Status& s) { return Status(s.code(), path + ": " + s.message()); };
  auto model = engine::LlamaModel::load(path);
  if (!model.ok()) return with_path(model.status());
  auto spec = engine::tokenizer_spec_from_gguf((*model)->gguf());
  if (!spec.ok()) return with_path(spec.status());
  auto tok = engine::Tokenizer::create(std::move(*spec));
  if (!tok.ok()) return with_path(tok.status());
  auto policy = kv_policy_from_config(config.kv, path, **model);
  if (!policy.ok()) return policy.status();

  LocalBackendOptions o;
  o.model_name = served_model_name(config.model);
  o.context_tokens = config.model.max_context_tokens;
  o.forward.n_threads = static_cast<int>(config.engine.threads);
  o.forward.max_batch_tokens = config.engine.max_batch_tokens;
  using engine::cpu::Isa;
  switch (config.engine.isa) {
    case IsaChoice::kAuto:
      o.forward.isa = engine::cpu::best_isa();
      break;
    case IsaChoice::kScalar:
      o.forward.isa = Isa::kScalar;
      break;
    case IsaChoice::kAvx2:
      o.forward.isa = Isa::kAvx2;
      break;
    case IsaChoice::kAvx512:
      o.forward.isa = Isa::kAvx512;
      break;
  }
  if (!engine::cpu::isa_supported(o.forward.isa)) {
    return invalid_argument("engine.isa: this CPU does not support " +
                            std::string(engine::cpu::isa_name(o.forward.isa)));
  }
  if (config.engine.backend != EngineBackend::kCpu) {
    return unimplemented("engine.backend: the local backend runs the CPU engine only");
  }
  o.kv_policy = std::move(*policy);
  o.max_queued_requests = config.coordinator.max_queued_requests;
  std::shared_ptr<const engine::LlamaModel> shared_model(std::move(*model));
  return start(std::move(shared_model), std::move(*tok), std::move(o));
}

LocalBackend::~LocalBackend() {
  shutdown();
}

Status LocalBackend::submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink) {
  if (request.prompt_tokens.empty()) return invalid_argument("prompt is empty");
  if (request.max_tokens < 1) return invalid_argument("max_tokens must be >= 1");
  const int64_t need = static_cast<int64_t>(request.prompt_tokens.size()) + request.max_tokens;
  if (need > options_.context_tokens) {
    return invalid_argument("prompt + max_tokens (" + std::to_string(need) +
                            " tokens) exceeds the model context of " +
                            std::to_string(options_.context_tokens) + " tokens");
  }
  if (request.model != options_.model_name) return not_found("model " + request.model);
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return unavailable("the local engine is shutting down");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queued_requests) {
    return resource_exhausted("the local engine queue is full (" +
                              std::to_string(options_.max_queued_requests) + " requests)");
  }
  queue_.push_back(Job{std::move(request), std::move(sink)});
  cv_.notify_one();
  return Status();
}

void LocalBackend::cancel(RequestId id) {
  std::shared_ptr<GenerationSink> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (running_id_.valid() && running_id_ == id) {
      cancel_running_.store(true);
      return;
    }
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (it->request.id == id) {
        dropped = std::move(it->sink);
        queue_.erase(it);
        break;
      }
    }
  }
  if (dropped) dropped->on_error(Status(StatusCode::kCancelled, "cancelled before it started"));
}

BackendHealth LocalBackend::health() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return {false, "the local engine is shutting down"};
  return {true, {}};
}

std::vector<BackendModel> LocalBackend::models() const {
  return {BackendModel{options_.model_name, options_.context_tokens}};
}

ServedModel LocalBackend::served_model() const {
  ServedModel m;
  m.name = options_.model_name;
  m.context_tokens = options_.context_tokens;
  m.tokenizer = tokenizer_;
  if (!tokenizer_->chat_template().empty()) {
    auto t = engine::ChatTemplate::parse(tokenizer_->chat_template());
    if (t.ok()) m.chat_template = std::make_shared<const engine::ChatTemplate>(std::move(*t));
  }
  m.created_unix = std::chrono::duration_cast<std::chrono::seconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  return m;
}

void LocalBackend::shutdown() {
  std::deque<Job> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    dropped.swap(queue_);
    if (running_id_.valid()) cancel_running_.store(true);
    cv_.notify_all();
  }
  for (Job& j : dropped) {
    j.sink->on_error(Status(StatusCode::kCancelled, "the local engine is shutting down"));
  }
  if (thread_.joinable()) thread_.join();
}

void LocalBackend::engine_loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      job = std::move(queue_.front());
      queue_.pop_front();
      running_id_ = job.request.id;
      cancel_running_.store(false);
    }
    Result<GenerationResult> result = internal_error("not run");
    try {
      result = run(job);
    } catch (const std::exception& e) {
      // The engine reports errors as values; this keeps the thread alive if
      // something below throws anyway (std::bad_alloc).
      result = internal_error(std::string("engine: ") + e.what());
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_id_ = RequestId();
    }
    if (result.ok()) {
      job.sink->on_done(*result);
    } else {
      job.sink->on_error(result.status());
    }
  }
}

Result<GenerationResult> LocalBackend::run(const Job& job) {
  const GenerationRequest& req = job.request;
  GenerationSink& sink = *job.sink;
  sink.on_started();
  KVGATE_RETURN_IF_ERROR(req.sampling.validate());
  const std::span<const int32_t> prompt(req.prompt_tokens);
  const int64_t capacity = static_cast<int64_t>(prompt.size()) + req.max_tokens;
  auto cancelled = [&] { return cancel_running_.load(std::memory_order_relaxed); };
  const Status kCancelledStatus(StatusCode::kCancelled, "cancelled");

  // One full-attention prefill, then the policy's cache (engine/policy_cache.h).
  KVGATE_ASSIGN_OR_RETURN(auto seqs, engine::prefill_for_policies(*forward_, std::span(&plan_, 1),
                                                                  prompt, capacity, logits_));
  engine::PolicySequence& seq = *seqs[0];
  if (cancelled()) return kCancelledStatus;

  engine::Sampler sampler(req.sampling);
  engine::StreamDecoder decoder(*tokenizer_);
  engine::StopMatcher stops(req.stop);
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  history.reserve(static_cast<size_t>(capacity));
  GenerationResult out;
  out.usage.prompt_tokens = static_cast<int64_t>(prompt.size());
  out.finish_reason = "length";
  int32_t last = -1;
  for (int32_t i = 0; i < req.max_tokens; ++i) {
    if (cancelled()) return kCancelledStatus;
    if (i > 0) KVGATE_RETURN_IF_ERROR(seq.decode(last, logits_));
    const int32_t tok = sampler.sample(logits_, history);
    if (!req.ignore_eos && tokenizer_->is_eog(tok)) {
      out.finish_reason = "stop";
      break;
    }
    last = tok;
    history.push_back(tok);
    ++out.usage.completion_tokens;
    const std::string text = stops.feed(decoder.push(tok));
    sink.on_tokens(text, 1);
    if (stops.stopped()) {
      out.finish_reason = "stop";
      break;
    }
  }
  if (!stops.stopped()) {
    std::string tail = stops.feed(decoder.flush());
    tail += stops.flush();
    if (!tail.empty()) sink.on_tokens(tail, 0);
  }
  return out;
}

}  // namespace kvgate::coordinator
