#include "engine/tp/tp_plan.h"

namespace kvgate::engine::tp {

TpSplit tp_split_of(TpWeight w) {
  switch (w) {
    case TpWeight::kWo:
    case TpWeight::kWDown:
      return TpSplit::kRow;
    default:
      return TpSplit::kColumn;
  }
}

const char* tp_weight_name(TpWeight w) {
  switch (w) {
    case TpWeight::kWq: return "wq";
    case TpWeight::kWk: return "wk";
    case TpWeight::kWv: return "wv";
    case TpWeight::kWo: return "wo";
    case TpWeight::kWGate: return "w_gate";
    case TpWeight::kWUp: return "w_up";
    case TpWeight::kWDown: return "w_down";
  }
  return "?";
}

int64_t TpPlan::rows(TpWeight w) const {
  switch (w) {
    case TpWeight::kWq: return n_heads * head_dim;
    case TpWeight::kWk:
    case TpWeight::kWv: return n_kv_heads * head_dim;
    case TpWeight::kWo:
    case TpWeight::kWDown: return n_embd;
    case TpWeight::kWGate:
    case TpWeight::kWUp: return n_ff;
  }
  return 0;
}

int64_t TpPlan::cols(TpWeight w) const {
  switch (w) {
    case TpWeight::kWo: return n_heads * head_dim;
    case TpWeight::kWDown: return n_ff;
    default: return n_embd;
  }
}

TpRange TpPlan::range(int rank, TpWeight w) const {
  const TpRankPlan& p = ranks.at(static_cast<size_t>(rank));
  switch (w) {
    case TpWeight::kWq:
    case TpWeight::kWo:  // wo's input columns are the rank's attention outputs
      return {p.q_heads.begin * head_dim, p.q_heads.end * head_dim};
    case TpWeight::kWk:
    case TpWeight::kWv:
      return {p.kv_heads.begin * head_dim, p.kv_heads.end * head_dim};
    case TpWeight::kWGate:
    case TpWeight::kWUp:
    case TpWeight::kWDown:
      return p.ff;
  }
  return {};
}

Result<TpPlan> plan_tensor_parallel(const LlamaConfig& c, int world) {
  const std::string ws = "tensor-parallel world size " + std::to_string(world);
  if (world < 1) return invalid_argument(ws + " must be at least 1");
  if (c.n_heads < 1 || c.n_kv_heads < 1 || c.head_dim < 1 || c.n_embd < 1 || c.n_ff < 1) {
    return invalid_argument("tensor-parallel plan: model shapes must be positive");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return invalid_argument("tensor-parallel plan: " + std::to_string(c.n_heads) +
                            " query heads are not a multiple of " + std::to_string(c.n_kv_heads) +
                            " KV heads");
  }
  if (world > c.n_kv_heads) {
    return invalid_argument(ws + " exceeds the model's " + std::to_string(c.n_kv_heads) +
                            " KV heads (a KV head and its query group cannot be split)");
  }
  if (c.n_kv_heads % world != 0) {
    return invalid_argument(ws + " does not divide the model's " + std::to_string(c.n_kv_heads) +
                            " KV heads evenly");
  }
  TpPlan plan;
  plan.world_size = world;
  plan.n_embd = c.n_embd;
  plan.n_ff = c.n_ff;
  plan.n_heads = c.n_heads;
  plan.n_kv_heads = c.n_kv_heads;
  plan.head_dim = c.head_dim;
  const int64_t kv_per_rank = c.n_kv_heads / world;
  const int64_t group = c.n_heads / c.n_kv_heads;
  if (world > 1) {
    // wo is row-parallel over the attention outputs: each rank's column
    // range must start on a quant block.
    const int64_t wo_cols = kv_per_rank * group * c.head_dim;
    if (wo_cols % kTpBlockCols != 0) {
      return invalid_argument(ws + ": each rank's " + std::to_string(wo_cols) +
                              " attention-output columns (wo input) are not a multiple of the " +
                              std::to_string(kTpBlockCols) + "-column quant block");
    }
    if (c.n_ff % kTpBlockCols != 0) {
      return invalid_argument(ws + ": MLP width " + std::to_string(c.n_ff) +
                              " (w_down input) is not a multiple of the " +
                              std::to_string(kTpBlockCols) + "-column quant block");
    }
    if (c.n_ff / kTpBlockCols < world) {
      return invalid_argument(ws + " exceeds the " + std::to_string(c.n_ff / kTpBlockCols) +
                              " quant blocks of the MLP width");
    }
  }
  const int64_t ff_blocks = world > 1 ? c.n_ff / kTpBlockCols : 1;
  const int64_t base = ff_blocks / world, extra = ff_blocks % world;
  int64_t ff_block = 0;
  plan.ranks.resize(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    TpRankPlan& p = plan.ranks[static_cast<size_t>(r)];
    p.rank = r;
    p.kv_heads = {r * kv_per_rank, (r + 1) * kv_per_rank};
    p.q_heads = {p.kv_heads.begin * group, p.kv_heads.end * group};
    const int64_t n_blocks = base + (r < extra ? 1 : 0);
    if (world == 1) {
      p.ff = {0, c.n_ff};  // no split: any width is fine
    } else {
      p.ff = {ff_block * kTpBlockCols, (ff_block + n_blocks) * kTpBlockCols};
    }
    ff_block += n_blocks;
  }
  return plan;
}

}  // namespace kvgate::engine::tp
