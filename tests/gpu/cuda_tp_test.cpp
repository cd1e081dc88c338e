// Tensor parallelism on the GPU: CudaForward over one rank's shard
// (shard_host_weights) with NCCL all-reducing the wo / w_down partial sums
// on the forward's stream. One GPU holds one rank (NCCL refuses two ranks
// of a communicator on one device), so the path that can run is world 1:
// its shard has the model's bytes and its all-reduce of one rank is the
// identity, so prefill and every decode step (plain and graph-captured,
// the collective inside the graph) must give the full model's logits bit
// for bit. Larger worlds are the same code with narrower shards
// (host_weights_test checks their shapes on the CPU; tp_forward_test the
// sharded arithmetic with CPU collectives). Skips without a GPU or model.
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <vector>

#include "engine/cuda/cuda_forward.h"
#include "engine/tp/nccl_collective.h"
#include "engine/tp/tp_plan.h"
#include "engine/tp/tp_shard.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::engine::cuda {
namespace {

const LlamaModel* test_model() {
  static const LlamaModel* model = []() -> const LlamaModel* {
    if (!std::filesystem::exists(KVGATE_TEST_MODEL)) return nullptr;
    auto m = LlamaModel::load(KVGATE_TEST_MODEL);
    return m.ok() ? m->release() : nullptr;
  }();
  return model;
}

TEST(CudaTensorParallel, WorldOneRankEqualsTheFullModel) {
  KVGATE_REQUIRE_GPU();
  const LlamaModel* model = test_model();
  if (model == nullptr) GTEST_SKIP() << "model not found at " KVGATE_TEST_MODEL;
  const int64_t vocab = model->config().n_vocab;
  CudaForwardOptions o;
  o.max_context_tokens = 256;
  o.max_prefill_tokens = 64;
  auto full = CudaForward::create(HostWeights::of(*model), o);
  ASSERT_TRUE(full.ok()) << full.status().to_string();

  auto plan = tp::plan_tensor_parallel(model->config(), 1);
  ASSERT_TRUE(plan.ok());
  auto shard = tp::TpShard::build(*model, *plan, 0);
  ASSERT_TRUE(shard.ok()) << shard.status().to_string();
  // The hook reaches the collective made once the forward's stream exists.
  std::unique_ptr<tp::NcclCollective> comm;
  int reductions = 0;
  CudaForwardOptions to = o;
  to.all_reduce = [&](float* data, size_t n, cudaStream_t) -> Status {
    ++reductions;
    return comm->all_reduce_sum(data, n);
  };
  auto rank = CudaForward::create(shard_host_weights(**shard), to);
  ASSERT_TRUE(rank.ok()) << rank.status().to_string();
  auto id = tp::NcclCollective::new_unique_id();
  ASSERT_TRUE(id.ok()) << id.status().to_string();
  tp::NcclCollectiveOptions co;
  co.stream = (*rank)->stream();
  co.synchronous = false;
  auto made = tp::NcclCollective::create(*id, 0, 1, co);
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  comm = std::move(*made);

  const std::vector<int32_t> prompt = {1, 504, 3458, 282, 260, 1432, 28, 339, 5248, 314, 957};
  std::vector<float> a(static_cast<size_t>(vocab)), b(a.size());
  ASSERT_TRUE((*full)->prefill(prompt, a.data()).ok());
  ASSERT_TRUE((*rank)->prefill(prompt, b.data()).ok());
  EXPECT_EQ(a, b);
  // Two all-reduces per layer.
  EXPECT_EQ(reductions, 2 * model->config().n_layers);
  ASSERT_TRUE((*full)->capture_decode_graph().ok());
  auto cap = (*rank)->capture_decode_graph();
  ASSERT_TRUE(cap.ok()) << "NCCL inside graph capture: " << cap.to_string();
  for (int step = 0; step < 12; ++step) {
    auto ta = (*full)->greedy_token();
    ASSERT_TRUE(ta.ok());
    const bool graph = step % 2 == 1;
    ASSERT_TRUE((graph ? (*full)->decode_graph(*ta, a.data()) : (*full)->decode(*ta, a.data())).ok());
    ASSERT_TRUE((graph ? (*rank)->decode_graph(*ta, b.data()) : (*rank)->decode(*ta, b.data())).ok());
    EXPECT_EQ(a, b) << "step " << step << (graph ? " (graph)" : "");
  }
}

}  // namespace
}  // namespace kvgate::engine::cuda
