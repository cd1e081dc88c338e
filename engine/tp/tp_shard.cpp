#include "engine/tp/tp_shard.h"

#include <cstring>
#include <new>
#include <string>

namespace kvgate::engine::tp {

namespace {
constexpr std::align_val_t kAlign{64};
}  // namespace

TpShard::~TpShard() {
  for (void* p : storage_) ::operator delete(p, kAlign);
}

void* TpShard::allocate(size_t bytes) {
  void* p = ::operator new(bytes, kAlign);
  storage_.push_back(p);
  owned_bytes_ += static_cast<int64_t>(bytes);
  return p;
}

Result<cpu::WeightView> TpShard::slice(const cpu::WeightView& w, TpWeight which, int layer) {
  const std::string name = "blk." + std::to_string(layer) + "." + tp_weight_name(which);
  if (!cpu::matmul_supports(w.type)) {
    return unimplemented("tensor-parallel shard: " + name + " has a type the CPU matmul does not take");
  }
  if (w.rows != plan_.rows(which) || w.cols != plan_.cols(which)) {
    return invalid_argument("tensor-parallel shard: " + name + " is " + std::to_string(w.rows) + "x" +
                            std::to_string(w.cols) + ", the plan expects " +
                            std::to_string(plan_.rows(which)) + "x" + std::to_string(plan_.cols(which)));
  }
  const auto traits = ggml_type_traits(static_cast<uint32_t>(w.type));
  const auto row_bytes = ggml_row_bytes(w.type, static_cast<uint64_t>(w.cols));
  if (!traits || !row_bytes) return invalid_argument("tensor-parallel shard: " + name + " has bad rows");
  const TpRange rg = plan_.range(rank_, which);
  const auto* src = static_cast<const uint8_t*>(w.data);
  if (tp_split_of(which) == TpSplit::kColumn) {
    // Output rows [begin, end): one contiguous byte range.
    const size_t bytes = static_cast<size_t>(rg.size()) * *row_bytes;
    void* dst = allocate(bytes);
    std::memcpy(dst, src + static_cast<size_t>(rg.begin) * *row_bytes, bytes);
    return cpu::WeightView{w.type, dst, rg.size(), w.cols};
  }
  // Input columns [begin, end) of every row, as whole blocks.
  const int64_t be = traits->block_elems;
  if (rg.begin % be != 0 || rg.end % be != 0) {
    return invalid_argument("tensor-parallel shard: " + name + " columns [" + std::to_string(rg.begin) +
                            ", " + std::to_string(rg.end) + ") are not on its " + std::to_string(be) +
                            "-element block boundary");
  }
  const size_t offset = static_cast<size_t>(rg.begin / be) * traits->block_bytes;
  const size_t part = static_cast<size_t>(rg.size() / be) * traits->block_bytes;
  auto* dst = static_cast<uint8_t*>(allocate(part * static_cast<size_t>(w.rows)));
  for (int64_t r = 0; r < w.rows; ++r) {
    std::memcpy(dst + static_cast<size_t>(r) * part, src + static_cast<size_t>(r) * *row_bytes + offset, part);
  }
  return cpu::WeightView{w.type, dst, w.rows, rg.size()};
}

Result<std::unique_ptr<TpShard>> TpShard::build(const LlamaModel& model, const TpPlan& plan, int rank) {
  const LlamaConfig& c = model.config();
  if (plan.n_embd != c.n_embd || plan.n_ff != c.n_ff || plan.n_heads != c.n_heads ||
      plan.n_kv_heads != c.n_kv_heads || plan.head_dim != c.head_dim ||
      static_cast<int>(plan.ranks.size()) != plan.world_size) {
    return invalid_argument("tensor-parallel shard: the plan was made for other model shapes");
  }
  if (rank < 0 || rank >= plan.world_size) {
    return invalid_argument("tensor-parallel shard: rank " + std::to_string(rank) + " outside the world of " +
                            std::to_string(plan.world_size));
  }
  std::unique_ptr<TpShard> s(new TpShard(model, plan, rank));
  s->layers_.resize(static_cast<size_t>(c.n_layers));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& w = model.layers()[static_cast<size_t>(l)];
    TpLayerShard& o = s->layers_[static_cast<size_t>(l)];
    const int li = static_cast<int>(l);
    o.attn_norm = w.attn_norm;
    o.ffn_norm = w.ffn_norm;
    KVGATE_ASSIGN_OR_RETURN(o.wq, s->slice(w.wq, TpWeight::kWq, li));
    KVGATE_ASSIGN_OR_RETURN(o.wk, s->slice(w.wk, TpWeight::kWk, li));
    KVGATE_ASSIGN_OR_RETURN(o.wv, s->slice(w.wv, TpWeight::kWv, li));
    KVGATE_ASSIGN_OR_RETURN(o.wo, s->slice(w.wo, TpWeight::kWo, li));
    KVGATE_ASSIGN_OR_RETURN(o.w_gate, s->slice(w.w_gate, TpWeight::kWGate, li));
    KVGATE_ASSIGN_OR_RETURN(o.w_up, s->slice(w.w_up, TpWeight::kWUp, li));
    KVGATE_ASSIGN_OR_RETURN(o.w_down, s->slice(w.w_down, TpWeight::kWDown, li));
  }
  return s;
}

}  // namespace kvgate::engine::tp
