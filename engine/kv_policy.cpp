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
constexpr KvPolicy kAllPolicies[] = {KvPolicy::kDense, KvPolicy::kWindow, KvPolicy::kPod,
                                     KvPolicy::kH2o,   KvPolicy::kSnapKv, KvPolicy::kGate,
                                     KvPolicy::kGatePod};

Status gate_matches(const LlamaConfig& config, const GateModel& gate) {
  if (gate.blocks.n_layers() != config.n_layers || gate.blocks.n_kv_heads() != config.n_kv_heads) {
    return failed_precondition("the gate model's block map (" +
                               std::to_string(gate.blocks.n_layers()) + " layers, " +
                               std::to_string(gate.blocks.n_kv_heads()) +
                               " kv heads) does not fit this model (" +
                               std::to_string(config.n_layers) + " layers, " +
                               std::to_string(config.n_kv_heads) + " kv heads)");
  }
  return Status();
}

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

std::span<const KvPolicy> all_kv_policies() {
  return kAllPolicies;
}

int64_t KvPolicyConfig::sink_tokens() const {
  if (n_sink_tokens) return *n_sink_tokens;
  return gate ? gate->n_sink_tokens : kDefaultSinkTokens;
}

int64_t KvPolicyConfig::window_tokens() const {
  if (n_window_tokens) return *n_window_tokens;
  return gate ? gate->n_window_tokens : kDefaultWindowTokens;
}

GateDecision KvPolicyConfig::effective_gate_decision() const {
  GateDecision d = gate_decision;
  d.retained_budget_tokens = budget_tokens;
  return d;
}

Status KvPolicyConfig::validate() const {
  if (sink_tokens() < 0) return invalid_argument("n_sink must be >= 0");
  if (window_tokens() < 1) return invalid_argument("n_window must be >= 1");
  if (pod_group_layers && *pod_group_layers < 1) {
    return invalid_argument("pod_group_layers must be >= 1");
  }
  if (!(keep_rate >= 0.0 && keep_rate <= 1.0)) return invalid_argument("keep_rate must be in [0, 1]");
  if (budget_tokens < 0) return invalid_argument("budget_tokens must be >= 0");
  if (snapkv_observe_tokens < 1) return invalid_argument("snapkv_observe_tokens must be >= 1");
  if (!std::isfinite(gate_decision.threshold_offset)) {
    return invalid_argument("gate threshold_offset must be finite");
  }
  if (gate_decision.retained_budget_tokens != 0 &&
      gate_decision.retained_budget_tokens != budget_tokens) {
    return invalid_argument(
        "gate_decision.retained_budget_tokens must not be set: the budget is budget_tokens");
  }
  return Status();
}

Result<kvstore::KvLayout> make_kv_layout(const LlamaConfig& config, const KvPolicyConfig& policy) {
  KVGATE_RETURN_IF_ERROR(policy.validate());
  if (policy.gate) KVGATE_RETURN_IF_ERROR(gate_matches(config, *policy.gate));
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
      if (policy.gate && !policy.pod_group_layers) {
        layout.blocks = policy.gate->blocks;
      } else {
        KVGATE_ASSIGN_OR_RETURN(
            layout.blocks,
            kvstore::BlockMap::uniform(config.n_layers, config.n_kv_heads,
                                       policy.pod_group_layers.value_or(kDefaultPodGroupLayers)));
      }
      break;
    }
    case KvPolicy::kGate:
    case KvPolicy::kGatePod: {
      if (!policy.gate) {
        return failed_precondition(std::string("KV policy '") + kv_policy_name(policy.policy) +
                                   "' needs a calibrated gate side file: MODEL.gate.gguf next to "
                                   "the model (`kvgate calibrate`, as scripts/calibrate.sh runs "
                                   "it), kv.gate_file in the config, or --gate FILE; or choose "
                                   "another policy");
      }
      return make_gate_layout(config, *policy.gate, policy.policy == KvPolicy::kGatePod,
                              policy.sink_tokens(), policy.window_tokens());
    }
  }
  layout.head_dim = config.head_dim;
  layout.n_sink_tokens = policy.sink_tokens();
  layout.n_window_tokens = policy.window_tokens();
  KVGATE_RETURN_IF_ERROR(kvstore::validate_layout(layout));
  return layout;
}

std::string kv_policy_blocks(const KvPolicyConfig& policy) {
  switch (policy.policy) {
    case KvPolicy::kPod:
      if (policy.gate && !policy.pod_group_layers) return "calibrated";
      return "uniform-" + std::to_string(policy.pod_group_layers.value_or(kDefaultPodGroupLayers));
    case KvPolicy::kGatePod:
      return "calibrated";
    default:
      return "single-layer";
  }
}

bool policy_needs_stats(const KvPolicyConfig& policy) {
  return policy.policy == KvPolicy::kH2o || policy.policy == KvPolicy::kSnapKv;
}

bool policy_uses_gate(const KvPolicyConfig& policy) {
  return policy.policy == KvPolicy::kGate || policy.policy == KvPolicy::kGatePod;
}

namespace {

// Flags of a ranking policy. Per slot, the tokens distant at the end of the
// prompt, [lo, hi), are ranked by score and the top n_keep get 1: keep_rate
// of them, or min(budget, candidates) in budget mode. Sinks get 1 (they
// never leave). Later tokens (the prompt's final window, which is the
// observation itself, and generated tokens) get 1; in budget mode only while
// the slot's budget is not used up: the k-th later token that can become
// distant is kept iff n_keep + k < budget. So a slot retains exactly
// min(budget, distant tokens) at any length — the budget form of
// kvstore::predict_footprint — and flags stay a pure function of the
// position (no state between calls).
void ranked_flags(const KvPolicyConfig& policy, const kvstore::KvLayout& layout,
                  const AttentionStats& stats, int64_t first, int64_t n, std::vector<uint8_t>& flags,
                  std::span<const int64_t> only_slots) {
  const auto& map = layout.blocks;
  const int64_t n_slots = map.n_slots();
  const int64_t t = stats.n_tokens;
  const int64_t lo = std::min(layout.n_sink_tokens, t);
  const int64_t hi = std::max(lo, t - layout.n_window_tokens);
  // First position of the later tokens that can become distant.
  const int64_t late_from = std::max(hi, layout.n_sink_tokens);
  const int64_t candidates = hi - lo;
  const int64_t budget = policy.budget_tokens;
  const int64_t n_keep =
      budget > 0 ? std::min(budget, candidates)
                 : static_cast<int64_t>(std::ceil(policy.keep_rate * static_cast<double>(candidates) - 1e-9));
  auto late_flag = [&](int64_t pos) -> uint8_t {
    if (budget <= 0 || pos < late_from) return 1;
    return n_keep + (pos - late_from) < budget ? 1 : 0;
  };
  const bool any_prompt = first < hi;
  std::vector<float> score(any_prompt ? t : 0);
  std::vector<int64_t> order;
  std::vector<uint8_t> keep(any_prompt ? t : 0);
  for (int64_t s = 0; s < n_slots; ++s) {
    if (!only_slots.empty() && std::find(only_slots.begin(), only_slots.end(), s) == only_slots.end()) {
      continue;
    }
    if (any_prompt) {
      const int64_t h = map.slot_head(s);
      const auto block = map.slot_block(s);
      std::fill(score.begin(), score.end(), 0.0f);
      for (int64_t l = block.first_layer; l < block.first_layer + block.n_layers; ++l) {
        const float* row =
            policy.policy == KvPolicy::kH2o ? stats.received_row(l, h) : stats.observed_row(l, h);
        if (policy.policy == KvPolicy::kSnapKv) {
          // Max-pool over 7 neighbours: keeps the context of a selected token.
          for (int64_t j = 0; j < t; ++j) {
            float m = 0.0f;
            for (int64_t k = std::max<int64_t>(0, j - 3); k <= std::min(t - 1, j + 3); ++k)
              m = std::max(m, row[k]);
            score[j] += m;
          }
        } else {
          for (int64_t j = 0; j < t; ++j) score[j] += row[j];
        }
      }
      std::fill(keep.begin(), keep.end(), 1);
      order.resize(candidates);
      std::iota(order.begin(), order.end(), lo);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return score[a] > score[b]; });
      for (int64_t i = n_keep; i < candidates; ++i) keep[order[i]] = 0;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = first + j;
      flags[s * n + j] = pos < hi ? keep[pos] : late_flag(pos);
    }
  }
}

}  // namespace

Status policy_flags(const KvPolicyConfig& policy, const kvstore::KvLayout& layout, int64_t first,
                    int64_t n, std::vector<uint8_t>& flags, const AttentionStats* stats,
                    std::span<const int64_t> only_slots) {
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
      if (stats == nullptr) {
        return failed_precondition(std::string("KV policy '") + kv_policy_name(policy.policy) +
                                   "' needs the prefill's attention statistics");
      }
      if (only_slots.empty() || flags.size() != static_cast<size_t>(n_slots * n)) {
        flags.assign(static_cast<size_t>(n_slots * n), 1);
      }
      ranked_flags(policy, layout, *stats, first, n, flags, only_slots);
      return Status();
    case KvPolicy::kGate:
    case KvPolicy::kGatePod:
    default:
      return failed_precondition(std::string("KV policy '") + kv_policy_name(policy.policy) +
                                 "' takes its flags from the gate runtime (engine/gate_runtime.h)");
  }
  flags.assign(static_cast<size_t>(n_slots * n), keep);
  return Status();
}

}  // namespace kvgate::engine
