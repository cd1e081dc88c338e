// The Attention-Gate on the GPU (gate.cu): launch shapes, scratch sizes and
// argument checks, plain C++ so CI tests them without a device.
//
// What the kernels compute, and how it matches the CPU (engine/gate_math.h,
// engine/gate_runtime.cpp: GatePrefill::compute_gate_slot, window context):
//   1. gate_project: proj[t][s][0..3D) = ([Wq;Wk;Wv] of slot s) · x_t, float
//      weights [n_slots][3D][n_embd] (GateSlot's wq, wk, wv concatenated),
//      one warp per output (a small kernel, not cuBLAS: 3D <= 192 rows per
//      slot are too few for a GEMM to pay, and the warp sum keeps fp32).
//      Layout [token][slot][3D] is GatePrefill's proj_.
//   2. gate_logits_window: logit[s][t] of slot s at token t over the window
//      context: sinks c < min(n_sink, t + 1), then c in
//      [max(n_sink, t + 1 - n_window), t], in that order (the CPU's order,
//      which the online softmax's rounding depends on). K and V are read
//      from proj (float) and rounded through fp16 (round to nearest even)
//      as the CPU's kv16/kv32 copy does; q is not rounded. Per gate head:
//      online softmax of q_a·k_a / sqrt(d'), o_a = Σ p v_a, and
//      logit = bias + Σ_a (wo_a·o_a) / sum_a, summed over a in order.
//      One warp per (token, slot), one lane per head.
//   3. gate_flags: flag[s][t] = logit[s][t] >= threshold[s] + offset, and 1
//      for sinks (t < n_sink) as the CPU sets them. (The retained-budget
//      rule and the kCache context are not covered: they are sequential or
//      a top-k over the prompt, left to the host.)
//
// Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"

namespace kvgate::engine::cuda {

struct GatePlan {
  int64_t n_tokens = 0;
  int64_t n_slots = 0;
  int64_t heads = 0;     // h'
  int64_t head_dim = 0;  // d'
  int64_t dim = 0;       // D = h' * d'
  int64_t n_sink = 0;
  int64_t n_window = 0;
  int64_t n_embd = 0;
  // gate_project: one warp per (token, slot, row of 3D).
  int64_t project_blocks = 0;
  int project_threads = 0;
  // gate_logits_window: one warp per (token, slot).
  int64_t logit_blocks = 0;
  int logit_threads = 0;
  // gate_flags: one thread per (slot, token).
  int64_t flag_blocks = 0;
  int flag_threads = 0;
  // Device scratch the caller provides: projections [n_tokens][n_slots][3D]
  // floats and logits [n_slots][n_tokens] floats.
  size_t proj_bytes = 0;
  size_t logits_bytes = 0;
};

// INVALID_ARGUMENT naming the field unless: n_tokens >= 1, n_slots >= 1,
// heads and head_dim in [1, 64] (GateModel::validate), n_sink >= 0,
// n_window >= 1 (a token's context is then never empty), n_embd >= 1, and
// every grid fits in 2^31 - 1 blocks.
Result<GatePlan> plan_gate(int64_t n_tokens, int64_t n_slots, int64_t heads, int64_t head_dim,
                           int64_t n_sink, int64_t n_window, int64_t n_embd);

// Number of context rows of token t (sinks + window, deduplicated), the n
// the CPU passes to gate_attention_logit.
int64_t gate_context_rows(int64_t t, int64_t n_sink, int64_t n_window);

}  // namespace kvgate::engine::cuda
