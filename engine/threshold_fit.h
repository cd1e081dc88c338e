// Fitting the gates' thresholds at the serving length, under the serving
// semantics (engine/gate_runtime.h), with the keep budget spread over the
// (block, KV head) slots by what their distant tokens are worth.
//
// Why not the training stage's thresholds: those are per-slot logit
// quantiles on 1,024-token sequences with the gate attending over the full
// causal context. Served, a gate attends only over what the cache holds
// (sinks, window, retained tokens), and on longer prompts its logits drift
// (the shipped gate kept 0.334 of distant tokens at 4k against its 0.30
// target; gates of context `window` do not drift, their logits ignore the
// retained set, and one round suffices). Here the real runtime
// (GatePrefill) computes every logit of
// sequences of the serving length; because a logit depends on which earlier
// tokens were retained, thresholds and logits are iterated to a fixed point
// (a few rounds; the report gives the keep rate reached with the final
// thresholds).
//
// Allocation:
//   kUniform  every slot keeps the target share of its eligible tokens;
//   kMass     one keep budget in bytes for all slots (target share × the
//             bytes every slot would hold at that share) spent where it keeps
//             the most teacher attention mass per byte: per slot, tokens
//             ranked by gate logit form a curve of teacher mass kept against
//             bytes; its upper concave hull is cut greedily across slots at
//             equal marginal mass per byte. Heads whose queries rarely look at
//             distant tokens give their budget to heads that do. Every slot
//             keeps at least min_keep_rate (a head that looks back only for a
//             rare fact — the retrieval heads — must not be starved by
//             averages over text where that never happens).
// The teacher is the calibration's: the mean attention a token receives
// from the queries for which it is distant, per (block, KV head) slot; on
// retrieval probes, from the probe's last queries (its answer) only.
//
// Blocks the calling thread (drives `forward`).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "engine/gate.h"
#include "engine/model.h"

namespace kvgate::engine {

enum class KeepAllocation { kUniform, kMass };
Result<KeepAllocation> parse_keep_allocation(std::string_view name);  // "uniform" | "mass"
const char* keep_allocation_name(KeepAllocation a);

struct ThresholdFitOptions {
  int64_t sequences = 4;
  int64_t tokens = 4096;  // the serving length the thresholds are fitted at
  double target_keep_rate = 0.3;
  KeepAllocation allocation = KeepAllocation::kMass;
  double min_keep_rate = 0.1;  // kMass: floor per slot
  int64_t rounds = 6;          // threshold <-> logit iterations (each re-runs the gates)
  int64_t min_distant_queries = 32;  // eligible tokens, as in calibration
  uint64_t seed = 7;           // which windows of the texts
  // Retrieval probes (token ids; kvgate calibrate --grouping-probes): texts
  // that end where the model retrieves an earlier fact. Their eligible
  // tokens join the fitted ones, valued by the attention of their last
  // probe_queries queries only — what the answer needs. Averaged over prose,
  // the one fact a later question asks for is worth nothing and mass
  // allocation starves the heads that retrieve it (measured: passkey at
  // 1k/2k/4k fell from 100/70/80% to 40/30/40%).
  std::vector<std::vector<int32_t>> probes;
  int64_t probe_queries = 12;

  Status validate() const;  // names the field
};

struct ThresholdFitProgress {
  std::string_view stage;  // "fit-prefill", "fit-rounds"
  int64_t done = 0;
  int64_t total = 0;
};

struct ThresholdFitReport {
  int64_t tokens_seen = 0;  // fit sequences and probes
  // With the final thresholds, over the fit sequences' eligible tokens:
  double keep_rate = 0.0;                  // all slots together
  double mass_kept = 0.0;                  // share of the teacher mass kept
  double bytes_share = 0.0;                // retained bytes / bytes if every eligible token were kept
  std::vector<double> slot_keep_rate;      // per slot
  double seconds = 0.0;
};

// One slot's share of a keep budget, exposed for tests. Items (one per
// eligible token) are ranked by logit, highest first; value = the token's
// teacher importance. Given, per slot, the items' values in rank order and
// the bytes one kept token costs, returns how many leading items each slot
// keeps so that Σ kept·bytes ≤ budget_bytes, every slot keeps at least
// ceil(min_rate·n) (before the budget is spent on anything else), and the
// rest goes greedily by the upper concave hull of each slot's cumulative
// value per byte. Deterministic.
std::vector<int64_t> allocate_keep(std::span<const std::vector<float>> values_by_rank,
                                   std::span<const int64_t> bytes_per_token, double budget_bytes,
                                   double min_rate);

// Teacher importance [gate slot][token] of one prefilled sequence from its
// distant-attention statistics (mean per distant query over the block's
// layers and the KV head's query heads), as the calibration's labels use.
std::vector<float> teacher_importance(const AttentionStats& stats, const kvstore::BlockMap& blocks,
                                      int64_t group, int64_t n_window);

// The same from the captured raw scores of a prefill's last queries
// (AttentionStats::enable_capture): token j's importance for a slot is the
// softmax attention it gets from those queries for which it is distant (j
// in [n_sink, pos + 1 - n_window)), averaged over the captured queries, the
// block's layers and the KV head's query heads.
std::vector<float> captured_importance(const AttentionStats& stats, const kvstore::BlockMap& blocks,
                                       int64_t group, int64_t n_sink, int64_t n_window);

// Sets every slot's threshold of `gate` (in place) for the gate+pod layout
// with the gate's own n_sink / n_window. `documents`: token ids of
// calibration texts (never evaluation text); windows of `tokens` are drawn
// with the seed. INVALID_ARGUMENT when the texts hold too few windows.
Status fit_thresholds(CpuForward& forward, std::span<const std::vector<int32_t>> documents,
                      GateModel& gate, const ThresholdFitOptions& options,
                      const std::function<void(const ThresholdFitProgress&)>& progress = {},
                      ThresholdFitReport* report = nullptr);

}  // namespace kvgate::engine
