#include "engine/generate.h"

#include <chrono>

namespace kvgate::engine {

Result<GenerateResult> generate(CpuForward& forward, const Tokenizer& tokenizer,
                                std::span<const int32_t> prompt, const GenerateOptions& options,
                                const std::function<void(std::string_view)>& on_text) {
  KVGATE_RETURN_IF_ERROR(options.sampling.validate());
  if (options.max_tokens < 0) return invalid_argument("max_tokens must be >= 0");
  if (prompt.empty()) return invalid_argument("prompt is empty");
  const LlamaConfig& c = forward.model().config();
  const int64_t capacity = static_cast<int64_t>(prompt.size()) + options.max_tokens;
  if (capacity > c.n_ctx_train) {
    return invalid_argument("prompt (" + std::to_string(prompt.size()) + " tokens) + max_tokens (" +
                            std::to_string(options.max_tokens) + ") exceeds the model context of " +
                            std::to_string(c.n_ctx_train) + " tokens");
  }
  using Clock = std::chrono::steady_clock;
  GenerateResult res;
  res.prompt_tokens = static_cast<int64_t>(prompt.size());
  KvCache cache(c, capacity);
  std::vector<float> logits(c.n_vocab);
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  history.reserve(capacity);

  const auto t0 = Clock::now();
  KVGATE_RETURN_IF_ERROR(forward.prefill(cache, prompt, logits.data()));
  const auto t1 = Clock::now();
  res.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  Sampler sampler(options.sampling);
  StreamDecoder decoder(tokenizer);
  StopMatcher stops(options.stop);
  auto emit = [&](const std::string& s) {
    if (s.empty()) return;
    res.text += s;
    if (on_text) on_text(s);
  };
  res.finish_reason = "length";
  for (int32_t i = 0; i < options.max_tokens; ++i) {
    if (i > 0) {
      const int32_t last = res.tokens.back();
      BatchItem item{&cache, std::span<const int32_t>(&last, 1), true};
      KVGATE_RETURN_IF_ERROR(forward.forward(std::span<const BatchItem>(&item, 1), logits.data()));
    }
    const int32_t tok = sampler.sample(logits, history);
    if (!options.ignore_eos && tokenizer.is_eog(tok)) {
      res.finish_reason = "stop";
      break;
    }
    res.tokens.push_back(tok);
    history.push_back(tok);
    emit(stops.feed(decoder.push(tok)));
    if (stops.stopped()) {
      res.finish_reason = "stop";
      break;
    }
  }
  if (!stops.stopped()) {
    emit(stops.feed(decoder.flush()));
    emit(stops.flush());
  }
  res.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  res.kv_cache_bytes = cache.used_bytes();
  return res;
}

}  // namespace kvgate::engine
