#include "engine/generate.h"

#include <chrono>

#include "engine/policy_cache.h"

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
  std::vector<float> logits(c.n_vocab);
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  history.reserve(capacity);

  // One full-attention prefill; a policy other than dense then compresses
  // the cache and decodes over the compressed one (engine/policy_cache.h).
  KVGATE_ASSIGN_OR_RETURN(auto plan, plan_kv_policy(c, options.kv_policy));
  KVGATE_ASSIGN_OR_RETURN(auto seqs, prefill_for_policies(forward, std::span(&plan, 1), prompt,
                                                          capacity, logits, &res.prefill_seconds));
  PolicySequence& seq = *seqs[0];
  res.compress_seconds = seq.compress_seconds();
  const auto t1 = Clock::now();

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
    if (i > 0) KVGATE_RETURN_IF_ERROR(seq.decode(res.tokens.back(), logits));
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
  // The cache holds every token fed back: the prompt and all but the last
  // generated token.
  res.kv_dense_bytes = seq.kv_dense_bytes();
  res.kv_bytes = seq.kv_bytes();
  res.keep_rate = seq.keep_rate();
  return res;
}

}  // namespace kvgate::engine
