#include "engine/cuda/host_weights.h"

namespace kvgate::engine::cuda {

HostWeights HostWeights::of(const LlamaModel& model) {
  HostWeights w;
  w.config = model.config();
  w.layers = model.layers();
  w.token_embd = model.token_embd();
  w.output = model.output();
  w.output_norm = model.output_norm();
  return w;
}

HostWeights shard_host_weights(const tp::TpShard& shard) {
  const tp::TpRankPlan& r = shard.rank_plan();
  HostWeights w;
  w.config = shard.config();
  w.config.n_heads = r.q_heads.size();
  w.config.n_kv_heads = r.kv_heads.size();
  w.config.n_ff = r.ff.size();
  w.layers.reserve(shard.layers().size());
  for (const tp::TpLayerShard& s : shard.layers()) {
    LayerWeights l;
    l.attn_norm = s.attn_norm;
    l.ffn_norm = s.ffn_norm;
    l.wq = s.wq;
    l.wk = s.wk;
    l.wv = s.wv;
    l.wo = s.wo;
    l.w_gate = s.w_gate;
    l.w_up = s.w_up;
    l.w_down = s.w_down;
    w.layers.push_back(l);
  }
  w.token_embd = shard.token_embd();
  w.output = shard.output();
  w.output_norm = shard.output_norm();
  return w;
}

}  // namespace kvgate::engine::cuda
