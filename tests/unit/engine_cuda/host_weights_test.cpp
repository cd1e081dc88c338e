// HostWeights of a tensor-parallel rank (engine/cuda/host_weights.h): the
// rank's forward is a narrower model's — every matrix has exactly the shape
// a CudaForward of the narrowed config uploads (q_dim x n_embd, n_embd x
// q_dim, ...), points at the shard's own slices, and the replicated tensors
// are the model's. Runs on the real model (skips when it is absent).
#include "engine/cuda/host_weights.h"

#include <gtest/gtest.h>

#include "engine/tp/tp_plan.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::engine::cuda {
namespace {

const LlamaModel* model() {
  const auto* t = testing::test_model();
  return t->model ? t->model.get() : nullptr;
}

void expect_shape(const cpu::WeightView& w, int64_t rows, int64_t cols, const char* what) {
  EXPECT_NE(w.data, nullptr) << what;
  EXPECT_EQ(w.rows, rows) << what;
  EXPECT_EQ(w.cols, cols) << what;
}

TEST(HostWeights, OfModelIsTheModel) {
  const LlamaModel* m = model();
  if (m == nullptr) GTEST_SKIP() << "model not present";
  const HostWeights w = HostWeights::of(*m);
  EXPECT_EQ(w.config.n_heads, m->config().n_heads);
  ASSERT_EQ(w.layers.size(), m->layers().size());
  EXPECT_EQ(w.layers[7].wq.data, m->layers()[7].wq.data);
  EXPECT_EQ(w.output.data, m->output().data);
}

TEST(HostWeights, ShardIsANarrowerModel) {
  const LlamaModel* m = model();
  if (m == nullptr) GTEST_SKIP() << "model not present";
  const LlamaConfig& full = m->config();
  for (int world : {1, 3}) {
    auto plan = tp::plan_tensor_parallel(full, world);
    ASSERT_TRUE(plan.ok()) << plan.status().to_string();
    int64_t heads = 0, kv = 0, ff = 0;
    for (int r = 0; r < world; ++r) {
      auto shard = tp::TpShard::build(*m, *plan, r);
      ASSERT_TRUE(shard.ok()) << shard.status().to_string();
      const HostWeights w = shard_host_weights(**shard);
      const LlamaConfig& c = w.config;
      const tp::TpRankPlan& rp = plan->ranks[static_cast<size_t>(r)];
      EXPECT_EQ(c.n_heads, rp.q_heads.size());
      EXPECT_EQ(c.n_kv_heads, rp.kv_heads.size());
      EXPECT_EQ(c.n_ff, rp.ff.size());
      EXPECT_EQ(c.n_heads / c.n_kv_heads, full.n_heads / full.n_kv_heads);  // GQA kept
      EXPECT_EQ(c.n_embd, full.n_embd);
      EXPECT_EQ(c.head_dim, full.head_dim);
      heads += c.n_heads;
      kv += c.n_kv_heads;
      ff += c.n_ff;
      ASSERT_EQ(static_cast<int64_t>(w.layers.size()), full.n_layers);
      for (int64_t l = 0; l < full.n_layers; ++l) {
        const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
        expect_shape(lw.wq, c.q_dim(), c.n_embd, "wq");
        expect_shape(lw.wk, c.kv_dim(), c.n_embd, "wk");
        expect_shape(lw.wv, c.kv_dim(), c.n_embd, "wv");
        expect_shape(lw.wo, c.n_embd, c.q_dim(), "wo");
        expect_shape(lw.w_gate, c.n_ff, c.n_embd, "w_gate");
        expect_shape(lw.w_up, c.n_ff, c.n_embd, "w_up");
        expect_shape(lw.w_down, c.n_embd, c.n_ff, "w_down");
        EXPECT_EQ(lw.wo.data, (*shard)->layers()[static_cast<size_t>(l)].wo.data);
        EXPECT_EQ(lw.attn_norm, m->layers()[static_cast<size_t>(l)].attn_norm);
      }
      EXPECT_EQ(w.token_embd.data, m->token_embd().data);
      EXPECT_EQ(w.output_norm, m->output_norm());
    }
    // The ranks together are the whole model.
    EXPECT_EQ(heads, full.n_heads);
    EXPECT_EQ(kv, full.n_kv_heads);
    EXPECT_EQ(ff, full.n_ff);
  }
}

}  // namespace
}  // namespace kvgate::engine::cuda
