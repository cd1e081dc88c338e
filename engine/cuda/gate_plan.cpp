#include "engine/cuda/gate_plan.h"

#include <algorithm>
#include <string>

#include "engine/cuda/kernel_params.h"

namespace kvgate::engine::cuda {
namespace {

constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;

Status field(const char* name, int64_t value, const char* rule) {
  return invalid_argument(std::string("cuda gate plan: ") + name + " = " + std::to_string(value) +
                          " (" + rule + ")");
}

}  // namespace

Result<GatePlan> plan_gate(int64_t n_tokens, int64_t n_slots, int64_t heads, int64_t head_dim,
                           int64_t n_sink, int64_t n_window, int64_t n_embd) {
  if (n_tokens < 1) return field("n_tokens", n_tokens, "must be >= 1");
  if (n_slots < 1) return field("n_slots", n_slots, "must be >= 1");
  if (heads < 1 || heads > kGateMaxHeads) return field("heads", heads, "must be in [1, 64]");
  if (head_dim < 1 || head_dim > kGateMaxHeadDim) {
    return field("head_dim", head_dim, "must be in [1, 64]");
  }
  if (n_sink < 0) return field("n_sink", n_sink, "must be >= 0");
  if (n_window < 1) return field("n_window", n_window, "must be >= 1");
  if (n_embd < 1) return field("n_embd", n_embd, "must be >= 1");
  // Bound each factor before multiplying so no product overflows.
  if (n_tokens > kMaxGrid) return field("n_tokens", n_tokens, "must be <= 2^31 - 1");
  if (n_slots > kMaxGrid / n_tokens) {
    return field("n_slots", n_slots, "n_tokens * n_slots must be <= 2^31 - 1");
  }
  GatePlan p;
  p.n_tokens = n_tokens;
  p.n_slots = n_slots;
  p.heads = heads;
  p.head_dim = head_dim;
  p.dim = heads * head_dim;
  p.n_sink = n_sink;
  p.n_window = n_window;
  p.n_embd = n_embd;
  const int64_t pairs = n_tokens * n_slots;
  const int64_t warps_per_block = kGateProjectThreads / 32;
  const int64_t proj_rows = pairs * 3 * p.dim;  // < 2^31 * 12288: fits int64
  p.project_threads = kGateProjectThreads;
  p.project_blocks = (proj_rows + warps_per_block - 1) / warps_per_block;
  if (p.project_blocks > kMaxGrid) {
    return field("n_tokens", n_tokens, "projection grid n_tokens * n_slots * 3D / 8 over 2^31 - 1");
  }
  p.logit_threads = kGateLogitThreads;
  p.logit_blocks = pairs;
  p.flag_threads = kGateFlagThreads;
  p.flag_blocks = (pairs + kGateFlagThreads - 1) / kGateFlagThreads;
  p.proj_bytes = static_cast<size_t>(proj_rows) * sizeof(float);
  p.logits_bytes = static_cast<size_t>(pairs) * sizeof(float);
  return p;
}

int64_t gate_context_rows(int64_t t, int64_t n_sink, int64_t n_window) {
  const int64_t sinks = std::min(n_sink, t + 1);
  const int64_t first = std::max(n_sink, t + 1 - n_window);
  return sinks + std::max<int64_t>(0, t - first + 1);
}

}  // namespace kvgate::engine::cuda
