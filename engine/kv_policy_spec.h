// KV policies as they travel: from the YAML `kv` section, to the control
// plane's KvPolicySpec (PrefillJob, TransferManifest), back to a
// KvPolicyConfig on the prefill and decode nodes (engine/kv_policy.h).
//
// Spec params use KvPolicyConfig's field names: "n_sink_tokens",
// "n_window_tokens", "pod_group_layers", "keep_rate", "budget_tokens",
// "snapkv_observe_tokens", "gate_threshold_offset". Optional fields that are
// unset are left out of the spec (so the receiver's gate model supplies
// them, exactly as on the sender).
//
// Pure functions except for the gate file read by kv_policy_from_config.
#pragma once

#include <memory>
#include <string>

#include "common/config.h"
#include "common/control_protocol.h"
#include "common/status.h"
#include "engine/gate.h"
#include "engine/kv_policy.h"
#include "engine/model.h"

namespace kvgate::engine {

// The side file next to a model: "<model without .gguf>.gate.gguf".
std::string default_gate_path(const std::string& model_path);

// The policy the `kv` section describes for `model`: the gate side file
// (kv.gate_file, or the one next to the model if it exists) is loaded and
// checked against the model for every policy but dense (it supplies the
// calibrated n_sink/n_window/blocks); keys left at their defaults stay
// unset so the gate supplies them. Errors name the key ("kv.policy: ...").
Result<KvPolicyConfig> kv_policy_from_config(const KvConfig& kv, const std::string& model_path,
                                             const LlamaModel& model);

// The spec of a policy (name + the fields that are set).
control::KvPolicySpec kv_policy_spec(const KvPolicyConfig& policy);

// A policy from a peer's spec. `gate` is this node's gate model (may be
// null; required by gate and gate+pod: FAILED_PRECONDITION otherwise).
// Unknown policy names or param keys, duplicate keys and out-of-range
// values are INVALID_ARGUMENT naming the key; the result is validate()d.
Result<KvPolicyConfig> kv_policy_from_spec(const control::KvPolicySpec& spec,
                                           std::shared_ptr<const GateModel> gate);

}  // namespace kvgate::engine
