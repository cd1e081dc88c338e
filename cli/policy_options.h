// The KV policy options shared by `kvgate generate` and `kvgate eval`
// (engine/kv_policy.h): declared once so both commands spell and check them
// the same way.
#pragma once

#include <string>

#include "cli/args.h"
#include "common/status.h"
#include "engine/kv_policy.h"

namespace kvgate::cli {

inline void add_kv_policy_options(ArgParser& p) {
  p.add_option("gate", "FILE",
               "calibrated gate side file (default: the model path with .gguf replaced by "
               ".gate.gguf, used if it exists); needed by gate and gate+pod");
  p.add_option("n-sink", "N",
               "attention-sink tokens kept by compressed policies (default: the gate's "
               "calibrated value with a gate file, else 4)");
  p.add_option("n-window", "N",
               "recent-window tokens kept by compressed policies (default: the gate's "
               "calibrated value with a gate file, else 256)");
  p.add_option("pod-group", "G",
               "pod: uniform blocks of G layers sharing keys (default: the gate's calibrated "
               "blocks with a gate file, else 2)");
  p.add_option("keep-rate", "R", "h2o, snapkv: share of distant prompt tokens kept", "0.3");
  p.add_option("budget-tokens", "B",
               "h2o, snapkv, gate, gate+pod: keep at most B distant tokens per (block, head) "
               "instead of --keep-rate / the gate threshold; 0 = off",
               "0");
  p.add_option("gate-threshold-offset", "X",
               "gate, gate+pod: added to every calibrated gate threshold (higher keeps fewer)", "0");
}

// The options as a policy template (policy dense, no gate model yet); unset
// sink, window and pod-group stay unset so a gate model can supply them.
inline Result<engine::KvPolicyConfig> parse_kv_policy_options(const ArgParser& p) {
  engine::KvPolicyConfig c;
  if (p.has("n-sink")) {
    auto v = p.get_int("n-sink", 0, 1 << 20);
    if (!v.ok()) return v.status();
    c.n_sink_tokens = *v;
  }
  if (p.has("n-window")) {
    auto v = p.get_int("n-window", 1, 1 << 20);
    if (!v.ok()) return v.status();
    c.n_window_tokens = *v;
  }
  if (p.has("pod-group")) {
    auto v = p.get_int("pod-group", 1, 1024);
    if (!v.ok()) return v.status();
    c.pod_group_layers = *v;
  }
  auto keep_rate = p.get_double("keep-rate", 0, 1);
  if (!keep_rate.ok()) return keep_rate.status();
  c.keep_rate = *keep_rate;
  auto budget = p.get_int("budget-tokens", 0, 1 << 30);
  if (!budget.ok()) return budget.status();
  c.budget_tokens = *budget;
  auto offset = p.get_double("gate-threshold-offset", -1e6, 1e6);
  if (!offset.ok()) return offset.status();
  c.gate_decision.threshold_offset = *offset;
  return c;
}

}  // namespace kvgate::cli
