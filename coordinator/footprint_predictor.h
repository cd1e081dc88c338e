// FootprintPredictor: the bytes a request's compressed KV cache will take on
// a decode node, predicted before prefill, for placement (DESIGN.md §7,
// docs/cluster.md step 1).
//
// The prediction is kvstore::predict_capacity_bytes — page-granular, at the
// request's final length prompt + max_tokens, on the policy's layout — with
// a keep-rate chosen here:
//
//   policy              keep-rate used                          exact?
//   dense, pod          1 (every distant token is kept)          yes
//   window              0 (every distant token is dropped)       yes
//   any, budget mode    none: per-slot budget form               yes
//   h2o, snapkv         running keep-rate of the prompt's length  no
//                       bucket for the distant prompt tokens;
//                       generated tokens are always kept (their
//                       flags are decided at creation, see
//                       engine/kv_policy.h), so the rate applied
//                       to all distant tokens is the mix
//   gate, gate+pod      running keep-rate of the bucket (the     no
//                       gate decides generated tokens too)
//
// Running keep-rate: one per power-of-two bucket of prompt length (bucket
// k holds prompts of [2^k, 2^(k+1)) tokens), starting from the policy's
// configured keep_rate (h2o, snapkv) or the gate file's calibration target
// (gate, gate+pod: the thresholds were fitted to keep that share on the
// calibration text). Each Commit's keep_rate updates its bucket with weight
// max(1/(n+2), ewma_alpha) after n earlier observations: the prior counts
// as one observation, the first observations average, and after about
// 1/alpha of them it becomes an EWMA that follows drift in the traffic.
// A bucket without observations uses the prior — not a neighbour's rate,
// since the keep-rate of a gate depends on the length (more distant tokens,
// different attention).
//
// Under-prediction is not fatal: the prefill node asks the decode node to
// extend the lease (docs/cluster.md step 4); over-prediction only costs
// placement headroom.
//
// Threading: not thread-safe (owned by the cluster scheduler).
#pragma once

#include <array>
#include <cstdint>

#include "common/status.h"
#include "engine/kv_policy.h"
#include "engine/policy_cache.h"
#include "kvstore/layout.h"

namespace kvgate::coordinator {

struct FootprintPrediction {
  int64_t capacity_bytes = 0;         // page-granular, at prompt + max_new (reserve this)
  int64_t prompt_capacity_bytes = 0;  // the same at the prompt's length (compare with Commit)
  int64_t dense_prompt_bytes = 0;     // a dense fp16 cache of the prompt
  double keep_rate = 1.0;             // the distant-token keep-rate applied
  bool exact = false;                 // no estimate involved (see the table)
  int bucket = 0;
};

class FootprintPredictor {
 public:
  static constexpr int kBuckets = 32;  // prompts up to 2^32 tokens

  // `plan`: the policy as resolved for the model (its layout); page_tokens:
  // decode.page_tokens (page_bytes = page_tokens · head_dim · 2). Errors:
  // page_tokens < 1, ewma_alpha not in (0, 1], a layout kvstore refuses.
  static Result<FootprintPredictor> create(const engine::PolicyPlan& plan, int64_t page_tokens,
                                           double ewma_alpha = 0.1);

  // For a prompt of prompt_tokens (>= 1) and up to max_new_tokens (>= 0).
  Result<FootprintPrediction> predict(int64_t prompt_tokens, int64_t max_new_tokens) const;

  // A Commit's keep_rate for a prompt of prompt_tokens. INVALID_ARGUMENT
  // (and no update) for a rate outside [0, 1] or not finite, or a prompt
  // length < 1: it came from a peer.
  Status observe(int64_t prompt_tokens, double keep_rate);

  // The running keep-rate of the prompt's bucket (the prior before any
  // observation).
  double bucket_keep_rate(int64_t prompt_tokens) const;
  int64_t bucket_observations(int64_t prompt_tokens) const;
  static int bucket_index(int64_t prompt_tokens);

  const kvstore::KvLayout& layout() const { return layout_; }
  int64_t page_bytes() const { return page_bytes_; }
  double prior_keep_rate() const { return prior_; }
  bool budget_mode() const { return budget_tokens_ > 0; }
  engine::KvPolicy policy() const { return policy_; }

 private:
  struct Bucket {
    double keep_rate = 1.0;
    int64_t observations = 0;
  };
  FootprintPredictor() = default;
  // The rate applied to all distant tokens at the final length.
  double effective_rate(double prompt_rate, int64_t prompt_tokens, int64_t final_tokens) const;

  kvstore::KvLayout layout_;
  engine::KvPolicy policy_ = engine::KvPolicy::kDense;
  int64_t page_bytes_ = 0;
  int64_t budget_tokens_ = 0;    // > 0: budget mode (exact)
  bool fixed_rate_ = false;      // dense, pod, window: the rate is the policy's
  bool generated_kept_ = false;  // h2o, snapkv: tokens after the prompt are kept
  double prior_ = 1.0;
  double ewma_alpha_ = 0.1;
  std::array<Bucket, kBuckets> buckets_{};
};

}  // namespace kvgate::coordinator
