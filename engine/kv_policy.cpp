#include "engine/kv_policy.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvgate::engine {

namespace {
struct PolicyName {
  KvPolicy policy;
  const char* name;
};
constexpr PolicyName kPolicies[] = {
    {KvPolicy::kDense, "dense"}, {KvPolicy::kWindow, "window"}, {KvPolicy::kPod, "pod"},
    {KvPolicy::kH2o, "h2o"},     {KvPolicy::kSnapKv, "snapkv"}, {KvPolicy::kGate, "gate"},
    {KvPolicy::kGatePod, "gate+pod"},
};
}  // namespace

Result<KvPolicy> parse_kv_policy(std::string_view name) {
  for (const auto& p : kPolicies) {
    if (name == p.name) return p.policy;
  }
  return invalid_argument("unknown KV policy '" + std::string(name) +
                          "' (known: dense, window, pod, h2o, snapkv, gate, gate+pod)");
}

const char* kv_policy_name(KvPolicy policy) {
  for (const auto& p : kPolicies) {
    if (p.policy == policy) return p.name;
  }
  return "unknown";
}

Status KvPolicyConfig::validate() const {
  if (n_sink_tokens < 0) return invalid_argument("n_sink must be >= 0");
  if (n_window_tokens < 1) return invalid_argument("n_window must be >= 1");
  if (pod_group_layers < 1) return invalid_argument("pod_group_layers must be >= 1");
  if (!(keep_rate >= 0.0 && keep_rate <= 1.0)) return invalid_argument("keep_rate must be in [0, 1]");
  if (snapkv_observe_tokens < 1) return invalid_argument("snapkv_observe_tokens must be >= 1");
  return Status();
}

Result<kvstore::KvLayout> make_kv_layout(const LlamaConfig& config, const KvPolicyConfig& policy) {
  KVGATE_RETURN_IF_ERROR(policy.validate());
  kvstore::KvLayout layout;
  switch (policy.policy) {
    case KvPolicy::kDense:
    case KvPolicy::kWindow:
    case KvPolicy::kH2o:
    case KvPolicy::kSnapKv: {
      KVGATE_ASSIGN_OR_RETURN(layout.blocks, kvstore::BlockMap::dense(config.n_layers, config.n_kv_heads));
      break;
    }
    case KvPolicy::kPod: {
      KVGATE_ASSIGN_OR_RETURN(layout.blocks, kvstore::BlockMap::uniform(config.n_layers, config.n_kv_heads,
                                                                        policy.pod_group_layers));
      break;
    }
    default:
      return unimplemented(std::string("KV policy '") + kv_policy_name(policy.policy) +
                           "' is not available yet (available: dense, window, pod, h2o, snapkv)");
  }
  layout.head_dim = config.head_dim;
  layout.n_sink_tokens = policy.n_sink_tokens;
  layout.n_window_tokens = policy.n_window_tokens;
  KVGATE_RETURN_IF_ERROR(kvstore::validate_layout(layout));
  return layout;
}

bool policy_needs_stats(const KvPolicyConfig& policy) {
  return policy.policy == KvPolicy::kH2o || policy.policy == KvPolicy::kSnapKv;
}

namespace {

// Flags of prompt tokens for a ranking policy: per slot, the top keep_rate
// of the tokens distant at the end of the prompt by score; sinks and the
// final window get 1 (sinks never leave; the window's tokens are the
// observation itself and are kept when they age out).
void ranked_flags(const KvPolicyConfig& policy, const kvstore::KvLayout& layout,
                  const AttentionStats& stats, int64_t first, int64_t n, std::vector<uint8_t>& flags) {
  const auto& map = layout.blocks;
  const int64_t n_slots = map.n_slots();
  const int64_t t = stats.n_tokens;
  const int64_t lo = std::min(layout.n_sink_tokens, t);
  const int64_t hi = std::max(lo, t - layout.n_window_tokens);
  std::vector<float> score(t);
  std::vector<int64_t> order;
  std::vector<uint8_t> keep(t);
  for (int64_t s = 0; s < n_slots; ++s) {
    const int64_t h = map.slot_head(s);
    const auto block = map.slot_block(s);
    std::fill(score.begin(), score.end(), 0.0f);
    for (int64_t l = block.first_layer; l < block.first_layer + block.n_layers; ++l) {
      const float* row = policy.policy == KvPolicy::kH2o ? stats.received_row(l, h) : stats.observed_row(l, h);
      if (policy.policy == KvPolicy::kSnapKv) {
        // Max-pool over 7 neighbours: keeps the context of a selected token.
        for (int64_t j = 0; j < t; ++j) {
          float m = 0.0f;
          for (int64_t k = std::max<int64_t>(0, j - 3); k <= std::min(t - 1, j + 3); ++k) m = std::max(m, row[k]);
          score[j] += m;
        }
      } else {
        for (int64_t j = 0; j < t; ++j) score[j] += row[j];
      }
    }
    std::fill(keep.begin(), keep.end(), 1);
    const int64_t candidates = hi - lo;
    const auto n_keep = static_cast<int64_t>(std::ceil(policy.keep_rate * static_cast<double>(candidates) - 1e-9));
    order.resize(candidates);
    std::iota(order.begin(), order.end(), lo);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
    for (int64_t i = n_keep; i < candidates; ++i) keep[order[i]] = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = first + j;
      flags[s * n + j] = pos < t ? keep[pos] : 1;
    }
  }
}

}  // namespace

Status policy_flags(const KvPolicyConfig& policy, const kvstore::KvLayout& layout, int64_t first,
                    int64_t n, std::vector<uint8_t>& flags, const AttentionStats* stats) {
  const int64_t n_slots = layout.blocks.n_slots();
  uint8_t keep;
  switch (policy.policy) {
    case KvPolicy::kDense:
    case KvPolicy::kPod:
      keep = 1;
      break;
    case KvPolicy::kWindow:
      keep = 0;
      break;
    case KvPolicy::kH2o:
    case KvPolicy::kSnapKv:
      flags.assign(static_cast<size_t>(n_slots * n), 1);
      if (stats == nullptr || first >= (stats ? stats->n_tokens : 0)) {
        if (stats == nullptr && first == 0) {
          return failed_precondition(std::string("KV policy '") + kv_policy_name(policy.policy) +
                                     "' needs the prefill's attention statistics");
        }
        return Status();  // generated tokens are kept
      }
      ranked_flags(policy, layout, *stats, first, n, flags);
      return Status();
    default:
      return unimplemented(std::string("KV policy '") + kv_policy_name(policy.policy) +
                           "' has no flags yet");
  }
  flags.assign(static_cast<size_t>(n_slots * n), keep);
  return Status();
}

}  // namespace kvgate::engine
