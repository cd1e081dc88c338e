// Tensor-parallel forward (engine/tp) on the real model: the shards are
// exact slices of the model's weights, world 1 reproduces CpuForward bit for
// bit, and world 3 (three threads over an InProcessGroup) agrees with it
// within the rounding of the reordered partial sums.
#include "engine/tp/tp_forward.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "engine/cpu/quant.h"
#include "engine/tp/collective.h"
#include "engine/tp/tp_plan.h"
#include "engine/tp/tp_shard.h"
#include "tests/unit/engine/test_model.h"

#if KVGATE_HAVE_NCCL
#include <cuda_runtime_api.h>

#include "engine/tp/nccl_collective.h"
#endif

namespace kvgate::engine::tp {
namespace {

#define REQUIRE_MODEL() KVGATE_REQUIRE_MODEL()

constexpr int kGreedySteps = 8;

const char* const kPrompts[] = {
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Water boils at a temperature of",
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4, 5, 6, 7,",
};

std::vector<int32_t> tokenize(const testing::TestModel* L, const char* text) {
  return L->tokenizer->encode(text, /*add_special=*/false, /*parse_special=*/true);
}

int64_t argmax(const std::vector<float>& v) {
  return std::max_element(v.begin(), v.end()) - v.begin();
}

// Top-1 minus top-2.
float margin(const std::vector<float>& v) {
  std::vector<float> c(v);
  std::partial_sort(c.begin(), c.begin() + 2, c.end(), std::greater<float>());
  return c[0] - c[1];
}

struct RunLog {
  std::vector<std::vector<float>> logits;  // prefill, then one per greedy step
  std::vector<int32_t> greedy;             // kGreedySteps tokens
};

// The reference: CpuForward prefill, then greedy single-token steps.
RunLog reference_run(const LlamaModel& model, const std::vector<int32_t>& prompt, int64_t chunk) {
  ForwardOptions o;
  o.n_threads = 1;
  o.max_batch_tokens = chunk;
  CpuForward fwd(model, o);
  KvCache cache(model.config(), static_cast<int64_t>(prompt.size()) + kGreedySteps);
  RunLog out;
  std::vector<float> logits(model.config().n_vocab);
  EXPECT_TRUE(fwd.prefill(cache, prompt, logits.data()).ok());
  out.logits.push_back(logits);
  for (int s = 0; s < kGreedySteps; ++s) {
    const auto tok = static_cast<int32_t>(argmax(logits));
    out.greedy.push_back(tok);
    if (s + 1 == kGreedySteps) break;
    BatchItem item{&cache, std::span<const int32_t>(&out.greedy.back(), 1), true};
    EXPECT_TRUE(fwd.forward(std::span<const BatchItem>(&item, 1), logits.data()).ok());
    out.logits.push_back(logits);
  }
  return out;
}

// One rank's run: the same calls through TpForward.
Status tp_rank_run(const TpShard& shard, Collective& comm, const std::vector<int32_t>& prompt,
                   int64_t chunk, RunLog* out) {
  TpForwardOptions o;
  o.n_threads = 1;
  o.max_batch_tokens = chunk;
  KVGATE_ASSIGN_OR_RETURN(auto fwd, TpForward::create(shard, comm, o));
  KVGATE_RETURN_IF_ERROR(fwd->reset(static_cast<int64_t>(prompt.size()) + kGreedySteps));
  std::vector<float> logits(shard.config().n_vocab);
  KVGATE_RETURN_IF_ERROR(fwd->forward(prompt, logits.data()));
  out->logits.push_back(logits);
  for (int s = 0; s < kGreedySteps; ++s) {
    // Every rank holds the same logits, so every rank picks the same token
    // without a broadcast.
    const auto tok = static_cast<int32_t>(argmax(logits));
    out->greedy.push_back(tok);
    if (s + 1 == kGreedySteps) break;
    KVGATE_RETURN_IF_ERROR(fwd->forward(std::span<const int32_t>(&out->greedy.back(), 1), logits.data()));
    out->logits.push_back(logits);
  }
  return Status();
}

// All ranks of a world, one thread each.
std::vector<RunLog> tp_run(const LlamaModel& model, int world, const std::vector<int32_t>& prompt,
                        int64_t chunk) {
  auto plan = plan_tensor_parallel(model.config(), world);
  EXPECT_TRUE(plan.ok()) << plan.status().to_string();
  std::vector<std::unique_ptr<TpShard>> shards;
  for (int r = 0; r < world; ++r) {
    auto s = TpShard::build(model, *plan, r);
    EXPECT_TRUE(s.ok()) << s.status().to_string();
    shards.push_back(std::move(*s));
  }
  auto group = InProcessGroup::create(world);
  EXPECT_TRUE(group.ok());
  std::vector<RunLog> runs(world);
  std::vector<Status> st(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] { st[r] = tp_rank_run(*shards[r], *(*group)[r], prompt, chunk, &runs[r]); });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) EXPECT_TRUE(st[r].ok()) << "rank " << r << ": " << st[r].to_string();
  return runs;
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// ---- Shards are exact slices of the model's weights.

TEST(TpShard, SlicesAreTheModelsBlocksBitForBit) {
  REQUIRE_MODEL();
  const LlamaModel& m = *L->model;
  const int world = 3;
  auto plan = plan_tensor_parallel(m.config(), world);
  ASSERT_TRUE(plan.ok());
  std::vector<std::unique_ptr<TpShard>> shards;
  for (int r = 0; r < world; ++r) {
    auto s = TpShard::build(m, *plan, r);
    ASSERT_TRUE(s.ok()) << s.status().to_string();
    shards.push_back(std::move(*s));
  }
  struct Pick {
    TpWeight which;
    cpu::WeightView LayerWeights::*full;
    cpu::WeightView TpLayerShard::*part;
  };
  const Pick picks[] = {
      {TpWeight::kWq, &LayerWeights::wq, &TpLayerShard::wq},
      {TpWeight::kWk, &LayerWeights::wk, &TpLayerShard::wk},
      {TpWeight::kWv, &LayerWeights::wv, &TpLayerShard::wv},
      {TpWeight::kWo, &LayerWeights::wo, &TpLayerShard::wo},
      {TpWeight::kWGate, &LayerWeights::w_gate, &TpLayerShard::w_gate},
      {TpWeight::kWUp, &LayerWeights::w_up, &TpLayerShard::w_up},
      {TpWeight::kWDown, &LayerWeights::w_down, &TpLayerShard::w_down},
  };
  for (int64_t l : {int64_t{0}, int64_t{17}, m.config().n_layers - 1}) {
    for (const Pick& p : picks) {
      SCOPED_TRACE(std::string(tp_weight_name(p.which)) + " layer " + std::to_string(l));
      const cpu::WeightView& full = m.layers()[l].*p.full;
      const uint64_t full_row = *ggml_row_bytes(full.type, full.cols);
      std::vector<float> a(full.cols), b(full.cols);
      for (int r = 0; r < world; ++r) {
        const cpu::WeightView& part = shards[r]->layers()[l].*p.part;
        const TpRange rg = plan->range(r, p.which);
        EXPECT_EQ(part.type, full.type);
        EXPECT_TRUE(cpu::check_weight(part).ok());
        const uint64_t part_row = *ggml_row_bytes(part.type, part.cols);
        const auto* fb = static_cast<const uint8_t*>(full.data);
        const auto* pb = static_cast<const uint8_t*>(part.data);
        if (tp_split_of(p.which) == TpSplit::kColumn) {
          ASSERT_EQ(part.rows, rg.size());
          ASSERT_EQ(part.cols, full.cols);
          ASSERT_EQ(std::memcmp(pb, fb + rg.begin * full_row, rg.size() * full_row), 0);
          // And dequantized: shard row i is model row begin + i.
          cpu::dequantize_row(full.type, fb + (rg.begin + 1) * full_row, a.data(), full.cols);
          cpu::dequantize_row(part.type, pb + part_row, b.data(), part.cols);
          ASSERT_EQ(a, b);
        } else {
          ASSERT_EQ(part.rows, full.rows);
          ASSERT_EQ(part.cols, rg.size());
          const uint64_t off = *ggml_row_bytes(full.type, rg.begin);
          for (int64_t row = 0; row < full.rows; ++row) {
            ASSERT_EQ(std::memcmp(pb + row * part_row, fb + row * full_row + off, part_row), 0) << row;
          }
          // Dequantized: row 5's columns [begin, end) of the model.
          cpu::dequantize_row(full.type, fb + 5 * full_row, a.data(), full.cols);
          cpu::dequantize_row(part.type, pb + 5 * part_row, b.data(), part.cols);
          ASSERT_TRUE(std::equal(b.begin(), b.begin() + part.cols, a.begin() + rg.begin));
        }
      }
    }
  }
  // Replicated weights are the model's own.
  EXPECT_EQ(shards[2]->layers()[3].attn_norm, m.layers()[3].attn_norm);
  EXPECT_EQ(shards[1]->output().data, m.output().data);
  // The three shards together hold exactly the model's sharded bytes.
  int64_t total = 0, model_bytes = 0;
  for (const auto& s : shards) total += s->owned_bytes();
  for (const auto& lw : m.layers()) {
    for (const Pick& p : picks) {
      const cpu::WeightView& w = lw.*p.full;
      model_bytes += static_cast<int64_t>(*ggml_row_bytes(w.type, w.cols)) * w.rows;
    }
  }
  EXPECT_EQ(total, model_bytes);
}

TEST(TpShard, BadRankOrPlanIsInvalidArgument) {
  REQUIRE_MODEL();
  auto plan = plan_tensor_parallel(L->model->config(), 3);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(TpShard::build(*L->model, *plan, 3).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(TpShard::build(*L->model, *plan, -1).status().code(), StatusCode::kInvalidArgument);
  LlamaConfig other = L->model->config();
  other.n_ff = 1024;
  auto other_plan = plan_tensor_parallel(other, 3);
  ASSERT_TRUE(other_plan.ok());
  EXPECT_EQ(TpShard::build(*L->model, *other_plan, 0).status().code(), StatusCode::kInvalidArgument);
}

TEST(TpForward, RejectsMismatchedCollectiveAndBadTokens) {
  REQUIRE_MODEL();
  auto plan = plan_tensor_parallel(L->model->config(), 3);
  ASSERT_TRUE(plan.ok());
  auto shard = TpShard::build(*L->model, *plan, 1);
  ASSERT_TRUE(shard.ok());
  auto group = InProcessGroup::create(3);
  ASSERT_TRUE(group.ok());
  EXPECT_EQ(TpForward::create(**shard, *(*group)[0], {}).status().code(), StatusCode::kInvalidArgument);

  // World 1: input errors before any collective call.
  auto plan1 = plan_tensor_parallel(L->model->config(), 1);
  auto shard1 = TpShard::build(*L->model, *plan1, 0);
  ASSERT_TRUE(shard1.ok());
  auto g1 = InProcessGroup::create(1);
  auto fwd = TpForward::create(**shard1, *(*g1)[0], {});
  ASSERT_TRUE(fwd.ok());
  std::vector<float> logits(L->model->config().n_vocab);
  const std::vector<int32_t> bad = {1, 2, 49152};
  Status s = (*fwd)->prefill(bad, logits.data());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("49152"), std::string::npos) << s.to_string();
  EXPECT_EQ((*fwd)->prefill({}, logits.data()).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE((*fwd)->reset(2).ok());
  const std::vector<int32_t> three = {1, 2, 3};
  EXPECT_EQ((*fwd)->forward(three, logits.data()).code(), StatusCode::kOutOfRange);
}

// ---- World 1: the same kernels in the same order as CpuForward.

TEST(TpForward, World1IsBitIdenticalToCpuForward) {
  REQUIRE_MODEL();
  const LlamaModel& m = *L->model;
  // 512: one step per prompt, as prefill() by default; 8: several chunks,
  // some of them small (the small-batch matmul kernel).
  for (int64_t chunk : {int64_t{512}, int64_t{8}}) {
    for (const char* text : kPrompts) {
      SCOPED_TRACE(std::string(text) + " chunk " + std::to_string(chunk));
      const auto prompt = tokenize(L, text);
      ASSERT_GE(prompt.size(), 4u);
      const RunLog ref = reference_run(m, prompt, chunk);
      const std::vector<RunLog> tp = tp_run(m, 1, prompt, chunk);
      ASSERT_EQ(tp[0].logits.size(), ref.logits.size());
      for (size_t s = 0; s < ref.logits.size(); ++s) {
        ASSERT_TRUE(bit_equal(tp[0].logits[s], ref.logits[s])) << "step " << s;
      }
      EXPECT_EQ(tp[0].greedy, ref.greedy);
    }
  }
}

// ---- World 3 against CpuForward.
//
// Tolerance. The prefill's argmax is greedy[0], checked with the
// continuation below. Everything column-parallel is bit-identical to world 1: a
// matmul row's dot product does not depend on which other rows are computed
// (the kernels split rows, never a row's K, between threads), RoPE acts per
// head, and attention per (query, head) is CpuForward's code. What changes
// is the row-parallel wo and w_down: each rank sums the block products of
// its K range (192 of 576 resp. 512 of 1536 columns), then the ranks' three
// partials are added. The block products themselves are unchanged (the
// activations are quantized per 32-column block, and the splits are on block
// boundaries), so only the float summation order differs: for a sum of m
// terms the reordering moves the result by at most about 2*(m-1)*u*sum|t|
// (u = 2^-24), i.e. ~1e-7 relative per output. Those ulp-level changes are
// then amplified the way model_test describes for llama.cpp vs kvgate: an
// activation within one rounding step of a Q8 quantization boundary in a
// later layer flips by a whole quantum (amax/127), and across 30 layers such
// flips move logits by tenths. That is the engine's own noise floor, and
// any other change of summation order shows it too: on these six prompts
// CpuForward's prefill logits with AVX2 vs AVX-512 kernels differ by up to
// 1.00 (0.52-1.00), scalar vs AVX-512 by up to 0.92 (measured once with
// a throw-away comparison; model_test also puts kvgate 0.05-0.53 from an
// exact float64 pass). World 3 vs world 1 measured 0.49-0.90 -- the same
// floor, as the argument predicts; a wrong mapping lands far outside it
// (tried: two ranks' w_down swapped in every layer moved logits by 24-42,
// their wo swapped in one layer of 30 by 1.9-4.0). The bound is 1.5x
// the largest reorder difference measured: 1.5, for logits of magnitude
// 10-30. Near-ties are decided by rounding: where the reference's top-2
// margin is below kTieMargin the greedy choice may legitimately differ (it
// did, at margins 0.10-0.21), and a continuation is compared only up to
// there; at least half of all greedy steps must still be compared.
constexpr float kLogitTolerance = 1.5f;
constexpr float kTieMargin = 0.5f;

TEST(TpForward, World3MatchesCpuForwardWithinRounding) {
  REQUIRE_MODEL();
  const LlamaModel& m = *L->model;
  float worst = 0.0f;
  int steps_compared = 0, prompts_fully_compared = 0;
  for (const char* text : kPrompts) {
    SCOPED_TRACE(text);
    const auto prompt = tokenize(L, text);
    const RunLog ref = reference_run(m, prompt, 512);
    const std::vector<RunLog> tp = tp_run(m, 3, prompt, 512);
    ASSERT_EQ(tp.size(), 3u);
    // The all-reduce hands every rank the same residual stream: the ranks'
    // logits and choices are identical, bit for bit.
    for (int r = 1; r < 3; ++r) {
      ASSERT_EQ(tp[r].logits.size(), tp[0].logits.size());
      for (size_t s = 0; s < tp[0].logits.size(); ++s) {
        ASSERT_TRUE(bit_equal(tp[r].logits[s], tp[0].logits[s])) << "rank " << r << " step " << s;
      }
      EXPECT_EQ(tp[r].greedy, tp[0].greedy);
    }
    // Prefill logits: within tolerance, same argmax unless tied.
    const RunLog& got = tp[0];
    bool diverged = false;
    for (size_t s = 0; s < ref.logits.size() && !diverged; ++s) {
      float diff = 0.0f;
      for (size_t i = 0; i < ref.logits[s].size(); ++i) {
        diff = std::max(diff, std::fabs(got.logits[s][i] - ref.logits[s][i]));
      }
      worst = std::max(worst, diff);
      EXPECT_LE(diff, kLogitTolerance) << "step " << s;
      ++steps_compared;
      if (got.greedy[s] != ref.greedy[s]) {
        EXPECT_LT(margin(ref.logits[s]), kTieMargin)
            << "step " << s << ": greedy token " << got.greedy[s] << " vs " << ref.greedy[s]
            << " with a clear margin";
        std::printf("diverged at step %zu margin %.3f\n", s, margin(ref.logits[s]));
        diverged = true;  // the sequences differ from here on
      }
    }
    if (!diverged) {
      EXPECT_EQ(got.greedy, ref.greedy);
      ++prompts_fully_compared;
    }
  }
  // The tie rule must not have skipped the comparison wholesale.
  EXPECT_GE(2 * steps_compared, kGreedySteps * static_cast<int>(std::size(kPrompts)));
  std::printf("world 3 vs CpuForward: max |logit diff| %.4f over %d steps, %d/%zu prompts' greedy "
              "continuations fully equal\n",
              worst, steps_compared, prompts_fully_compared, std::size(kPrompts));
}

#if KVGATE_HAVE_NCCL
// ---- NcclCollective, the one path a single GPU can run: a group of one.
// Built with -DKVGATE_NCCL=ON; skips without a GPU (UNVERIFIED so far: no
// GPU was available when it was written).
TEST(NcclCollective, SingleRankIsTheIdentityOnDeviceMemory) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no CUDA device";
  auto id = NcclCollective::new_unique_id();
  ASSERT_TRUE(id.ok()) << id.status().to_string();
  NcclCollectiveOptions o;
  o.timeout = std::chrono::milliseconds(20000);
  auto comm = NcclCollective::create(*id, 0, 1, o);
  ASSERT_TRUE(comm.ok()) << comm.status().to_string();
  EXPECT_EQ((*comm)->rank(), 0);
  EXPECT_EQ((*comm)->world(), 1);
  const size_t n = 4099;
  std::vector<float> host(n), back(n);
  for (size_t i = 0; i < n; ++i) host[i] = std::ldexp(1.0f + 0.37f * static_cast<float>(i), -static_cast<int>(i % 40));
  void* raw = nullptr;
  ASSERT_EQ(cudaMalloc(&raw, n * sizeof(float)), cudaSuccess);
  auto* dev = static_cast<float*>(raw);
  ASSERT_EQ(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  Status s = (*comm)->all_reduce_sum(dev, n);
  EXPECT_TRUE(s.ok()) << s.to_string();
  EXPECT_TRUE((*comm)->broadcast(dev, n * sizeof(float), 0).ok());
  EXPECT_TRUE((*comm)->barrier().ok());
  ASSERT_EQ(cudaMemcpy(back.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(bit_equal(back, host));
  // Host memory is refused, not handed to NCCL.
  EXPECT_EQ((*comm)->all_reduce_sum(host.data(), n).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->broadcast(dev, 4, 1).code(), StatusCode::kInvalidArgument);
  cudaFree(dev);
}

TEST(NcclCollective, BadRankIsInvalidArgument) {
  NcclUniqueIdBytes id{};
  EXPECT_EQ(NcclCollective::create(id, 1, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclCollective::create(id, 0, 0).status().code(), StatusCode::kInvalidArgument);
}
#endif

}  // namespace
}  // namespace kvgate::engine::tp
