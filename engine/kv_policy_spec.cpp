#include "engine/kv_policy_spec.h"

#include <cmath>
#include <filesystem>
#include <set>

#include "engine/gate_file.h"

namespace kvgate::engine {

std::string default_gate_path(const std::string& model_path) {
  const std::string ext = ".gguf";
  if (model_path.size() >= ext.size() &&
      model_path.compare(model_path.size() - ext.size(), ext.size(), ext) == 0) {
    return model_path.substr(0, model_path.size() - ext.size()) + ".gate.gguf";
  }
  return model_path + ".gate.gguf";
}

Result<KvPolicyConfig> kv_policy_from_config(const KvConfig& kv, const std::string& model_path,
                                             const LlamaModel& model) {
  KvPolicyConfig p;
  auto policy = parse_kv_policy(kv_policy_config_name(kv.policy));
  if (!policy.ok()) return invalid_argument("kv.policy: " + policy.status().message());
  p.policy = *policy;
  std::string gate_path = kv.gate_file;
  if (gate_path.empty() && p.policy != KvPolicy::kDense) {
    std::error_code ec;
    const std::string candidate = default_gate_path(model_path);
    if (std::filesystem::is_regular_file(candidate, ec)) gate_path = candidate;
  }
  if (!gate_path.empty()) {
    auto gate = load_gate_for_model(gate_path, model);
    if (!gate.ok()) return gate.status();
    p.gate = std::make_shared<const GateModel>(std::move(*gate));
  }
  const KvConfig defaults;
  if (!p.gate || kv.sink_tokens != defaults.sink_tokens) p.n_sink_tokens = kv.sink_tokens;
  if (!p.gate || kv.window_tokens != defaults.window_tokens) p.n_window_tokens = kv.window_tokens;
  if (!p.gate || kv.pod_group_layers != defaults.pod_group_layers) {
    p.pod_group_layers = kv.pod_group_layers;
  }
  p.keep_rate = kv.keep_rate;
  p.budget_tokens = kv.budget_tokens;
  p.snapkv_observe_tokens = kv.snapkv_observe_tokens;
  p.gate_decision.threshold_offset = kv.gate_threshold_offset;
  if (Status s = p.validate(); !s.ok()) return invalid_argument("kv: " + s.message());
  return p;
}

control::KvPolicySpec kv_policy_spec(const KvPolicyConfig& policy) {
  control::KvPolicySpec spec;
  spec.name = kv_policy_name(policy.policy);
  auto add = [&](const char* key, double value) { spec.params.push_back({key, value}); };
  if (policy.n_sink_tokens) add("n_sink_tokens", static_cast<double>(*policy.n_sink_tokens));
  if (policy.n_window_tokens) add("n_window_tokens", static_cast<double>(*policy.n_window_tokens));
  if (policy.pod_group_layers) {
    add("pod_group_layers", static_cast<double>(*policy.pod_group_layers));
  }
  add("keep_rate", policy.keep_rate);
  add("budget_tokens", static_cast<double>(policy.budget_tokens));
  add("snapkv_observe_tokens", static_cast<double>(policy.snapkv_observe_tokens));
  add("gate_threshold_offset", policy.gate_decision.threshold_offset);
  return spec;
}

namespace {

// A whole number in [lo, hi] (doubles hold every int64 we allow exactly).
Result<int64_t> whole(const control::KvPolicyParam& p, int64_t lo, int64_t hi) {
  if (!std::isfinite(p.value) || p.value != std::floor(p.value) ||
      p.value < static_cast<double>(lo) || p.value > static_cast<double>(hi)) {
    return invalid_argument("kv_policy." + p.key + ": " + std::to_string(p.value) +
                            " is not a whole number in " + std::to_string(lo) + ".." +
                            std::to_string(hi));
  }
  return static_cast<int64_t>(p.value);
}

}  // namespace

Result<KvPolicyConfig> kv_policy_from_spec(const control::KvPolicySpec& spec,
                                           std::shared_ptr<const GateModel> gate) {
  KvPolicyConfig p;
  auto policy = parse_kv_policy(spec.name);
  if (!policy.ok()) return invalid_argument("kv_policy.name: " + policy.status().message());
  p.policy = *policy;
  std::set<std::string> seen;
  for (const auto& param : spec.params) {
    if (!seen.insert(param.key).second) {
      return invalid_argument("kv_policy." + param.key + ": given twice");
    }
    const std::string& k = param.key;
    if (k == "n_sink_tokens") {
      auto v = whole(param, 0, 1 << 20);
      if (!v.ok()) return v.status();
      p.n_sink_tokens = *v;
    } else if (k == "n_window_tokens") {
      auto v = whole(param, 1, 1 << 20);
      if (!v.ok()) return v.status();
      p.n_window_tokens = *v;
    } else if (k == "pod_group_layers") {
      auto v = whole(param, 1, 1024);
      if (!v.ok()) return v.status();
      p.pod_group_layers = *v;
    } else if (k == "keep_rate") {
      if (!(param.value >= 0.0 && param.value <= 1.0)) {
        return invalid_argument("kv_policy.keep_rate: " + std::to_string(param.value) +
                                " is not in 0..1");
      }
      p.keep_rate = param.value;
    } else if (k == "budget_tokens") {
      auto v = whole(param, 0, int64_t{1} << 30);
      if (!v.ok()) return v.status();
      p.budget_tokens = *v;
    } else if (k == "snapkv_observe_tokens") {
      auto v = whole(param, 1, 1 << 16);
      if (!v.ok()) return v.status();
      p.snapkv_observe_tokens = *v;
    } else if (k == "gate_threshold_offset") {
      if (!std::isfinite(param.value) || std::fabs(param.value) > 1e6) {
        return invalid_argument("kv_policy.gate_threshold_offset: " +
                                std::to_string(param.value) + " is not in -1e6..1e6");
      }
      p.gate_decision.threshold_offset = param.value;
    } else {
      return invalid_argument("kv_policy." + k + ": unknown parameter");
    }
  }
  if (policy_uses_gate(p) && !gate) {
    return failed_precondition("kv_policy.name: " + spec.name +
                               " needs the calibrated gate side file on this node");
  }
  p.gate = std::move(gate);
  if (Status s = p.validate(); !s.ok()) return invalid_argument("kv_policy: " + s.message());
  return p;
}

}  // namespace kvgate::engine
