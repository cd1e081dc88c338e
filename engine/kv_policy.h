// KV compression policies (DESIGN.md §4): which layout a request's cache
// takes and which tokens keep their K/V when they leave the window.
//
// All policies share kvstore's compressed layout so they compare fairly:
//   dense     every block of size 1, every flag 1 (exactly dense attention)
//   window    sinks + window only, every distant token dropped (StreamingLLM)
//   pod       layers grouped into blocks sharing the base layer's key, every
//             distant token kept (no eviction); the blocks are the
//             calibrated gate's block map when a gate model is given
//             ("calibrated PoD"), else uniform blocks of pod_group_layers
//   h2o       keeps the distant prompt tokens that received the most
//             attention from all prompt queries (heavy hitters), keep_rate of
//             them per (layer, head); tokens generated later are kept (flags
//             are decided once, when a token is created, so the dynamic
//             re-ranking of the original H2O is not possible in this layout)
//   snapkv    the same ranking from the attention of the last
//             snapkv_observe_tokens prompt queries, max-pooled over 7 tokens
//   gate      calibrated Attention-Gates decide each token's flags, blocks
//             of one layer (eviction without key sharing)
//   gate+pod  the gates on the gate's block map (eviction and key sharing)
// gate and gate+pod need a calibrated GateModel (engine/gate.h); their flags
// come from engine/gate_runtime.h, not from policy_flags().
//
// Budget mode (budget_tokens > 0) replaces keep_rate (h2o, snapkv) and the
// gate's threshold (gate, gate+pod): each (block, head) slot retains at most
// budget_tokens distant tokens, so the footprint is known before prefill.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "engine/gate.h"
#include "engine/gate_runtime.h"
#include "engine/model.h"
#include "kvstore/layout.h"

namespace kvgate::engine {

enum class KvPolicy { kDense, kWindow, kPod, kH2o, kSnapKv, kGate, kGatePod };

Result<KvPolicy> parse_kv_policy(std::string_view name);
const char* kv_policy_name(KvPolicy policy);
// Every policy, in the order of the table above.
std::span<const KvPolicy> all_kv_policies();

// Defaults of the optional fields below when no gate model gives them.
inline constexpr int64_t kDefaultSinkTokens = 4;
inline constexpr int64_t kDefaultWindowTokens = 256;
inline constexpr int64_t kDefaultPodGroupLayers = 2;

struct KvPolicyConfig {
  KvPolicy policy = KvPolicy::kDense;
  // Proximal tokens. Rule for an unset value: the gate model's calibrated
  // n_sink / n_window when `gate` is given — for every policy, not only the
  // gate ones, so that the policies of one comparison share one proximal
  // set and the gates see the window they were trained with — else
  // kDefaultSinkTokens / kDefaultWindowTokens. A set value always wins.
  std::optional<int64_t> n_sink_tokens;
  std::optional<int64_t> n_window_tokens;
  // Layers per block for `pod`. Unset: the gate's calibrated block map when
  // `gate` is given, else uniform blocks of kDefaultPodGroupLayers. Set:
  // uniform blocks of this size even with a gate.
  std::optional<int64_t> pod_group_layers;
  double keep_rate = 0.3;  // h2o, snapkv: share of distant prompt tokens kept
  // > 0: budget mode (see above) for h2o, snapkv, gate, gate+pod.
  int64_t budget_tokens = 0;
  int64_t snapkv_observe_tokens = 32;
  // The calibrated gates: required by gate and gate+pod; optional for the
  // others (then it supplies the defaults above). Immutable, shared.
  std::shared_ptr<const GateModel> gate;
  // gate, gate+pod: threshold offset. Its retained_budget_tokens is filled
  // from budget_tokens by effective_gate_decision(); set budget_tokens
  // instead (validate() rejects a different value here).
  GateDecision gate_decision;

  int64_t sink_tokens() const;
  int64_t window_tokens() const;
  // gate_decision with the budget of budget_tokens.
  GateDecision effective_gate_decision() const;
  // The error names the field.
  Status validate() const;
};

// The cache layout a policy gives a request of this model. For gate and
// gate+pod without a gate model: FAILED_PRECONDITION naming the policy and
// saying how to get one.
Result<kvstore::KvLayout> make_kv_layout(const LlamaConfig& config, const KvPolicyConfig& policy);

// Where the policy's layer blocks come from: "single-layer" (no key
// sharing), "calibrated" (the gate's block map) or "uniform-G" (blocks of G
// layers), for reports.
std::string kv_policy_blocks(const KvPolicyConfig& policy);

// True if the policy ranks prompt tokens by attention (needs AttentionStats
// from the prefill).
bool policy_needs_stats(const KvPolicyConfig& policy);
// True for gate and gate+pod (flags from the gate runtime).
bool policy_uses_gate(const KvPolicyConfig& policy);

// Keep flags for tokens [first, first + n) of a request, one per (block,
// head) slot: flags[slot * n + j]. Policies that rank by attention need the
// prefill's `stats` (FAILED_PRECONDITION without): prompt tokens
// (positions < stats->n_tokens) by rank, later tokens kept (or, in budget
// mode, kept while the slot's budget is not used up). Gate policies:
// FAILED_PRECONDITION (their flags come from the gate runtime).
// only_slots (h2o, snapkv): rank just these slots — a slot's ranking reads
// only its block's layers, so a layer-major prefill ranks each block once
// its layers are done — leaving the other slots' rows of `flags` as they
// are (it must hold n_slots x n entries already; else it is sized with 1s).
Status policy_flags(const KvPolicyConfig& policy, const kvstore::KvLayout& layout, int64_t first,
                    int64_t n, std::vector<uint8_t>& flags, const AttentionStats* stats = nullptr,
                    std::span<const int64_t> only_slots = {});

}  // namespace kvgate::engine
