// Launch planning for the CUDA kernels: grid shapes, the split of decode
// attention across thread blocks, workspace sizes, and argument validation.
//
// Plain C++ (no CUDA header), built into kvgate_engine_cuda_plan whether or
// not the CUDA backend is, and unit-tested in every CI leg
// (tests/unit/engine_cuda). As in FlashInfer, a plan is made once per shape
// (per model, or per batch capacity) on the host; the launch it describes is
// then cheap and fixed-shape, so it can be captured into a CUDA graph.
//
// Pure functions; thread-safe; no failure other than the returned Status:
// INVALID_ARGUMENT names the bad size, UNIMPLEMENTED a weight type or shape
// the kernels do not handle.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"
#include "engine/cuda/kernel_params.h"
#include "engine/ggml_types.h"

namespace kvgate::engine::cuda {

// ---------------------------------------------------------------- GEMV

// Decode GEMV y[t][r] = W[r] . x[t] for t < n_tokens, W in ggml layout
// (rows of `cols` elements, row_bytes each). Q4_1 and Q8_0 weights meet
// activations quantized to 8 bits per block of 32 (Q8_1 / Q8_0, exactly as
// engine/cpu/matmul.h), in a workspace the plan sizes:
//   qs int8  [n_tokens][cols]        at acts_qs_offset
//   d  float [n_tokens][cols / 32]   at acts_d_offset
//   s  float [n_tokens][cols / 32]   at acts_s_offset (Q8_1's d * sum(q))
// F16 weights need no workspace (activations are rounded to fp16 on load).
struct GemvPlan {
  GgmlType type = GgmlType::kF16;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t n_tokens = 0;
  int64_t row_bytes = 0;
  int64_t grid_blocks = 0;   // ceil(rows / kGemvWarps)
  int block_threads = 0;     // kGemvWarps * 32
  int64_t token_passes = 0;  // ceil(n_tokens / kGemvMaxTokens)
  int64_t quant_blocks = 0;  // n_tokens * cols / 32 activation blocks (0 for F16)
  size_t acts_qs_offset = 0;
  size_t acts_d_offset = 0;
  size_t acts_s_offset = 0;
  size_t workspace_bytes = 0;  // 0 for F16
};

// F16, Q4_1, Q8_0.
bool gemv_supports(GgmlType type);

// rows, cols, n_tokens >= 1; cols a multiple of 32 for Q4_1/Q8_0 and of 2
// for F16 (rows stay 4-byte aligned); sizes below 2^31 elements per row and
// rows * row_bytes within int64.
Result<GemvPlan> plan_gemv(GgmlType type, int64_t rows, int64_t cols, int64_t n_tokens);

// ---------------------------------------------------------------- GEMM

// Prefill GEMM through cuBLAS (gemm.h): W rows dequantized once to fp16,
// activations rounded to fp16 into a workspace of max_tokens x cols halves,
// fp32 accumulation. F16, Q4_1 and Q8_0 sources (as GEMV); cols a multiple
// of 8 so fp16 rows stay 16-byte aligned for the tensor cores.
struct GemmPlan {
  GgmlType source_type = GgmlType::kF16;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t max_tokens = 0;
  size_t weight_f16_bytes = 0;  // rows * cols * 2
  size_t workspace_bytes = 0;   // max_tokens * cols * 2
};
Result<GemmPlan> plan_gemm(GgmlType source_type, int64_t rows, int64_t cols, int64_t max_tokens);

// ---------------------------------------------------------------- attention

struct AttentionShape {
  int64_t n_tasks = 0;  // (sequence, layer, KV head) tasks in one launch
  int64_t group = 0;    // query heads per KV head
  int64_t head_dim = 0;
  int64_t page_tokens = 0;  // rows per page
  int64_t max_rows = 0;     // bound on near_tokens + far_tokens of every task
  int64_t sm_count = 0;     // multiprocessors of the device
};

// Each task's rows (proximal first, then distant) are cut into n_splits
// chunks of rows_per_split; block (split, task) writes one partial (max,
// sum of exponentials, unnormalized accumulator) per query head into the
// workspace at float offset ((task * n_splits + split) * group + g) *
// partial_stride: [max, sum, acc[head_dim]]. The merge kernel combines a
// task's splits by log-sum-exp. Splits past a task's rows are empty.
struct AttentionPlan {
  AttentionShape shape;
  int64_t n_splits = 0;
  int64_t rows_per_split = 0;
  int64_t partial_stride = 0;  // head_dim + 2 floats
  size_t workspace_bytes = 0;
  int block_threads = 0;     // kAttnWarps * 32
  size_t shared_bytes = 0;   // dynamic shared memory of the split kernel
  int64_t merge_blocks = 0;  // n_tasks * group, kAttnMergeThreads threads each
};

// Splits aim at ~4 blocks per multiprocessor over all tasks, never below
// kAttnMinRowsPerSplit rows (a short context stays in one block) nor above
// kAttnMaxSplits. Errors: any size < 1 (max_rows may be 0), head_dim >
// kAttnMaxHeadDim, group > kAttnMaxGroup, group * head_dim >
// kAttnMaxGroupDims, grid dimensions past CUDA's limits.
Result<AttentionPlan> plan_decode_attention(const AttentionShape& shape);

// Host-side task records against the plan: n_tasks in [1, shape.n_tasks],
// token counts >= 0 with near + far <= shape.max_rows, and q, q_base, out
// and the page lists of every non-empty segment set. The kernel cannot check
// device-resident records (rows past the plan would be silently skipped),
// so this is the caller's gate before uploading them.
Status check_attn_tasks(const AttnTask* tasks, int64_t n_tasks, const AttentionPlan& plan);

// ---------------------------------------------------------------- prefill attention

// Causal prefill attention over a dense fp16 cache (one sequence): queries
// at positions [past, past + n) attend to keys [0, past + n) of their KV
// head (GQA: query head q uses KV head q / (n_heads / n_kv_heads)). The
// cache holds, per KV head, max_context rows of head_dim fp16 (K and V in
// separate arrays, as engine::KvCache's layer slices).
struct PrefillAttentionShape {
  int64_t max_queries = 0;  // queries per launch (the prefill chunk)
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_context = 0;  // cache rows per KV head; past + n <= this
};

// Grid (q_tiles, n_heads) of block_threads threads; q_tile =
// kPrefillWarps * queries_per_warp queries per block (4 per warp up to
// head_dim 128, 2 above, so shared memory stays within
// kPrefillMaxSharedBytes). Shared memory: the tile's queries as fp32
// (rounded to fp16), and one key tile of K (rows padded by 2 halves: the
// lanes' row reads fall in distinct banks) and V as fp16.
struct PrefillAttentionPlan {
  PrefillAttentionShape shape;
  int64_t group = 0;  // query heads per KV head
  int queries_per_warp = 0;
  int64_t q_tile = 0;
  int64_t key_tile = 0;     // kPrefillKeyTile
  int64_t max_q_tiles = 0;  // grid x for max_queries
  int block_threads = 0;
  int64_t k_row_halves = 0;  // head_dim + 2
  size_t shared_bytes = 0;
};

// Errors: a size < 1, n_heads not a multiple of n_kv_heads, max_queries >
// max_context (INVALID_ARGUMENT); odd head_dim or head_dim >
// kPrefillMaxHeadDim (UNIMPLEMENTED); grid or cache sizes past CUDA's or
// int32's limits (INVALID_ARGUMENT).
Result<PrefillAttentionPlan> plan_prefill_attention(const PrefillAttentionShape& shape);

// Query tiles (grid x) for a launch of n_queries.
inline int64_t prefill_q_tiles(const PrefillAttentionPlan& plan, int64_t n_queries) {
  return (n_queries + plan.q_tile - 1) / plan.q_tile;
}

// ---------------------------------------------------------------- forward memory

// Device memory of a CudaForward (cuda_forward.h) for a model shape and its
// options, counted on the host before anything is uploaded: does the model
// fit? Layer matrices of one type (`layer_type`: F16, Q4_1 or Q8_0); an
// fp16 copy of each for the prefill GEMM unless they are F16 already.
struct ForwardMemoryShape {
  int64_t n_layers = 0, n_embd = 0, n_ff = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t n_vocab = 0;
  GgmlType layer_type = GgmlType::kF16;
  GgmlType embd_type = GgmlType::kF16;
  bool tied_output = true;                // the vocabulary projection reads the embedding
  GgmlType output_type = GgmlType::kF16;  // when not tied
  int64_t max_context = 0;
  int64_t max_prefill = 0;
};

struct ForwardMemory {
  size_t gemv_weight_bytes = 0;  // layer matrices + output projection: a decode step reads all
  size_t embedding_bytes = 0;    // the token table when untied (0 when tied: counted above)
  size_t gemm_weight_bytes = 0;  // fp16 copies for the prefill GEMM
  size_t kv_cache_bytes = 0;     // layers x 2 x kv_dim x max_context fp16
  size_t scratch_bytes = 0;      // activations for max_prefill rows, logits, workspaces (bound)
  size_t total_bytes = 0;
};

// INVALID_ARGUMENT for sizes < 1 or a head count that does not divide;
// UNIMPLEMENTED for a type the GEMV does not take.
Result<ForwardMemory> plan_forward_memory(const ForwardMemoryShape& shape);

// ---------------------------------------------------------------- copies

// KV page gather (pages -> contiguous wire staging) and scatter (back):
// one block per page; page_bytes a multiple of 16 takes 16-byte copies.
struct PageCopyPlan {
  int64_t n_pages = 0;
  int64_t page_bytes = 0;
  size_t staging_bytes = 0;  // n_pages * page_bytes
  bool vectorized = false;
};
Result<PageCopyPlan> plan_page_copy(int64_t n_pages, int64_t page_bytes);

}  // namespace kvgate::engine::cuda
