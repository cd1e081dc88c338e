// Launch planning of the CUDA backend (engine/cuda/launch_plan.h,
// sampling_plan.h): plain C++, runs without a GPU in every CI leg. The
// sampling oracle is checked against engine::Sampler itself, so the GPU
// test that compares the kernel with the oracle transitively compares it
// with the CPU sampler.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "engine/cuda/launch_plan.h"
#include "engine/cuda/sampling_plan.h"
#include "engine/sampler.h"

namespace kvgate::engine::cuda {
namespace {

// ---------------------------------------------------------------- GEMV

TEST(GemvPlan, Q4_1WorkspaceLayout) {
  auto p = plan_gemv(GgmlType::kQ4_1, 576, 1536, 3);
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(p->row_bytes, 48 * 20);
  EXPECT_EQ(p->grid_blocks, 144);
  EXPECT_EQ(p->block_threads, 128);
  EXPECT_EQ(p->token_passes, 1);
  EXPECT_EQ(p->quant_blocks, 3 * 48);
  EXPECT_EQ(p->acts_qs_offset, 0u);
  EXPECT_EQ(p->acts_d_offset, 4608u);         // 3 * 1536 int8, already 256-aligned
  EXPECT_EQ(p->acts_s_offset, 4608u + 768u);  // 144 floats = 576 B, rounded to 768
  EXPECT_EQ(p->workspace_bytes, 4608u + 768u + 576u);
}

TEST(GemvPlan, Q8_0AndF16Rows) {
  auto q8 = plan_gemv(GgmlType::kQ8_0, 49152, 576, 17);
  ASSERT_TRUE(q8.ok());
  EXPECT_EQ(q8->row_bytes, 18 * 34);
  EXPECT_EQ(q8->grid_blocks, 12288);
  EXPECT_EQ(q8->token_passes, 3);  // 8 + 8 + 1
  // Offsets are 256-aligned and hold their planes without overlap.
  EXPECT_EQ(q8->acts_d_offset % 256, 0u);
  EXPECT_EQ(q8->acts_s_offset % 256, 0u);
  EXPECT_GE(q8->acts_d_offset, 17u * 576u);
  EXPECT_GE(q8->acts_s_offset, q8->acts_d_offset + 17u * 18u * 4u);
  EXPECT_EQ(q8->workspace_bytes, q8->acts_s_offset + 17u * 18u * 4u);

  auto f16 = plan_gemv(GgmlType::kF16, 5, 6, 1);
  ASSERT_TRUE(f16.ok());
  EXPECT_EQ(f16->row_bytes, 12);
  EXPECT_EQ(f16->grid_blocks, 2);
  EXPECT_EQ(f16->workspace_bytes, 0u);
}

TEST(GemvPlan, RejectsWhatTheKernelsCannotTake) {
  EXPECT_EQ(plan_gemv(GgmlType::kQ4_0, 4, 32, 1).status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(plan_gemv(GgmlType::kBF16, 4, 32, 1).status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(plan_gemv(GgmlType::kF16, 4, 7, 1).status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(plan_gemv(GgmlType::kQ8_0, 4, 33, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_gemv(GgmlType::kQ4_1, 0, 32, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_gemv(GgmlType::kQ4_1, 4, 32, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_gemv(GgmlType::kQ4_1, 4, 0, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(gemv_supports(GgmlType::kQ4_1));
  EXPECT_FALSE(gemv_supports(GgmlType::kF32));
}

// ---------------------------------------------------------------- GEMM

TEST(GemmPlan, SizesAndLimits) {
  auto p = plan_gemm(GgmlType::kQ4_1, 1536, 576, 512);
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(p->weight_f16_bytes, 1536u * 576u * 2u);
  EXPECT_EQ(p->workspace_bytes, 512u * 576u * 2u);
  EXPECT_TRUE(plan_gemm(GgmlType::kF16, 4, 72, 1).ok());
  EXPECT_EQ(plan_gemm(GgmlType::kF16, 4, 70, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_gemm(GgmlType::kQ8_0, 4, 40, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_gemm(GgmlType::kQ4_0, 4, 64, 1).status().code(), StatusCode::kUnimplemented);
  EXPECT_FALSE(plan_gemm(GgmlType::kF16, 0, 64, 1).ok());
  EXPECT_FALSE(plan_gemm(GgmlType::kF16, 4, 64, 0).ok());
  EXPECT_FALSE(plan_gemm(GgmlType::kF16, int64_t{1} << 31, 64, 1).ok());
}

// ---------------------------------------------------------------- attention

AttentionShape shape(int64_t tasks, int64_t group, int64_t dim, int64_t max_rows,
                     int64_t sms = 132) {
  return {tasks, group, dim, /*page_tokens=*/16, max_rows, sms};
}

// Every row of every task length up to max_rows lies in exactly one split,
// no split is empty at max_rows, and the merge kernel's count of valid
// splits (ceil(rows / rows_per_split), capped) covers them.
TEST(AttentionPlan, SplitsPartitionEveryTaskLength) {
  for (int64_t tasks : {1, 3, 9, 90, 960}) {
    for (int64_t max_rows : {0, 1, 5, 63, 64, 65, 200, 1000, 4096, 16384, 131072}) {
      for (int64_t sms : {1, 108, 132}) {
        SCOPED_TRACE(::testing::Message() << tasks << " tasks, " << max_rows << " rows, " << sms);
        auto p = plan_decode_attention(shape(tasks, 3, 64, max_rows, sms));
        ASSERT_TRUE(p.ok()) << p.status().to_string();
        ASSERT_GE(p->n_splits, 1);
        ASSERT_LE(p->n_splits, kAttnMaxSplits);
        ASSERT_GE(p->n_splits * p->rows_per_split, max_rows);
        if (max_rows > 0) {
          ASSERT_LT((p->n_splits - 1) * p->rows_per_split, max_rows);
        }
        ASSERT_EQ(p->rows_per_split % kAttnWarps, 0);
        // No split shorter than the minimum unless a single one covers it all.
        if (p->n_splits > 1) {
          ASSERT_GE(p->rows_per_split, kAttnMinRowsPerSplit);
        }
        for (int64_t rows : {int64_t{0}, max_rows / 3, max_rows}) {
          const int64_t n_valid =
              std::min(p->n_splits, (rows + p->rows_per_split - 1) / p->rows_per_split);
          std::vector<int> seen(rows, 0);
          for (int64_t s = 0; s < n_valid; ++s) {
            for (int64_t r = s * p->rows_per_split; r < std::min(rows, (s + 1) * p->rows_per_split);
                 ++r) {
              ++seen[r];
            }
          }
          ASSERT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
        }
      }
    }
  }
}

TEST(AttentionPlan, FillsTheDeviceWithoutTinySplits) {
  // SmolLM2 one sequence, one layer: 3 KV heads at 4096 tokens on 132 SMs:
  // 4 blocks per SM wanted, 64 rows per split at least -> 64 splits.
  auto p = plan_decode_attention(shape(3, 3, 64, 4096));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->n_splits, 64);
  EXPECT_EQ(p->rows_per_split, 64);
  // A batch that already fills the device is not split.
  auto big = plan_decode_attention(shape(960, 4, 128, 2048));
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->n_splits, 1);
  EXPECT_EQ(big->rows_per_split, 2048);
  // A short context is one split.
  auto short_ctx = plan_decode_attention(shape(1, 4, 128, 40));
  ASSERT_TRUE(short_ctx.ok());
  EXPECT_EQ(short_ctx->n_splits, 1);
}

TEST(AttentionPlan, WorkspaceAndSharedMemory) {
  auto p = plan_decode_attention(shape(6, 4, 128, 1000));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->partial_stride, 130);
  EXPECT_EQ(p->workspace_bytes, size_t(6 * p->n_splits * 4 * 130) * sizeof(float));
  EXPECT_EQ(p->merge_blocks, 24);
  EXPECT_EQ(p->block_threads, kAttnWarps * 32);
  // Every accepted shape fits the 48 KiB a kernel gets without opting in.
  for (int64_t g = 1; g <= kAttnMaxGroup; ++g) {
    for (int64_t d = 1; d <= kAttnMaxHeadDim; ++d) {
      auto q = plan_decode_attention(shape(1, g, d, 100));
      if (!q.ok()) {
        EXPECT_GT(g * d, kAttnMaxGroupDims);
        continue;
      }
      ASSERT_LE(q->shared_bytes, 48u * 1024u) << g << " x " << d;
    }
  }
}

TEST(AttentionPlan, RejectsBadShapes) {
  EXPECT_EQ(plan_decode_attention(shape(0, 3, 64, 10)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_decode_attention(shape(1, 3, 64, -1)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_decode_attention(shape(1, 3, 64, 10, 0)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_decode_attention(shape(1, 3, 257, 10)).status().code(),
            StatusCode::kUnimplemented);
  EXPECT_EQ(plan_decode_attention(shape(1, 9, 64, 10)).status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(plan_decode_attention(shape(1, 8, 256, 10)).status().code(),
            StatusCode::kUnimplemented);
  EXPECT_EQ(plan_decode_attention(shape(70000, 1, 64, 10)).status().code(),
            StatusCode::kInvalidArgument);
  AttentionShape s = shape(1, 1, 64, 10);
  s.page_tokens = 0;
  EXPECT_EQ(plan_decode_attention(s).status().code(), StatusCode::kInvalidArgument);
}

TEST(AttentionPlan, CheckTasks) {
  auto p = plan_decode_attention(shape(2, 3, 64, 100));
  ASSERT_TRUE(p.ok());
  static const uint16_t* const kPages[1] = {nullptr};
  float buf[3 * 64];
  AttnTask ok_task;
  ok_task.near_k = ok_task.near_v = kPages;
  ok_task.near_tokens = 60;
  ok_task.far_k = ok_task.far_v = kPages;
  ok_task.far_tokens = 40;
  ok_task.q = ok_task.q_base = buf;
  ok_task.out = buf;
  AttnTask tasks[3] = {ok_task, ok_task, ok_task};
  EXPECT_TRUE(check_attn_tasks(tasks, 2, *p).ok());
  EXPECT_FALSE(check_attn_tasks(tasks, 3, *p).ok());  // more than planned
  EXPECT_FALSE(check_attn_tasks(tasks, 0, *p).ok());
  tasks[1].far_tokens = 41;  // 101 rows > max_rows
  EXPECT_EQ(check_attn_tasks(tasks, 2, *p).code(), StatusCode::kInvalidArgument);
  tasks[1] = ok_task;
  tasks[1].near_tokens = -1;
  EXPECT_FALSE(check_attn_tasks(tasks, 2, *p).ok());
  tasks[1] = ok_task;
  tasks[1].far_v = nullptr;
  EXPECT_FALSE(check_attn_tasks(tasks, 2, *p).ok());
  tasks[1].far_tokens = 0;  // an empty distant segment needs no pages
  EXPECT_TRUE(check_attn_tasks(tasks, 2, *p).ok());
  tasks[1].near_tokens = 0;  // but a task needs rows
  EXPECT_FALSE(check_attn_tasks(tasks, 2, *p).ok());
  tasks[1] = ok_task;
  tasks[1].q_base = nullptr;
  EXPECT_FALSE(check_attn_tasks(tasks, 2, *p).ok());
}

// ---------------------------------------------------------------- prefill attention

PrefillAttentionShape prefill_shape(int64_t queries, int64_t heads, int64_t kv_heads, int64_t d,
                                    int64_t context) {
  PrefillAttentionShape s;
  s.max_queries = queries;
  s.n_heads = heads;
  s.n_kv_heads = kv_heads;
  s.head_dim = d;
  s.max_context = context;
  return s;
}

// The shared memory the kernel carves (prefill_attention.cu): the tile's
// queries in fp32, one K tile with rows padded to head_dim + 2 halves, one V
// tile in fp16.
size_t prefill_shared(int64_t q_tile, int64_t d) {
  return static_cast<size_t>(q_tile * d * 4 + kPrefillKeyTile * (d + 2) * 2 +
                             kPrefillKeyTile * d * 2);
}

TEST(PrefillAttentionPlan, SmolLM2Shape) {
  // SmolLM2-135M: 9 query heads over 3 KV heads of 64, chunks of 512.
  auto p = plan_prefill_attention(prefill_shape(512, 9, 3, 64, 8192));
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(p->group, 3);
  EXPECT_EQ(p->queries_per_warp, 4);
  EXPECT_EQ(p->q_tile, 16);
  EXPECT_EQ(p->key_tile, 32);
  EXPECT_EQ(p->max_q_tiles, 32);  // 512 / 16
  EXPECT_EQ(p->block_threads, 128);
  EXPECT_EQ(p->k_row_halves, 66);
  EXPECT_EQ(p->shared_bytes, 16u * 64 * 4 + 32u * 66 * 2 + 32u * 64 * 2);  // 12416
  EXPECT_EQ(prefill_q_tiles(*p, 1), 1);
  EXPECT_EQ(prefill_q_tiles(*p, 16), 1);
  EXPECT_EQ(prefill_q_tiles(*p, 17), 2);
  EXPECT_EQ(prefill_q_tiles(*p, 500), 32);
}

TEST(PrefillAttentionPlan, Llama3Shape) {
  // Llama-3-8B: 32 query heads over 8 KV heads of 128, chunks of 4096.
  auto p = plan_prefill_attention(prefill_shape(4096, 32, 8, 128, 8192));
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(p->group, 4);
  EXPECT_EQ(p->q_tile, 16);
  EXPECT_EQ(p->max_q_tiles, 256);
  EXPECT_EQ(p->shared_bytes, 16u * 128 * 4 + 32u * 130 * 2 + 32u * 128 * 2);  // 24704
}

TEST(PrefillAttentionPlan, SharedMemoryWithinTheDefaultLimitForEveryHeadDim) {
  for (int64_t d = 2; d <= kPrefillMaxHeadDim; d += 2) {
    auto p = plan_prefill_attention(prefill_shape(100, 8, 2, d, 1000));
    ASSERT_TRUE(p.ok()) << "head_dim " << d << ": " << p.status().to_string();
    EXPECT_EQ(p->queries_per_warp, d <= 128 ? 4 : 2) << d;
    EXPECT_EQ(p->q_tile, kPrefillWarps * p->queries_per_warp) << d;
    EXPECT_EQ(p->shared_bytes, prefill_shared(p->q_tile, d)) << d;
    EXPECT_LE(p->shared_bytes, static_cast<size_t>(kPrefillMaxSharedBytes)) << d;
    EXPECT_LE(p->shared_bytes, 48u * 1024u) << d;
    // Every query of a full chunk lands in exactly one tile.
    EXPECT_GE(p->max_q_tiles * p->q_tile, 100) << d;
    EXPECT_LT((p->max_q_tiles - 1) * p->q_tile, 100) << d;
  }
  // The largest head dim: tiles of 8 queries keep it at 41088 bytes.
  auto p = plan_prefill_attention(prefill_shape(64, 4, 4, 256, 64));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->q_tile, 8);
  EXPECT_EQ(p->shared_bytes, 41088u);
}

TEST(PrefillAttentionPlan, RejectsWhatTheKernelCannotTake) {
  auto code = [](const PrefillAttentionShape& s) {
    return plan_prefill_attention(s).status().code();
  };
  EXPECT_EQ(code(prefill_shape(0, 8, 2, 64, 100)), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(prefill_shape(10, 0, 2, 64, 100)), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(prefill_shape(10, 8, 0, 64, 100)), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(prefill_shape(10, 8, 2, 0, 100)), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(prefill_shape(10, 8, 2, 64, 0)), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(prefill_shape(10, 9, 2, 64, 100)), StatusCode::kInvalidArgument);  // 9 % 2
  EXPECT_EQ(code(prefill_shape(10, 8, 2, 63, 100)), StatusCode::kUnimplemented);    // odd
  EXPECT_EQ(code(prefill_shape(10, 8, 2, 258, 100)), StatusCode::kUnimplemented);   // > 256
  EXPECT_EQ(code(prefill_shape(101, 8, 2, 64, 100)),
            StatusCode::kInvalidArgument);  // chunk > cache
  EXPECT_EQ(code(prefill_shape(10, 8, 2, 64, int64_t{1} << 31)), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(prefill_shape(10, 70000, 70000, 64, 100)),
            StatusCode::kInvalidArgument);  // grid y
  // The messages name the problem.
  auto odd = plan_prefill_attention(prefill_shape(10, 8, 2, 63, 100));
  EXPECT_NE(odd.status().message().find("head_dim 63"), std::string::npos)
      << odd.status().to_string();
  auto long_chunk = plan_prefill_attention(prefill_shape(101, 8, 2, 64, 100));
  EXPECT_NE(long_chunk.status().message().find("101 queries"), std::string::npos);
}

// ---------------------------------------------------------------- forward memory

ForwardMemoryShape llama3_8b_f16() {
  ForwardMemoryShape s;
  s.n_layers = 32;
  s.n_embd = 4096;
  s.n_ff = 14336;
  s.n_heads = 32;
  s.n_kv_heads = 8;
  s.head_dim = 128;
  s.n_vocab = 128256;
  s.layer_type = GgmlType::kF16;
  s.embd_type = GgmlType::kF16;
  s.tied_output = true;  // as the benchmark's synthetic model
  s.max_context = 4096 + 512;
  s.max_prefill = 4096;
  return s;
}

TEST(ForwardMemory, Llama3_8BInF16FitsAnH100) {
  auto m = plan_forward_memory(llama3_8b_f16());
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  // Per layer q, o: 4096 x 4096; k, v: 1024 x 4096; gate, up, down: 14336 x
  // 4096 elements, 2 bytes each; plus the tied 128256 x 4096 table.
  const size_t layer = (2ull * 4096 * 4096 + 2ull * 1024 * 4096 + 3ull * 14336 * 4096) * 2;
  EXPECT_EQ(layer, 436207616u);
  EXPECT_EQ(m->gemv_weight_bytes, 32 * layer + 128256ull * 4096 * 2);  // 15.0 GB
  EXPECT_EQ(m->embedding_bytes, 0u);
  EXPECT_EQ(m->gemm_weight_bytes, 0u);                        // F16 rows serve the GEMM as they are
  EXPECT_EQ(m->kv_cache_bytes, 32ull * 2 * 1024 * 4608 * 2);  // 0.6 GB
  // Activations of a 4096-token chunk: ~0.6 GB; the rest is small.
  EXPECT_GT(m->scratch_bytes, 4096ull * (2 * 4096 + 2 * 4096 + 2 * 1024 + 2 * 14336) * 4);
  EXPECT_LT(m->scratch_bytes, 2'000'000'000u);
  EXPECT_EQ(m->total_bytes, m->gemv_weight_bytes + m->kv_cache_bytes + m->scratch_bytes);
  EXPECT_LT(m->total_bytes, 20'000'000'000u);  // an 80 GB H100 holds it 4 times over
  // Untied (as Llama 3 ships): one more 1.05 GB table.
  ForwardMemoryShape untied = llama3_8b_f16();
  untied.tied_output = false;
  auto u = plan_forward_memory(untied);
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->embedding_bytes, 128256ull * 4096 * 2);
  EXPECT_EQ(u->total_bytes, m->total_bytes + 128256ull * 4096 * 2);
}

TEST(ForwardMemory, SmolLM2Q4_1) {
  ForwardMemoryShape s;
  s.n_layers = 30;
  s.n_embd = 576;
  s.n_ff = 1536;
  s.n_heads = 9;
  s.n_kv_heads = 3;
  s.head_dim = 64;
  s.n_vocab = 49152;
  s.layer_type = GgmlType::kQ4_1;
  s.embd_type = GgmlType::kQ8_0;
  s.max_context = 1000;
  s.max_prefill = 512;
  auto m = plan_forward_memory(s);
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  // Q4_1: 20 bytes per 32 weights. q, o: 576 x 576; k, v: 192 x 576;
  // gate, up: 1536 x 576; down: 576 x 1536. Q8_0 table: 34 per 32.
  const size_t layer = 2 * 576 * 18 * 20 + 2 * 192 * 18 * 20 + 2 * 1536 * 18 * 20 + 576 * 48 * 20;
  EXPECT_EQ(layer, 2211840u);
  EXPECT_EQ(m->gemv_weight_bytes, 30 * layer + 49152u * 18 * 34);
  EXPECT_EQ(m->gemm_weight_bytes, 30u * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576) * 2);
  EXPECT_EQ(m->kv_cache_bytes, 30u * 2 * 192 * 1000 * 2);
}

TEST(ForwardMemory, Rejections) {
  ForwardMemoryShape s = llama3_8b_f16();
  s.layer_type = GgmlType::kQ4_0;
  EXPECT_EQ(plan_forward_memory(s).status().code(), StatusCode::kUnimplemented);
  s = llama3_8b_f16();
  s.n_kv_heads = 5;
  EXPECT_EQ(plan_forward_memory(s).status().code(), StatusCode::kInvalidArgument);
  s = llama3_8b_f16();
  s.max_prefill = 0;
  EXPECT_EQ(plan_forward_memory(s).status().code(), StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------- copies

TEST(PageCopyPlan, SizesAndVectorization) {
  auto p = plan_page_copy(10, 4096);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->staging_bytes, 40960u);
  EXPECT_TRUE(p->vectorized);
  auto odd = plan_page_copy(3, 100);
  ASSERT_TRUE(odd.ok());
  EXPECT_FALSE(odd->vectorized);
  EXPECT_EQ(plan_page_copy(0, 64)->staging_bytes, 0u);
  EXPECT_FALSE(plan_page_copy(-1, 64).ok());
  EXPECT_FALSE(plan_page_copy(1, 0).ok());
  EXPECT_FALSE(plan_page_copy(int64_t{1} << 40, int64_t{1} << 40).ok());
}

// ---------------------------------------------------------------- sampling

std::vector<float> random_logits(size_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

SampleRow row_of(const SamplingParams& p, double u) {
  return {p.temperature, p.top_k, p.top_p, p.min_p, u};
}

// The oracle with u = sampling_uniform(mt19937_64(seed)) picks exactly
// Sampler's token (whenever at most 1024 candidates survive top-k), for
// many seeds and parameter sets, including ties and a small vocabulary.
TEST(SamplingPlan, ReferenceEqualsSamplerGivenTheSameSeed) {
  std::vector<SamplingParams> params;
  for (float temp : {0.0f, 0.5f, 1.0f, 1.7f}) {
    for (int32_t top_k : {0, 1, 5, 40, 1024}) {
      for (float top_p : {1.0f, 0.9f, 0.3f}) {
        for (float min_p : {0.0f, 0.05f}) {
          SamplingParams p;
          p.temperature = temp;
          p.top_k = top_k;
          p.top_p = top_p;
          p.min_p = min_p;
          params.push_back(p);
        }
      }
    }
  }
  std::vector<float> small_mut = random_logits(300, 1, 2.0f);
  for (int i = 0; i < 300; i += 7) small_mut[i] = small_mut[3];  // ties
  const std::vector<float> small = small_mut;
  const std::vector<float> large = random_logits(5000, 2, 3.0f);
  int checked = 0;
  for (const auto& base : params) {
    for (uint64_t seed = 0; seed < 12; ++seed) {
      SamplingParams p = base;
      p.seed = seed;
      for (const std::vector<float>* logits : {&small, &large}) {
        // Sampler keeps everything when top_k is off: with a large vocab the
        // oracle matches only if top-p stops within 1024 (checked below).
        if (logits == &large && p.top_k == 0 && p.temperature > 0.0f) continue;
        Sampler sampler(p);
        const int32_t want = sampler.sample(*logits, {});
        std::mt19937_64 rng(seed);
        const double u = sampling_uniform(rng);
        ASSERT_EQ(sample_reference(*logits, row_of(p, u)), want)
            << "temp " << p.temperature << " top_k " << p.top_k << " top_p " << p.top_p << " min_p "
            << p.min_p << " seed " << seed;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

// Top-k off, large vocabulary: equal to Sampler when top-p stops inside the
// 1024 best; otherwise never outside them.
TEST(SamplingPlan, ReferenceTruncatesTo1024Candidates) {
  const std::vector<float> logits = random_logits(20000, 3, 4.0f);
  std::vector<float> sorted = logits;
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  const float cut = sorted[kSampleMaxCandidates - 1];
  for (uint64_t seed = 0; seed < 200; ++seed) {
    SamplingParams p;
    p.temperature = 1.0f;
    p.top_p = 0.5f;  // with scale-4 logits the top few hundred hold half the mass
    p.seed = seed;
    Sampler sampler(p);
    const int32_t want = sampler.sample(logits, {});
    std::mt19937_64 rng(seed);
    const double u = sampling_uniform(rng);
    ASSERT_EQ(sample_reference(logits, row_of(p, u)), want) << seed;
    SampleRow flat{3.0f, 0, 1.0f, 0.0f, u};  // hot: mass spreads past 1024
    const int32_t got = sample_reference(logits, flat);
    ASSERT_GE(logits[got], cut) << seed;
  }
}

TEST(SamplingPlan, GreedyFollowsArgmaxRules) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const SampleRow greedy{};
  EXPECT_EQ(sample_reference(std::vector<float>{1, 3, 3, 2}, greedy), 1);
  EXPECT_EQ(sample_reference(std::vector<float>{nan, 1, nan, 2}, greedy), 3);
  EXPECT_EQ(sample_reference(std::vector<float>{-inf, -inf}, greedy), 0);
  EXPECT_EQ(sample_reference(std::vector<float>{nan, -inf, nan}, greedy), 0);
  for (const auto& v : {std::vector<float>{1, 3, 3, 2}, std::vector<float>{nan, 1, nan, 2},
                        std::vector<float>{-inf, -inf}}) {
    EXPECT_EQ(sample_reference(v, greedy), argmax(v));
  }
  // NaN is never sampled either.
  EXPECT_EQ(sample_reference(std::vector<float>{nan, 0.5f, nan}, SampleRow{1.0f, 0, 1.0f, 0, 0.99}),
            1);
}

TEST(SamplingPlan, ChecksRowsAndShapes) {
  EXPECT_TRUE(check_sample_row(SampleRow{}).ok());
  EXPECT_TRUE(check_sample_row(SampleRow{0.7f, 40, 0.95f, 0.05f, 0.5}).ok());
  EXPECT_FALSE(check_sample_row(SampleRow{-1.0f, 0, 1.0f, 0.0f, 0.0}).ok());
  EXPECT_FALSE(check_sample_row(SampleRow{std::nanf(""), 0, 1.0f, 0.0f, 0.0}).ok());
  EXPECT_FALSE(check_sample_row(SampleRow{1.0f, -1, 1.0f, 0.0f, 0.0}).ok());
  EXPECT_FALSE(check_sample_row(SampleRow{1.0f, 0, 0.0f, 0.0f, 0.0}).ok());
  EXPECT_FALSE(check_sample_row(SampleRow{1.0f, 0, 1.0f, 1.5f, 0.0}).ok());
  EXPECT_FALSE(check_sample_row(SampleRow{1.0f, 0, 1.0f, 0.0f, 1.0}).ok());
  EXPECT_FALSE(check_sample_row(SampleRow{1.0f, 0, 1.0f, 0.0f, -0.1}).ok());
  EXPECT_TRUE(check_sampling_shape(1, 49152).ok());
  EXPECT_FALSE(check_sampling_shape(0, 49152).ok());
  EXPECT_FALSE(check_sampling_shape(1, 0).ok());
  EXPECT_FALSE(check_sampling_shape(1, int64_t{1} << 31).ok());
  EXPECT_LE(sampling_shared_bytes(), 48u * 1024u);
}

TEST(SamplingPlan, UniformIsInUnitInterval) {
  std::mt19937_64 rng(5);
  for (int i = 0; i < 10000; ++i) {
    const double u = sampling_uniform(rng);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
  }
}

}  // namespace
}  // namespace kvgate::engine::cuda
