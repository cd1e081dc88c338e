// KV compression policies (DESIGN.md §4): which layout a request's cache
// takes and which tokens keep their K/V when they leave the window.
//
// All policies share kvstore's compressed layout so they compare fairly:
//   dense   every block of size 1, every flag 1 (exactly dense attention)
//   window  sinks + window only, every distant token dropped (StreamingLLM)
//   pod     layers grouped into blocks sharing the base layer's key, every
//           distant token kept (no eviction)
//   h2o, snapkv, gate, gate+pod: need attention statistics or a calibrated
//           gate side file; not available yet (UNIMPLEMENTED).
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

  // The error names the field.
  Status validate() const;
};

// The cache layout a policy gives a request of this model.
Result<kvstore::KvLayout> make_kv_layout(const LlamaConfig& config, const KvPolicyConfig& policy);

// Keep flags for tokens [first, first + n) of a request, one per (block,
// head) slot: flags[slot * n + j]. Token-local policies need nothing else.
Status policy_flags(const KvPolicyConfig& policy, const kvstore::KvLayout& layout, int64_t first,
                    int64_t n, std::vector<uint8_t>& flags);

}  // namespace kvgate::engine
