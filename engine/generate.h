// Single-sequence text generation on top of CpuForward: prefill, then decode
// with sampling, stop strings, EOS and a token limit. Used by
// `kvgate generate` and by the reference tests.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "engine/kv_policy.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"

namespace kvgate::engine {

struct GenerateOptions {
  int32_t max_tokens = 128;
  SamplingParams sampling;
  bool ignore_eos = false;
  std::vector<std::string> stop;  // stop strings; not included in the text
  // KV cache policy: prefill always runs full attention; other policies
  // than dense then compress the cache and decode over the compressed one
  // (engine/policy_cache.h). gate and gate+pod need kv_policy.gate.
  KvPolicyConfig kv_policy;
};

struct GenerateResult {
  std::vector<int32_t> tokens;   // generated ids (a stop string's tokens included)
  std::string text;              // completion text (cut before a stop string)
  int64_t prompt_tokens = 0;
  std::string finish_reason;     // "stop" (EOS or stop string) or "length"
  double prefill_seconds = 0.0;  // the full-attention prefill
  double compress_seconds = 0.0; // building the policy's cache from the prefill (0 for dense)
  double decode_seconds = 0.0;   // time for tokens after the first
  int64_t kv_dense_bytes = 0;    // what a dense fp16 cache of the final length holds
  int64_t kv_bytes = 0;          // what the policy's cache holds (DESIGN.md §4 formula)
  double keep_rate = 1.0;        // retained / distant tokens over all slots at the end
};

// Streams text as it becomes safe to emit (complete UTF-8, not a possible
// stop-string prefix). `on_text` may be empty.
Result<GenerateResult> generate(CpuForward& forward, const Tokenizer& tokenizer,
                                std::span<const int32_t> prompt, const GenerateOptions& options,
                                const std::function<void(std::string_view)>& on_text = {});

}  // namespace kvgate::engine
