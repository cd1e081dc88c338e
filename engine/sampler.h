// Token sampling and stop conditions.
//
// A Sampler is owned by one sequence and used by the engine loop thread only.
// sample() does not allocate after the first call (the candidate buffer is
// kept), so it can run per token on the hot path.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kvgate::engine {

struct SamplingParams {
  float temperature = 0.0f;        // 0 = greedy (argmax, lowest id on ties)
  int32_t top_k = 0;               // 0 = off
  float top_p = 1.0f;              // 1 = off
  float min_p = 0.0f;              // 0 = off; keeps tokens with p >= min_p * p_max
  float repetition_penalty = 1.0f; // 1 = off; llama.cpp/CTRL rule over the last `repetition_window` tokens
  int32_t repetition_window = 64;
  uint64_t seed = 0;

  // Ranges: temperature >= 0, top_k >= 0, top_p in (0,1], min_p in [0,1],
  // repetition_penalty > 0, repetition_window >= 0. The message names the field.
  Status validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Picks the next token from `logits` (one per vocabulary entry) given the
  // tokens seen so far (prompt and generated) for the repetition penalty.
  int32_t sample(std::span<const float> logits, std::span<const int32_t> history);

  // Moves the random stream past `samples` earlier sample() calls made by
  // another Sampler with the same params (one draw each when sampling; none
  // for greedy), so a request continued elsewhere — the decode node after
  // the prefill node drew the first token — picks exactly what one process
  // would have.
  void advance(int64_t samples);

  const SamplingParams& params() const { return params_; }

 private:
  struct Candidate {
    int32_t id;
    float logit;
    float p;
  };
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<Candidate> cand_;
  std::vector<float> penalized_;
};

// Index of the largest value, lowest index on ties.
int32_t argmax(std::span<const float> logits);

// Detects stop strings in streamed text. feed() takes newly decoded text and
// returns the part that is safe to emit: text that cannot be the start of a
// stop string is released at once, a possible prefix is held back until it is
// resolved. After a stop string is seen, stopped() is true and nothing past it
// is ever returned.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  std::string feed(std::string_view text);
  // Releases whatever is held back (call at the end of generation).
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

}  // namespace kvgate::engine
