// Quality evaluation of KV policies (DESIGN.md §9, issue 3 items 6 and 8):
// perplexity of real text scored through the decode path, and synthetic
// passkey retrieval at several lengths and depths.
//
// Every task runs a request's life as a server would: the context is
// prefilled with full attention, the policy compresses the cache, and then
// tokens go through the decode path one per step. Every task takes a list of
// policies and runs them all from ONE shared prefill per context or prompt
// (engine/policy_cache.h): the prefill is identical for every policy, only
// the compression differs, so a whole comparison costs one prefill plus one
// decode per policy. Results come back one per policy, in option order; a
// policy's numbers are bit-identical to a run of that policy alone.
//
// Threading: every function blocks and drives the CpuForward it is given,
// from the caller's thread (the owner of that CpuForward). Progress
// callbacks run on that thread too.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "engine/kv_policy.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

namespace kvgate::engine {

// ---------------------------------------------------------------- scoring

// -log softmax(logits)[target], in double: the logits are shifted by their
// maximum before exp, so any finite float logits give a finite result.
// Precondition: 0 <= target < logits.size() (callers check ids once).
double token_nll(std::span<const float> logits, int32_t target);

// exp(nll_mean).
double perplexity_from_nll(double nll_mean);

// ------------------------------------------------------------ policies

// Bytes of the dense fp16 cache of n_tokens tokens of this model.
int64_t eval_dense_bytes(const LlamaConfig& config, int64_t n_tokens);

// Progress of a long run, for a progress bar: `done` of `total` units of
// `what` ("scoring", "window", "passkey") at `length_tokens` (0 = n/a).
struct EvalProgress {
  std::string_view what;
  int64_t length_tokens = 0;
  int64_t done = 0;
  int64_t total = 0;
};
using EvalProgressFn = std::function<void(const EvalProgress&)>;

// ------------------------------------------------------------- perplexity

struct PerplexityOptions {
  // Scored from one shared prefill per window; at least one.
  std::vector<KvPolicyConfig> policies{KvPolicyConfig{}};
  int64_t context_tokens = 0;  // N: prefilled with full attention, then compressed
  int64_t score_tokens = 256;  // M: scored one decode step at a time
};

// How a policy ran: its name and the layout parameters it resolved to
// (engine/kv_policy.h: a gate model supplies unset sinks, window and blocks).
struct EvalPolicyInfo {
  std::string name;         // kv_policy_name()
  std::string blocks;       // kv_policy_blocks()
  int64_t n_sink_tokens = 0;
  int64_t n_window_tokens = 0;
  int64_t budget_tokens = 0;
  double target_keep_rate = 0.0;  // h2o, snapkv (keep_rate); 0 otherwise
};

// KV measured when the last scored token's logits were computed: the cache
// then holds N + M - 1 tokens.
struct KvMeasure {
  int64_t kv_dense_bytes = 0;
  int64_t kv_bytes = 0;
  double keep_rate = 1.0;
  double kv_saving() const {
    return kv_dense_bytes > 0 ? 1.0 - static_cast<double>(kv_bytes) / kv_dense_bytes : 0.0;
  }
};

struct PerplexityResult {
  EvalPolicyInfo policy;
  int64_t context_tokens = 0;
  int64_t score_tokens = 0;
  double nll_mean = 0.0;
  double perplexity = 0.0;
  KvMeasure kv;
  double prefill_seconds = 0.0;   // the shared prefill (the same for every policy of a run)
  double compress_seconds = 0.0;  // this policy's cache built from the prefill
  double decode_seconds = 0.0;    // the M - 1 decode steps
  std::vector<double> token_nll;  // NLL of each scored token, in order
};

// Prefills tokens[0, N) once, then for each policy scores tokens[N, N + M)
// teacher-forced: the logits that predict token N come from the prefill,
// each later one from decoding the previous true token over the policy's
// cache. One result per policy, in option order. Errors: N < 1 or M < 1
// (INVALID_ARGUMENT), fewer than N + M tokens (INVALID_ARGUMENT), N + M past
// the model's training context (OUT_OF_RANGE), a token id outside the
// vocabulary (INVALID_ARGUMENT), no policy (INVALID_ARGUMENT), a policy the
// model cannot run (make_kv_layout's errors, before any work).
Result<std::vector<PerplexityResult>> score_perplexity(CpuForward& forward, std::span<const int32_t> tokens,
                                          const PerplexityOptions& options,
                                          const EvalProgressFn& progress = {});

// A window of N + M tokens at `start` of document `document`.
struct EvalWindow {
  int64_t document = 0;
  int64_t start = 0;
};

// n_windows non-overlapping windows of window_tokens, none crossing a
// document boundary, spread evenly over the corpus: the candidate slots are
// every document cut into consecutive windows from its start, and window i
// takes candidate floor((i + 0.5) · C / n_windows). Deterministic.
// INVALID_ARGUMENT when fewer than n_windows candidates exist.
Result<std::vector<EvalWindow>> plan_windows(std::span<const int64_t> document_tokens,
                                             int64_t window_tokens, int64_t n_windows);

struct CorpusPerplexityResult {
  PerplexityResult total;                 // over every scored token of every window
  std::vector<double> window_perplexity;  // per window, in plan order
  std::vector<EvalWindow> windows;
};

// score_perplexity over n_windows windows of `documents` (one shared
// prefill per window); per policy, the NLL is averaged over all scored
// tokens, the KV measure over windows. One result per policy.
//
// The windows are aligned so that every context length scores the same
// text: plan_windows() cuts the corpus into slots of slot_tokens (>= N + M;
// the model's context, 8192, in kvgate eval), and each window ends where its
// slot ends: tokens [slot_end - M, slot_end) are scored after a context of
// the N tokens before them. So runs with different N (or policies) with the
// same M, slot and W score identical tokens, and only the context differs.
// `windows` in the result holds each window's own start (slot_end - N - M).
Result<std::vector<CorpusPerplexityResult>> score_corpus_perplexity(
    CpuForward& forward, std::span<const std::vector<int32_t>> documents,
    const PerplexityOptions& options, int64_t n_windows, int64_t slot_tokens,
    const EvalProgressFn& progress = {});

// ---------------------------------------------------------------- passkey

enum class PasskeyFormat {
  kChat,   // the model's chat template: the task as a user turn, the answer's
           // opening ("The pass key is") as the start of the assistant turn
  kPlain,  // plain completion text ending with "The pass key is"
};
Result<PasskeyFormat> parse_passkey_format(std::string_view name);
const char* passkey_format_name(PasskeyFormat format);

struct PasskeyPrompt {
  std::vector<int32_t> tokens;  // exactly the requested length
  std::string passkey;          // 5 digits
  int64_t key_position = 0;     // index of the first token of the key sentence
  double depth = 0.0;
};

// Builds passkey prompts: an instruction, filler sentences, the key sentence
// ("The pass key is NNNNN. Remember it."), the filler resumed, and the
// question. Built from token ids of fixed pieces, so the length is exact:
// the key sentence starts at the filler-sentence boundary nearest to token
// depth · length, clamped between the instruction and the question (so
// depth 0 puts it right after the instruction, depth 1 right before the
// question), and the last filler sentence is cut to make the length exact.
// Immutable; thread-safe.
class PasskeyGenerator {
 public:
  static Result<PasskeyGenerator> create(const Tokenizer& tokenizer, PasskeyFormat format);

  // INVALID_ARGUMENT for depth outside [0, 1], a passkey not of 5 digits, or
  // a length too short to hold the instruction, key and question.
  Result<PasskeyPrompt> make(int64_t length_tokens, double depth, const std::string& passkey) const;

  // Tokens that are not filler (instruction + key sentence + question), and
  // those before the filler (chat header + instruction).
  int64_t fixed_tokens() const;
  int64_t head_tokens() const { return static_cast<int64_t>(head_.size()); }

  // A uniformly random 5-digit number, 10000..99999.
  static std::string random_passkey(std::mt19937_64& rng);

 private:
  PasskeyGenerator() = default;
  std::vector<int32_t> head_, tail_;
  std::vector<std::vector<int32_t>> filler_;  // sentences, cycled
  const Tokenizer* tokenizer_ = nullptr;      // not owned; outlives the generator
};

// True when `passkey` appears in `answer` as a whole number (not inside a
// longer run of digits).
bool passkey_found(std::string_view answer, std::string_view passkey);

struct PasskeyOptions {
  // Every prompt is prefilled once and answered by each policy.
  std::vector<KvPolicyConfig> policies{KvPolicyConfig{}};
  PasskeyFormat format = PasskeyFormat::kChat;
  std::vector<int64_t> lengths_tokens{1024, 2048, 4096, 8192};
  std::vector<double> depths{0.0, 0.25, 0.5, 0.75, 1.0};  // key position / length
  int64_t trials = 2;  // prompts per (length, depth), each with a fresh key
  uint64_t seed = 0;
  int32_t max_answer_tokens = 16;  // greedy answer length cap
};

struct PasskeyCell {
  int64_t length_tokens = 0;
  double depth = 0.0;
  int64_t trials = 0;
  int64_t correct = 0;
  KvMeasure kv;  // mean over the cell's trials, at the end of each answer's prompt
  double accuracy() const { return trials > 0 ? static_cast<double>(correct) / trials : 0.0; }
};

struct PasskeySample {
  int64_t length_tokens = 0;
  double depth = 0.0;
  std::string passkey;
  std::string answer;
  bool correct = false;
};

struct PasskeyResult {
  EvalPolicyInfo policy;
  std::vector<PasskeyCell> cells;      // lengths-major, then depths, in option order
  std::vector<PasskeySample> samples;  // every trial
  double prefill_seconds = 0.0;        // the shared prefills
  double compress_seconds = 0.0;
  double decode_seconds = 0.0;
};

// Runs every (length, depth, trial): a fresh key from a generator seeded
// with `seed` (so every policy sees the same prompts), one shared prefill,
// then per policy a greedy answer of up to max_answer_tokens (stopping at an
// end-of-generation token or a newline after some text), scored by
// passkey_found. One result per policy, in option order. Errors: bad
// options (INVALID_ARGUMENT naming the field), a length past the model's
// context (OUT_OF_RANGE), a policy the model cannot run, engine errors.
Result<std::vector<PasskeyResult>> run_passkey(CpuForward& forward, const Tokenizer& tokenizer,
                                  const PasskeyOptions& options,
                                  const EvalProgressFn& progress = {});

}  // namespace kvgate::engine
