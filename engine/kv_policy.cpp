#include "engine/kv_policy.h"

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
  return Status();
}

Result<kvstore::KvLayout> make_kv_layout(const LlamaConfig& config, const KvPolicyConfig& policy) {
  KVGATE_RETURN_IF_ERROR(policy.validate());
  kvstore::KvLayout layout;
  switch (policy.policy) {
    case KvPolicy::kDense:
    case KvPolicy::kWindow: {
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
                           "' is not available yet (available: dense, window, pod)");
  }
  layout.head_dim = config.head_dim;
  layout.n_sink_tokens = policy.n_sink_tokens;
  layout.n_window_tokens = policy.n_window_tokens;
  KVGATE_RETURN_IF_ERROR(kvstore::validate_layout(layout));
  return layout;
}

Status policy_flags(const KvPolicyConfig& policy, const kvstore::KvLayout& layout, int64_t first,
                    int64_t n, std::vector<uint8_t>& flags) {
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
    default:
      return unimplemented(std::string("KV policy '") + kv_policy_name(policy.policy) +
                           "' has no flags yet");
  }
  flags.assign(static_cast<size_t>(n_slots * n), keep);
  return Status();
}

}  // namespace kvgate::engine
