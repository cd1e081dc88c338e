#include "engine/eval.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <chrono>
#include <cmath>
#include <cstdlib>

#include "engine/chat_template.h"
#include "engine/policy_cache.h"
#include "engine/sampler.h"
#include "kvstore/footprint.h"

namespace kvgate::engine {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

Status check_context(const LlamaConfig& config, int64_t n_tokens, const char* what) {
  if (n_tokens > config.n_ctx_train) {
    return out_of_range(std::string(what) + " (" + std::to_string(n_tokens) +
                        " tokens) exceeds the model context of " +
                        std::to_string(config.n_ctx_train) + " tokens");
  }
  return Status();
}

// Mean of the KV measures, bytes rounded to the nearest byte.
KvMeasure mean_measure(std::span<const KvMeasure> ms) {
  KvMeasure out;
  if (ms.empty()) return out;
  double dense = 0, kv = 0, keep = 0;
  for (const KvMeasure& m : ms) {
    dense += static_cast<double>(m.kv_dense_bytes);
    kv += static_cast<double>(m.kv_bytes);
    keep += m.keep_rate;
  }
  const double n = static_cast<double>(ms.size());
  out.kv_dense_bytes = std::llround(dense / n);
  out.kv_bytes = std::llround(kv / n);
  out.keep_rate = keep / n;
  return out;
}

KvMeasure measure(const PolicySequence& seq) {
  return KvMeasure{seq.kv_dense_bytes(), seq.kv_bytes(), seq.keep_rate()};
}

using Plans = std::vector<std::shared_ptr<const PolicyPlan>>;

// Every policy checked against the model before any work.
Result<Plans> plan_all(const LlamaConfig& config, std::span<const KvPolicyConfig> policies) {
  if (policies.empty()) return invalid_argument("no KV policy to evaluate");
  Plans plans;
  for (const KvPolicyConfig& p : policies) {
    KVGATE_ASSIGN_OR_RETURN(auto plan, plan_kv_policy(config, p));
    plans.push_back(std::move(plan));
  }
  return plans;
}

EvalPolicyInfo info_of(const PolicyPlan& plan) {
  EvalPolicyInfo info;
  info.name = plan.name;
  info.blocks = plan.blocks;
  info.n_sink_tokens = plan.layout.n_sink_tokens;
  info.n_window_tokens = plan.layout.n_window_tokens;
  info.budget_tokens = plan.config.budget_tokens;
  info.target_keep_rate = policy_needs_stats(plan.config) ? plan.config.keep_rate : 0.0;
  return info;
}

// One window: tokens[0, n) prefilled once, tokens[n, n + m) scored by every
// plan in turn. Inputs were checked by the caller.
Result<std::vector<PerplexityResult>> score_window(CpuForward& forward, const Plans& plans,
                                                   std::span<const int32_t> tokens, int64_t n,
                                                   int64_t m, const EvalProgressFn& progress) {
  const LlamaConfig& config = forward.model().config();
  std::vector<float> prefill_logits(config.n_vocab), logits(config.n_vocab);
  double prefill_seconds = 0.0;
  // The last scored token is never fed: the caches end with N + M - 1 tokens.
  KVGATE_ASSIGN_OR_RETURN(auto seqs, prefill_for_policies(forward, plans, tokens.first(n), n + m - 1,
                                                          prefill_logits, &prefill_seconds));
  std::vector<PerplexityResult> out;
  const auto total_steps = static_cast<int64_t>(plans.size()) * m;
  for (size_t p = 0; p < plans.size(); ++p) {
    PolicySequence& seq = *seqs[p];
    PerplexityResult res;
    res.policy = info_of(*plans[p]);
    res.context_tokens = n;
    res.score_tokens = m;
    res.prefill_seconds = prefill_seconds;
    res.compress_seconds = seq.compress_seconds();
    res.token_nll.reserve(m);
    logits = prefill_logits;
    const auto t1 = Clock::now();
    double sum = 0.0;
    for (int64_t j = 0; j < m; ++j) {
      if (j > 0) KVGATE_RETURN_IF_ERROR(seq.decode(tokens[n + j - 1], logits));
      const double nll = token_nll(logits, tokens[n + j]);
      res.token_nll.push_back(nll);
      sum += nll;
      const int64_t done = static_cast<int64_t>(p) * m + j + 1;
      if (progress && ((j + 1) % 32 == 0 || j + 1 == m)) progress({"scoring", n, done, total_steps});
    }
    res.decode_seconds = seconds_since(t1);
    res.nll_mean = sum / static_cast<double>(m);
    res.perplexity = perplexity_from_nll(res.nll_mean);
    res.kv = measure(seq);
    out.push_back(std::move(res));
    seqs[p].reset();  // its cache is no longer needed
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------- scoring

double token_nll(std::span<const float> logits, int32_t target) {
  assert(target >= 0 && static_cast<size_t>(target) < logits.size());
  double max_logit = -HUGE_VAL;
  for (float l : logits) max_logit = std::max(max_logit, static_cast<double>(l));
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - max_logit);
  // -log(exp(l_t - max) / sum)
  return std::log(sum) - (static_cast<double>(logits[target]) - max_logit);
}

double perplexity_from_nll(double nll_mean) {
  return std::exp(nll_mean);
}

// ------------------------------------------------------------ policies

int64_t eval_dense_bytes(const LlamaConfig& config, int64_t n_tokens) {
  return kvstore::dense_bytes(config.n_layers, config.n_kv_heads, config.head_dim,
                              /*elem_bytes=*/2, n_tokens);
}

// ------------------------------------------------------------- perplexity

namespace {

Status check_perplexity_input(const LlamaConfig& config, std::span<const int32_t> tokens, int64_t n,
                              int64_t m) {
  if (n < 1) return invalid_argument("context must be at least 1 token, got " + std::to_string(n));
  if (m < 1) return invalid_argument("score must be at least 1 token, got " + std::to_string(m));
  KVGATE_RETURN_IF_ERROR(check_context(config, n + m, "context + score"));
  if (static_cast<int64_t>(tokens.size()) < n + m) {
    return invalid_argument("text has " + std::to_string(tokens.size()) +
                            " tokens, fewer than context + score = " + std::to_string(n + m));
  }
  for (int64_t i = 0; i < n + m; ++i) {
    if (tokens[i] < 0 || tokens[i] >= config.n_vocab) {
      return invalid_argument("token " + std::to_string(tokens[i]) + " at position " +
                              std::to_string(i) + " is outside the vocabulary");
    }
  }
  return Status();
}

}  // namespace

Result<std::vector<PerplexityResult>> score_perplexity(CpuForward& forward,
                                                       std::span<const int32_t> tokens,
                                                       const PerplexityOptions& options,
                                                       const EvalProgressFn& progress) {
  const LlamaConfig& config = forward.model().config();
  const int64_t n = options.context_tokens;
  const int64_t m = options.score_tokens;
  KVGATE_RETURN_IF_ERROR(check_perplexity_input(config, tokens, n, m));
  KVGATE_ASSIGN_OR_RETURN(auto plans, plan_all(config, options.policies));
  return score_window(forward, plans, tokens, n, m, progress);
}

Result<std::vector<EvalWindow>> plan_windows(std::span<const int64_t> document_tokens,
                                             int64_t window_tokens, int64_t n_windows) {
  if (window_tokens < 1) return invalid_argument("window must be at least 1 token");
  if (n_windows < 1) return invalid_argument("windows must be >= 1");
  std::vector<EvalWindow> candidates;
  for (size_t d = 0; d < document_tokens.size(); ++d) {
    for (int64_t s = 0; s + window_tokens <= document_tokens[d]; s += window_tokens) {
      candidates.push_back({static_cast<int64_t>(d), s});
    }
  }
  const auto c = static_cast<int64_t>(candidates.size());
  if (c < n_windows) {
    return invalid_argument("the corpus holds only " + std::to_string(c) + " windows of " +
                            std::to_string(window_tokens) + " tokens, fewer than the " +
                            std::to_string(n_windows) + " asked for");
  }
  std::vector<EvalWindow> out;
  out.reserve(n_windows);
  for (int64_t i = 0; i < n_windows; ++i) {
    // floor((i + 0.5) * c / n_windows), in integers: (2i + 1) * c / (2 n_windows)
    out.push_back(candidates[(2 * i + 1) * c / (2 * n_windows)]);
  }
  return out;
}

Result<std::vector<CorpusPerplexityResult>> score_corpus_perplexity(
    CpuForward& forward, std::span<const std::vector<int32_t>> documents,
    const PerplexityOptions& options, int64_t n_windows, int64_t slot_tokens,
    const EvalProgressFn& progress) {
  const LlamaConfig& config = forward.model().config();
  std::vector<int64_t> sizes;
  for (const auto& d : documents) sizes.push_back(static_cast<int64_t>(d.size()));
  const int64_t n = options.context_tokens;
  const int64_t m = options.score_tokens;
  const int64_t window = n + m;
  KVGATE_RETURN_IF_ERROR(check_context(config, window, "context + score"));
  if (window > slot_tokens) {
    return invalid_argument("context + score (" + std::to_string(window) +
                            " tokens) exceeds the window slot of " + std::to_string(slot_tokens) +
                            " tokens");
  }
  KVGATE_ASSIGN_OR_RETURN(auto windows, plan_windows(sizes, slot_tokens, n_windows));
  for (EvalWindow& w : windows) w.start += slot_tokens - window;  // end where the slot ends
  KVGATE_ASSIGN_OR_RETURN(auto plans, plan_all(config, options.policies));

  std::vector<CorpusPerplexityResult> out(plans.size());
  std::vector<std::vector<KvMeasure>> kv(plans.size());
  std::vector<double> sum(plans.size(), 0.0);
  for (size_t p = 0; p < plans.size(); ++p) {
    PerplexityResult& total = out[p].total;
    total.policy = info_of(*plans[p]);
    total.context_tokens = n;
    total.score_tokens = m;
  }
  if (progress) progress({"window", n, 0, n_windows});
  for (size_t i = 0; i < windows.size(); ++i) {
    const auto& doc = documents[windows[i].document];
    auto span = std::span<const int32_t>(doc).subspan(windows[i].start, window);
    KVGATE_RETURN_IF_ERROR(check_perplexity_input(config, span, n, m));
    KVGATE_ASSIGN_OR_RETURN(auto rs, score_window(forward, plans, span, n, m, progress));
    for (size_t p = 0; p < plans.size(); ++p) {
      const PerplexityResult& r = rs[p];
      PerplexityResult& total = out[p].total;
      for (double x : r.token_nll) sum[p] += x;
      total.token_nll.insert(total.token_nll.end(), r.token_nll.begin(), r.token_nll.end());
      total.prefill_seconds += r.prefill_seconds;
      total.compress_seconds += r.compress_seconds;
      total.decode_seconds += r.decode_seconds;
      out[p].window_perplexity.push_back(r.perplexity);
      kv[p].push_back(r.kv);
    }
    if (progress) progress({"window", n, static_cast<int64_t>(i + 1), n_windows});
  }
  for (size_t p = 0; p < plans.size(); ++p) {
    PerplexityResult& total = out[p].total;
    total.nll_mean = sum[p] / static_cast<double>(total.token_nll.size());
    total.perplexity = perplexity_from_nll(total.nll_mean);
    total.kv = mean_measure(kv[p]);
    out[p].windows = windows;
  }
  return out;
}

// ---------------------------------------------------------------- passkey

namespace {

constexpr std::string_view kInstruction = "A pass key is hidden in the text below. Remember it.\n";
constexpr std::string_view kQuestion = "What is the pass key?";
constexpr std::string_view kAnswerOpening = "The pass key is";
// Neutral, repetitive filler: the key is the only information in the text.
constexpr std::array<std::string_view, 5> kFiller{" The grass is green.", " The sky is blue.",
                                                  " The sun is yellow.", " Here we go.",
                                                  " There and back again."};
constexpr std::string_view kPlaceholder = "<<kvgate-passkey-task>>";

// Set apart by blank lines: in the repetitive filler the small model finds a
// key in its own paragraph far more reliably (2k tokens, depths 0.25 and
// 0.5: 4/4 against 2/4 inline).
std::string key_sentence(const std::string& passkey) {
  return "\n\nThe pass key is " + passkey + ". Remember it. " + passkey + " is the pass key.\n\n";
}

bool is_digits(std::string_view s, size_t n) {
  return s.size() == n &&
         std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

Result<PasskeyFormat> parse_passkey_format(std::string_view name) {
  if (name == "chat") return PasskeyFormat::kChat;
  if (name == "plain") return PasskeyFormat::kPlain;
  return invalid_argument("passkey format must be chat or plain, got '" + std::string(name) + "'");
}

const char* passkey_format_name(PasskeyFormat format) {
  return format == PasskeyFormat::kChat ? "chat" : "plain";
}

Result<PasskeyGenerator> PasskeyGenerator::create(const Tokenizer& tokenizer,
                                                  PasskeyFormat format) {
  PasskeyGenerator g;
  g.tokenizer_ = &tokenizer;
  std::string head, tail;
  if (format == PasskeyFormat::kChat) {
    // Render the template around a placeholder user message and cut there,
    // so the task text itself is tokenized without special-token parsing.
    const ChatMessage user{"user", std::string(kPlaceholder)};
    KVGATE_ASSIGN_OR_RETURN(std::string rendered,
                            apply_chat_template(tokenizer, std::span(&user, 1), true));
    const size_t at = rendered.find(kPlaceholder);
    if (at == std::string::npos) return internal_error("chat template dropped the user message");
    g.head_ =
        tokenizer.encode(rendered.substr(0, at), /*add_special=*/true, /*parse_special=*/true);
    auto instr = tokenizer.encode(kInstruction, false, false);
    g.head_.insert(g.head_.end(), instr.begin(), instr.end());
    g.tail_ = tokenizer.encode("\n\n" + std::string(kQuestion), false, false);
    auto end_turn = tokenizer.encode(rendered.substr(at + kPlaceholder.size()), false, true);
    auto opening = tokenizer.encode(kAnswerOpening, false, false);
    g.tail_.insert(g.tail_.end(), end_turn.begin(), end_turn.end());
    g.tail_.insert(g.tail_.end(), opening.begin(), opening.end());
  } else {
    g.head_ = tokenizer.encode(kInstruction, /*add_special=*/true, false);
    g.tail_ = tokenizer.encode("\n\n" + std::string(kQuestion) + " " + std::string(kAnswerOpening),
                               false, false);
  }
  for (std::string_view s : kFiller) g.filler_.push_back(tokenizer.encode(s, false, false));
  return g;
}

int64_t PasskeyGenerator::fixed_tokens() const {
  // The key sentence measured with a probe key (the pre-tokenizer splits
  // numbers into digits, so every 5-digit key takes the same tokens).
  const std::string probe = "00000";
  return static_cast<int64_t>(head_.size() + tail_.size()) +
         static_cast<int64_t>(tokenizer_->encode(key_sentence(probe), false, false).size());
}

Result<PasskeyPrompt> PasskeyGenerator::make(int64_t length_tokens, double depth,
                                             const std::string& passkey) const {
  if (!(depth >= 0.0 && depth <= 1.0)) {
    return invalid_argument("depth must be in [0, 1], got " + std::to_string(depth));
  }
  if (!is_digits(passkey, 5))
    return invalid_argument("passkey must be 5 digits, got '" + passkey + "'");
  const auto key = tokenizer_->encode(key_sentence(passkey), false, false);
  const auto head = static_cast<int64_t>(head_.size());
  const auto fixed = head + static_cast<int64_t>(key.size() + tail_.size());
  if (length_tokens < fixed + 1) {
    return invalid_argument("passkey length " + std::to_string(length_tokens) +
                            " is too short: the task alone takes " + std::to_string(fixed) +
                            " tokens");
  }
  const int64_t filler = length_tokens - fixed;
  // Key at depth · length, kept between the instruction and the question.
  const int64_t want_before = std::clamp<int64_t>(
      std::llround(depth * static_cast<double>(length_tokens)) - head, 0, filler);

  PasskeyPrompt p;
  p.passkey = passkey;
  p.depth = depth;
  p.tokens.reserve(length_tokens);
  p.tokens.insert(p.tokens.end(), head_.begin(), head_.end());
  // Whole filler sentences while that brings the key closer to its target.
  size_t next = 0;
  int64_t before = 0;
  while (true) {
    const auto len = static_cast<int64_t>(filler_[next].size());
    if (before + len > filler ||
        std::llabs(before + len - want_before) >= std::llabs(before - want_before)) {
      break;
    }
    p.tokens.insert(p.tokens.end(), filler_[next].begin(), filler_[next].end());
    before += len;
    next = (next + 1) % filler_.size();
  }
  // The rest of the filler, its last sentence cut to make the length exact:
  // after the key, or all before it when the key goes right before the question.
  auto add_filler = [&](int64_t n_tokens) {
    while (n_tokens > 0) {
      const auto& s = filler_[next];
      const auto take = std::min<int64_t>(n_tokens, static_cast<int64_t>(s.size()));
      p.tokens.insert(p.tokens.end(), s.begin(), s.begin() + take);
      n_tokens -= take;
      next = (next + 1) % filler_.size();
    }
  };
  if (want_before == filler) {
    add_filler(filler - before);
    before = filler;
  }
  p.key_position = static_cast<int64_t>(p.tokens.size());
  p.tokens.insert(p.tokens.end(), key.begin(), key.end());
  add_filler(filler - before);
  p.tokens.insert(p.tokens.end(), tail_.begin(), tail_.end());
  assert(static_cast<int64_t>(p.tokens.size()) == length_tokens);
  return p;
}

std::string PasskeyGenerator::random_passkey(std::mt19937_64& rng) {
  // Drawn from the raw engine output so every standard library gives the same keys.
  return std::to_string(10000 + static_cast<int64_t>(rng() % 90000));
}

bool passkey_found(std::string_view answer, std::string_view passkey) {
  if (passkey.empty()) return false;
  auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
  for (size_t at = answer.find(passkey); at != std::string_view::npos;
       at = answer.find(passkey, at + 1)) {
    const bool left_ok = at == 0 || !is_digit(answer[at - 1]);
    const size_t end = at + passkey.size();
    const bool right_ok = end == answer.size() || !is_digit(answer[end]);
    if (left_ok && right_ok) return true;
  }
  return false;
}

Result<std::vector<PasskeyResult>> run_passkey(CpuForward& forward, const Tokenizer& tokenizer,
                                               const PasskeyOptions& options,
                                               const EvalProgressFn& progress) {
  const LlamaConfig& config = forward.model().config();
  if (options.lengths_tokens.empty()) return invalid_argument("lengths must not be empty");
  if (options.depths.empty()) return invalid_argument("depths must not be empty");
  if (options.trials < 1) return invalid_argument("trials must be >= 1");
  if (options.max_answer_tokens < 1) return invalid_argument("max_answer_tokens must be >= 1");
  for (double d : options.depths) {
    if (!(d >= 0.0 && d <= 1.0)) return invalid_argument("depths must be in [0, 1]");
  }
  KVGATE_ASSIGN_OR_RETURN(auto gen, PasskeyGenerator::create(tokenizer, options.format));
  for (int64_t len : options.lengths_tokens) {
    KVGATE_RETURN_IF_ERROR(check_context(config, len, "passkey length"));
    if (len <= gen.fixed_tokens()) {
      return invalid_argument("passkey length " + std::to_string(len) +
                              " is too short: the task takes " +
                              std::to_string(gen.fixed_tokens()) + " tokens");
    }
  }
  // Fail on a policy the model cannot run before any work.
  KVGATE_ASSIGN_OR_RETURN(auto plans, plan_all(config, options.policies));

  std::mt19937_64 rng(options.seed);
  std::vector<PasskeyResult> res(plans.size());
  for (size_t p = 0; p < plans.size(); ++p) res[p].policy = info_of(*plans[p]);
  std::vector<float> prefill_logits(config.n_vocab), logits(config.n_vocab);
  std::vector<int32_t> answer;
  for (int64_t len : options.lengths_tokens) {
    const int64_t per_length = static_cast<int64_t>(options.depths.size()) * options.trials;
    int64_t done = 0;
    if (progress) progress({"passkey", len, 0, per_length});
    for (double depth : options.depths) {
      std::vector<PasskeyCell> cells(plans.size());
      std::vector<std::vector<KvMeasure>> kv(plans.size());
      for (int64_t t = 0; t < options.trials; ++t) {
        KVGATE_ASSIGN_OR_RETURN(auto prompt,
                                gen.make(len, depth, PasskeyGenerator::random_passkey(rng)));
        // The answer's few positions may run past the training context by
        // at most max_answer_tokens; RoPE has no hard limit there.
        double prefill_seconds = 0.0;
        KVGATE_ASSIGN_OR_RETURN(
            auto seqs, prefill_for_policies(forward, plans, prompt.tokens,
                                            len + options.max_answer_tokens, prefill_logits,
                                            &prefill_seconds));
        for (size_t p = 0; p < plans.size(); ++p) {
          PolicySequence& seq = *seqs[p];
          res[p].prefill_seconds += prefill_seconds;
          res[p].compress_seconds += seq.compress_seconds();
          kv[p].push_back(measure(seq));
          logits = prefill_logits;
          const auto t1 = Clock::now();
          answer.clear();
          std::string text;
          for (int32_t k = 0; k < options.max_answer_tokens; ++k) {
            const int32_t tok = argmax(logits);
            if (tokenizer.is_eog(tok)) break;
            answer.push_back(tok);
            text = tokenizer.decode(answer);
            const size_t nl = text.find('\n');
            if (nl != std::string::npos && text.find_first_not_of(" \n") < nl) break;
            if (k + 1 < options.max_answer_tokens) KVGATE_RETURN_IF_ERROR(seq.decode(tok, logits));
          }
          res[p].decode_seconds += seconds_since(t1);
          seqs[p].reset();
          const bool ok = passkey_found(text, prompt.passkey);
          cells[p].trials += 1;
          cells[p].correct += ok ? 1 : 0;
          res[p].samples.push_back({len, depth, prompt.passkey, text, ok});
        }
        if (progress) progress({"passkey", len, ++done, per_length});
      }
      for (size_t p = 0; p < plans.size(); ++p) {
        cells[p].length_tokens = len;
        cells[p].depth = depth;
        cells[p].kv = mean_measure(kv[p]);
        res[p].cells.push_back(cells[p]);
      }
    }
  }
  return res;
}

}  // namespace kvgate::engine
