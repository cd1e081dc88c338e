#include "engine/generate.h"

#include <chrono>
#include <memory>
#include <optional>

#include "kvstore/footprint.h"
#include "kvstore/page_pool.h"

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
  AttentionStats stats;
  const bool want_stats = policy_needs_stats(options.kv_policy);
  if (want_stats) {
    stats.reset(c.n_layers, c.n_kv_heads, res.prompt_tokens,
                res.prompt_tokens - options.kv_policy.snapkv_observe_tokens);
  }
  KVGATE_RETURN_IF_ERROR(forward.prefill(cache, prompt, logits.data(), want_stats ? &stats : nullptr));
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

  // Compressed decode: the prompt's dense cache becomes the policy's layout.
  const bool compressed = options.kv_policy.policy != KvPolicy::kDense;
  kvstore::KvLayout layout;
  std::unique_ptr<kvstore::PagePool> pool;
  std::optional<kvstore::CompressedKvCache> ccache;
  std::vector<uint8_t> flags;
  if (compressed) {
    KVGATE_ASSIGN_OR_RETURN(layout, make_kv_layout(c, options.kv_policy));
    const int64_t page_tokens = 16;
    const int64_t page_bytes = page_tokens * c.head_dim * 2;
    // Room for a dense cache of the final length plus one partly filled
    // page per list: never the limit here; the decode node sizes its pool.
    const int64_t lists = 2 * c.n_layers * c.n_kv_heads + 2 * layout.blocks.n_slots() +
                          c.n_layers * c.n_kv_heads;
    const int64_t pool_bytes =
        kvstore::dense_bytes(layout, capacity) * 2 + 2 * lists * page_bytes + page_bytes;
    KVGATE_ASSIGN_OR_RETURN(pool, kvstore::PagePool::create(page_bytes, pool_bytes));
    KVGATE_RETURN_IF_ERROR(policy_flags(options.kv_policy, layout, 0, res.prompt_tokens, flags,
                                        want_stats ? &stats : nullptr));
    const int64_t plane = c.n_kv_heads * cache.capacity() * c.head_dim;
    kvstore::DenseKv kv{cache.k(0, 0), cache.k(0, 0) + plane, c.head_dim, 2 * plane,
                        cache.capacity() * c.head_dim};
    KVGATE_ASSIGN_OR_RETURN(auto built, kvstore::CompressedKvCache::build_from_dense(
                                            layout, pool.get(), res.prompt_tokens, kv, flags));
    ccache.emplace(std::move(built));
  }

  res.finish_reason = "length";
  for (int32_t i = 0; i < options.max_tokens; ++i) {
    if (i > 0) {
      const int32_t last = res.tokens.back();
      if (compressed) {
        KVGATE_RETURN_IF_ERROR(policy_flags(options.kv_policy, layout, ccache->n_tokens(), 1, flags,
                                            want_stats ? &stats : nullptr));
        CompressedItem item{&*ccache, last, flags, true};
        KVGATE_RETURN_IF_ERROR(
            forward.forward_compressed(std::span<const CompressedItem>(&item, 1), logits.data()));
      } else {
        BatchItem item{&cache, std::span<const int32_t>(&last, 1), true};
        KVGATE_RETURN_IF_ERROR(forward.forward(std::span<const BatchItem>(&item, 1), logits.data()));
      }
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
  // The cache holds every token fed back: the prompt and all but the last
  // generated token.
  const int64_t n_cached = compressed ? ccache->n_tokens() : cache.n_tokens();
  res.kv_dense_bytes = forward.model().kv_bytes_per_token() * n_cached;
  res.kv_bytes = compressed ? ccache->bytes() : res.kv_dense_bytes;
  return res;
}

}  // namespace kvgate::engine
