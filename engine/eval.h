// Quality evaluation of KV policies (DESIGN.md §9, issue 3 items 6 and 8):
// perplexity of real text scored through the decode path, and synthetic
// passkey retrieval at several lengths and depths.
//
// Every task runs a request's life as a server would: the context is
// prefilled with full attention, the policy compresses the cache, and then
// tokens go through the decode path one per step. The policy is reached only
// through EvalSequence; make_eval_sequence() is the one place where a policy
// plugs in (only `dense` today).
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

// ------------------------------------------------------------ policy hook

// One sequence under a KV policy. Owned and driven by one thread.
class EvalSequence {
 public:
  virtual ~EvalSequence() = default;
  // Full-attention prefill of `tokens` into an empty sequence, then the
  // policy's compression; next-token logits of the last token to `logits`.
  virtual Status prefill(std::span<const int32_t> tokens, std::span<float> logits) = 0;
  // One decode step: appends `token`, writes its next-token logits.
  virtual Status decode(int32_t token, std::span<float> logits) = 0;
  virtual int64_t n_tokens() const = 0;
  // Bytes the policy holds for the n_tokens() tokens now in the cache.
  virtual int64_t kv_bytes() const = 0;
  // Fraction of distant tokens whose K/V the policy keeps (1 for dense).
  virtual double keep_rate() const = 0;
};

// Policies kvgate eval can run today, in the order the error message names them.
std::span<const std::string_view> eval_policies();

// A sequence of at most capacity_tokens tokens under `policy`.
// INVALID_ARGUMENT naming the supported policies for any other name.
Result<std::unique_ptr<EvalSequence>> make_eval_sequence(CpuForward& forward,
                                                         std::string_view policy,
                                                         int64_t capacity_tokens);

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
  std::string policy = "dense";
  int64_t context_tokens = 0;  // N: prefilled with full attention, then compressed
  int64_t score_tokens = 256;  // M: scored one decode step at a time
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
  std::string policy;
  int64_t context_tokens = 0;
  int64_t score_tokens = 0;
  double nll_mean = 0.0;
  double perplexity = 0.0;
  KvMeasure kv;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;    // the M - 1 decode steps
  std::vector<double> token_nll;  // NLL of each scored token, in order
};

// Prefills tokens[0, N), then scores tokens[N, N + M) teacher-forced: the
// logits that predict token N come from the prefill, each later one from
// decoding the previous true token. Errors: N < 1 or M < 1
// (INVALID_ARGUMENT), fewer than N + M tokens (INVALID_ARGUMENT), N + M past
// the model's training context (OUT_OF_RANGE), a token id outside the
// vocabulary (INVALID_ARGUMENT).
Result<PerplexityResult> score_perplexity(CpuForward& forward, std::span<const int32_t> tokens,
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

// score_perplexity over n_windows windows of `documents`; the NLL is
// averaged over all scored tokens, the KV measure over windows.
//
// The windows are aligned so that every context length scores the same
// text: plan_windows() cuts the corpus into slots of slot_tokens (>= N + M;
// the model's context, 8192, in kvgate eval), and each window ends where its
// slot ends: tokens [slot_end - M, slot_end) are scored after a context of
// the N tokens before them. So runs with different N (or policies) with the
// same M, slot and W score identical tokens, and only the context differs.
// `windows` in the result holds each window's own start (slot_end - N - M).
Result<CorpusPerplexityResult> score_corpus_perplexity(
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
  std::string policy = "dense";
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
  std::vector<PasskeyCell> cells;      // lengths-major, then depths, in option order
  std::vector<PasskeySample> samples;  // every trial
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
};

// Runs every (length, depth, trial): a fresh key from a generator seeded
// with `seed`, a greedy answer of up to max_answer_tokens (stopping at an
// end-of-generation token or a newline after some text), scored by
// passkey_found. Errors: bad options (INVALID_ARGUMENT naming the field), a
// length past the model's context (OUT_OF_RANGE), engine errors.
Result<PasskeyResult> run_passkey(CpuForward& forward, const Tokenizer& tokenizer,
                                  const PasskeyOptions& options,
                                  const EvalProgressFn& progress = {});

}  // namespace kvgate::engine
