// KV compression policies (DESIGN.md §4): which layout a request's cache
// takes and which tokens keep their K/V when they leave the window.
//
// All policies share kvstore's compressed layout so they compare fairly:
//   dense   every block of size 1, every flag 1 (exactly dense attention)
//   window  sinks + window only, every distant token dropped (StreamingLLM)
//   pod     layers grouped into blocks sharing the base layer's key, every
//           distant token kept (no eviction)
//   h2o     keeps the distant prompt tokens that received the most attention
//           from all prompt queries (heavy hitters), keep_rate of them per
//           (layer, head); tokens generated later are kept (flags are decided
//           once, when a token is created, so the dynamic re-ranking of the
//           original H2O is not possible in this layout)
//   snapkv  the same ranking from the attention of the last
//           snapkv_observe_tokens prompt queries, max-pooled over 7 tokens
//   gate, gate+pod: need a calibrated gate side file; not available yet.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "engine/model.h"
#include "kvstore/layout.h"

namespace kvgate::engine {

enum class KvPolicy { kDense, kWindow, kPod, kH2o, kSnapKv, kGate, kGatePod };

Result<KvPolicy> parse_kv_policy(std::string_view name);
const char* kv_policy_name(KvPolicy policy);

struct KvPolicyConfig {
  KvPolicy policy = KvPolicy::kDense;
  int64_t n_sink_tokens = 4;
  int64_t n_window_tokens = 256;
  int64_t pod_group_layers = 2;  // layers per block for `pod` without a calibrated map
  double keep_rate = 0.3;        // h2o, snapkv: share of distant prompt tokens kept
  int64_t snapkv_observe_tokens = 32;

  // The error names the field.
  Status validate() const;
};

// The cache layout a policy gives a request of this model.
Result<kvstore::KvLayout> make_kv_layout(const LlamaConfig& config, const KvPolicyConfig& policy);

// True if the policy ranks prompt tokens by attention (needs AttentionStats
// from the prefill).
bool policy_needs_stats(const KvPolicyConfig& policy);

// Keep flags for tokens [first, first + n) of a request, one per (block,
// head) slot: flags[slot * n + j]. Policies that rank by attention need the
// prefill's `stats` for prompt tokens (positions < stats->n_tokens).
Status policy_flags(const KvPolicyConfig& policy, const kvstore::KvLayout& layout, int64_t first,
                    int64_t n, std::vector<uint8_t>& flags, const AttentionStats* stats = nullptr);

}  // namespace kvgate::engine
