// Tensor-parallel plan (Megatron-style) for a Llama-family decoder: which
// query heads, KV heads and MLP columns each rank owns, and how every weight
// matrix is cut.
//
//   column-parallel (wq, wk, wv, w_gate, w_up): the OUTPUT rows are split. A
//     row of a GGUF matrix is contiguous, so a rank's shard is a row range
//     and its outputs are final values for its heads / MLP columns.
//   row-parallel (wo, w_down): the INPUT columns are split, in whole quant
//     blocks of kTpBlockCols. Each rank's output is a partial sum over its
//     columns; an all-reduce adds the ranks' partials.
//   replicated: norms, token embedding, output projection.
//
// KV heads are split evenly and a rank's query heads are exactly the GQA
// groups of its KV heads, so attention never crosses ranks. MLP columns are
// split in blocks of 32 as evenly as possible (the first n_ff/32 % world
// ranks get one block more).
//
// Pure logic: no allocation after planning, thread-safe (immutable).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/model.h"

namespace kvgate::engine::tp {

// Quant block of every block type the CPU matmul takes (Q4_0, Q4_1, Q8_0);
// row-parallel splits land on multiples of it so a shard is whole blocks.
inline constexpr int64_t kTpBlockCols = 32;

enum class TpWeight { kWq, kWk, kWv, kWo, kWGate, kWUp, kWDown };
enum class TpSplit {
  kColumn,  // output rows split
  kRow,     // input columns split, partial sums all-reduced
};

TpSplit tp_split_of(TpWeight w);
const char* tp_weight_name(TpWeight w);

// Half-open index range [begin, end).
struct TpRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const TpRange&) const = default;
};

struct TpRankPlan {
  int rank = 0;
  TpRange q_heads;   // query heads
  TpRange kv_heads;  // KV heads; q_heads = kv_heads scaled by the GQA group
  TpRange ff;        // MLP columns (rows of w_gate/w_up, columns of w_down)
};

struct TpPlan {
  int world_size = 0;
  // The shapes the plan was made for.
  int64_t n_embd = 0, n_ff = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  std::vector<TpRankPlan> ranks;  // ranks[r].rank == r

  int64_t group() const { return n_heads / n_kv_heads; }
  // The rank's slice of `w`: for a column-parallel weight the output-row
  // range, for a row-parallel one the input-column range (element indices,
  // not blocks). Ranks' ranges tile [0, rows) or [0, cols) in rank order.
  TpRange range(int rank, TpWeight w) const;
  // Full (unsplit) output rows and input columns of `w`.
  int64_t rows(TpWeight w) const;
  int64_t cols(TpWeight w) const;
};

// INVALID_ARGUMENT naming the reason for: world_size < 1, more ranks than KV
// heads, KV heads not divisible by the world, a config with inconsistent
// heads, and (world > 1) a row-parallel split not on a kTpBlockCols
// boundary (n_ff or head_dim * heads-per-rank not a multiple of 32, or
// fewer MLP blocks than ranks).
Result<TpPlan> plan_tensor_parallel(const LlamaConfig& config, int world_size);

}  // namespace kvgate::engine::tp
