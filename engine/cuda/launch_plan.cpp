#include "engine/cuda/launch_plan.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

namespace kvgate::engine::cuda {
namespace {

constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y / z
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

std::string str(int64_t v) {
  return std::to_string(v);
}

}  // namespace

bool gemv_supports(GgmlType type) {
  return type == GgmlType::kF16 || type == GgmlType::kQ4_1 || type == GgmlType::kQ8_0;
}

Result<GemvPlan> plan_gemv(GgmlType type, int64_t rows, int64_t cols, int64_t n_tokens) {
  if (!gemv_supports(type)) {
    return unimplemented("cuda gemv: weight type " + str(static_cast<int64_t>(type)) +
                         " is not supported (F16, Q4_1, Q8_0)");
  }
  if (rows < 1 || cols < 1 || n_tokens < 1) {
    return invalid_argument("cuda gemv: rows (" + str(rows) + "), cols (" + str(cols) +
                            ") and tokens (" + str(n_tokens) + ") must be >= 1");
  }
  if (cols > std::numeric_limits<int32_t>::max()) {
    return invalid_argument("cuda gemv: cols " + str(cols) + " exceeds 2^31 - 1");
  }
  GemvPlan p;
  p.type = type;
  p.rows = rows;
  p.cols = cols;
  p.n_tokens = n_tokens;
  p.block_threads = kGemvWarps * kWarpSize;
  p.grid_blocks = ceil_div(rows, kGemvWarps);
  p.token_passes = ceil_div(n_tokens, kGemvMaxTokens);
  if (p.grid_blocks > kMaxGridX) return invalid_argument("cuda gemv: too many rows " + str(rows));
  if (type == GgmlType::kF16) {
    if (cols % 2 != 0) {
      return unimplemented("cuda gemv: F16 rows need an even column count, got " + str(cols));
    }
    p.row_bytes = cols * 2;
  } else {
    if (cols % kQuantBlock != 0) {
      return invalid_argument("cuda gemv: cols " + str(cols) + " is not a multiple of 32");
    }
    const int64_t nb = cols / kQuantBlock;
    p.row_bytes =
        nb * (type == GgmlType::kQ4_1 ? int64_t{sizeof(BlockQ4_1)} : int64_t{sizeof(BlockQ8_0)});
    p.quant_blocks = n_tokens * nb;
    p.acts_qs_offset = 0;
    p.acts_d_offset = align_up(static_cast<size_t>(n_tokens * cols), 256);
    p.acts_s_offset = p.acts_d_offset + align_up(static_cast<size_t>(n_tokens * nb) * 4, 256);
    p.workspace_bytes = p.acts_s_offset + static_cast<size_t>(n_tokens * nb) * 4;
  }
  if (rows > std::numeric_limits<int64_t>::max() / p.row_bytes) {
    return invalid_argument("cuda gemv: weight of " + str(rows) + " rows overflows");
  }
  return p;
}

Result<GemmPlan> plan_gemm(GgmlType source_type, int64_t rows, int64_t cols, int64_t max_tokens) {
  if (!gemv_supports(source_type)) {
    return unimplemented("cuda gemm: weight type " + str(static_cast<int64_t>(source_type)) +
                         " is not supported (F16, Q4_1, Q8_0)");
  }
  constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();  // cuBLAS takes int
  if (rows < 1 || cols < 1 || max_tokens < 1 || rows > kMaxDim || cols > kMaxDim ||
      max_tokens > kMaxDim) {
    return invalid_argument("cuda gemm: rows (" + str(rows) + "), cols (" + str(cols) +
                            ") and tokens (" + str(max_tokens) + ") must be in [1, 2^31 - 1]");
  }
  if (cols % 8 != 0 || (source_type != GgmlType::kF16 && cols % kQuantBlock != 0)) {
    return invalid_argument("cuda gemm: cols " + str(cols) + " is not a multiple of " +
                            (source_type == GgmlType::kF16 ? "8" : "32"));
  }
  if (rows > std::numeric_limits<int64_t>::max() / 2 / cols ||
      max_tokens > std::numeric_limits<int64_t>::max() / 2 / cols) {
    return invalid_argument("cuda gemm: sizes overflow");
  }
  GemmPlan p;
  p.source_type = source_type;
  p.rows = rows;
  p.cols = cols;
  p.max_tokens = max_tokens;
  p.weight_f16_bytes = static_cast<size_t>(rows * cols * 2);
  p.workspace_bytes = static_cast<size_t>(max_tokens * cols * 2);
  return p;
}

Result<AttentionPlan> plan_decode_attention(const AttentionShape& s) {
  if (s.n_tasks < 1 || s.group < 1 || s.head_dim < 1 || s.page_tokens < 1 || s.sm_count < 1 ||
      s.max_rows < 0) {
    return invalid_argument("cuda attention: tasks (" + str(s.n_tasks) + "), group (" +
                            str(s.group) + "), head_dim (" + str(s.head_dim) + "), page_tokens (" +
                            str(s.page_tokens) + ") and sm_count (" + str(s.sm_count) +
                            ") must be >= 1 and max_rows (" + str(s.max_rows) + ") >= 0");
  }
  if (s.head_dim > kAttnMaxHeadDim) {
    return unimplemented("cuda attention: head_dim " + str(s.head_dim) + " > " +
                         str(kAttnMaxHeadDim));
  }
  if (s.group > kAttnMaxGroup || s.group * s.head_dim > kAttnMaxGroupDims) {
    return unimplemented("cuda attention: " + str(s.group) + " query heads per KV head of dim " +
                         str(s.head_dim) + " exceed the kernel's " + str(kAttnMaxGroup) +
                         " heads / " + str(kAttnMaxGroupDims) + " elements");
  }
  if (s.max_rows > std::numeric_limits<int32_t>::max()) {
    return invalid_argument("cuda attention: max_rows " + str(s.max_rows) + " exceeds 2^31 - 1");
  }
  if (s.n_tasks > kMaxGridY) {
    return invalid_argument("cuda attention: " + str(s.n_tasks) + " tasks exceed " +
                            str(kMaxGridY) + " per launch");
  }
  AttentionPlan p;
  p.shape = s;
  // Enough blocks to cover the device (~4 per SM), but no split shorter
  // than kAttnMinRowsPerSplit rows.
  const int64_t wanted = ceil_div(4 * s.sm_count, s.n_tasks);
  const int64_t useful =
      std::max<int64_t>(1, s.max_rows / kAttnMinRowsPerSplit);  // floor: none short
  int64_t splits = std::clamp<int64_t>(std::min(wanted, useful), 1, kAttnMaxSplits);
  // Round the chunk to whole warps' worth of rows per block, then drop any
  // split the rounding left empty.
  p.rows_per_split = std::max<int64_t>(
      kAttnWarps, ceil_div(std::max<int64_t>(s.max_rows, 1), splits * kAttnWarps) * kAttnWarps);
  p.n_splits = std::max<int64_t>(1, ceil_div(s.max_rows, p.rows_per_split));
  p.partial_stride = s.head_dim + 2;
  p.workspace_bytes =
      static_cast<size_t>(s.n_tasks * p.n_splits * s.group * p.partial_stride) * sizeof(float);
  p.block_threads = kAttnWarps * kWarpSize;
  // Rounded queries (q and q_base) + one partial per warp and head.
  p.shared_bytes =
      static_cast<size_t>(2 * s.group * s.head_dim + kAttnWarps * s.group * p.partial_stride) *
      sizeof(float);
  p.merge_blocks = s.n_tasks * s.group;
  return p;
}

Status check_attn_tasks(const AttnTask* tasks, int64_t n_tasks, const AttentionPlan& plan) {
  if (n_tasks < 1 || n_tasks > plan.shape.n_tasks || tasks == nullptr) {
    return invalid_argument("cuda attention: " + str(n_tasks) + " tasks for a plan of " +
                            str(plan.shape.n_tasks));
  }
  for (int64_t i = 0; i < n_tasks; ++i) {
    const AttnTask& t = tasks[i];
    const std::string which = "cuda attention: task " + str(i);
    if (t.near_tokens < 0 || t.far_tokens < 0) {
      return invalid_argument(which + " has a negative token count");
    }
    const int64_t rows = int64_t{t.near_tokens} + t.far_tokens;
    if (rows > plan.shape.max_rows) {
      return invalid_argument(which + " has " + str(rows) + " rows, the plan covers " +
                              str(plan.shape.max_rows));
    }
    if (rows == 0) return invalid_argument(which + " has no rows");
    if (t.q == nullptr || t.q_base == nullptr || t.out == nullptr) {
      return invalid_argument(which + " lacks q, q_base or out");
    }
    if ((t.near_tokens > 0 && (t.near_k == nullptr || t.near_v == nullptr)) ||
        (t.far_tokens > 0 && (t.far_k == nullptr || t.far_v == nullptr))) {
      return invalid_argument(which + " lacks the page list of a non-empty segment");
    }
  }
  return Status();
}

Result<PrefillAttentionPlan> plan_prefill_attention(const PrefillAttentionShape& s) {
  if (s.max_queries < 1 || s.n_heads < 1 || s.n_kv_heads < 1 || s.head_dim < 1 ||
      s.max_context < 1) {
    return invalid_argument("cuda prefill attention: queries (" + str(s.max_queries) +
                            "), heads (" + str(s.n_heads) + "), KV heads (" + str(s.n_kv_heads) +
                            "), head_dim (" + str(s.head_dim) + ") and context (" +
                            str(s.max_context) + ") must be >= 1");
  }
  if (s.n_heads % s.n_kv_heads != 0) {
    return invalid_argument("cuda prefill attention: " + str(s.n_heads) +
                            " query heads are not a multiple of " + str(s.n_kv_heads) +
                            " KV heads");
  }
  if (s.head_dim % 2 != 0 || s.head_dim > kPrefillMaxHeadDim) {
    return unimplemented("cuda prefill attention: head_dim " + str(s.head_dim) +
                         " (the kernel takes even head dims up to " + str(kPrefillMaxHeadDim) +
                         ")");
  }
  if (s.max_queries > s.max_context) {
    return invalid_argument("cuda prefill attention: " + str(s.max_queries) +
                            " queries per launch exceed the cache's " + str(s.max_context) +
                            " rows");
  }
  // Row offsets inside one KV head's slice are computed in int64, but key
  // indices are int: the context must fit int32.
  if (s.max_context > std::numeric_limits<int32_t>::max() / 2) {
    return invalid_argument("cuda prefill attention: context " + str(s.max_context) +
                            " exceeds 2^30");
  }
  if (s.n_heads > kMaxGridY) {
    return invalid_argument("cuda prefill attention: " + str(s.n_heads) + " heads exceed " +
                            str(kMaxGridY) + " per launch");
  }
  PrefillAttentionPlan p;
  p.shape = s;
  p.group = s.n_heads / s.n_kv_heads;
  p.queries_per_warp =
      s.head_dim <= 128 ? kPrefillMaxQueriesPerWarp : kPrefillMaxQueriesPerWarp / 2;
  p.q_tile = int64_t{kPrefillWarps} * p.queries_per_warp;
  p.key_tile = kPrefillKeyTile;
  p.max_q_tiles = ceil_div(s.max_queries, p.q_tile);
  p.block_threads = kPrefillWarps * kWarpSize;
  p.k_row_halves = s.head_dim + 2;
  p.shared_bytes = static_cast<size_t>(p.q_tile * s.head_dim) * sizeof(float) +
                   static_cast<size_t>(p.key_tile * p.k_row_halves) * 2 +
                   static_cast<size_t>(p.key_tile * s.head_dim) * 2;
  if (p.shared_bytes > static_cast<size_t>(kPrefillMaxSharedBytes)) {
    // Not reachable for head_dim <= kPrefillMaxHeadDim (the tile shrinks
    // above 128); kept so a change of constants cannot launch a bad shape.
    return unimplemented("cuda prefill attention: head_dim " + str(s.head_dim) + " needs " +
                         str(static_cast<int64_t>(p.shared_bytes)) + " bytes of shared memory");
  }
  return p;
}

Result<ForwardMemory> plan_forward_memory(const ForwardMemoryShape& s) {
  if (s.n_layers < 1 || s.n_embd < 1 || s.n_ff < 1 || s.n_heads < 1 || s.n_kv_heads < 1 ||
      s.head_dim < 1 || s.n_vocab < 1 || s.max_context < 1 || s.max_prefill < 1 ||
      s.n_heads % s.n_kv_heads != 0) {
    return invalid_argument(
        "cuda forward memory: every size must be >= 1 and the query heads a "
        "multiple of the KV heads");
  }
  const int64_t q_dim = s.n_heads * s.head_dim, kv_dim = s.n_kv_heads * s.head_dim;
  ForwardMemory m;
  // Bytes of a matrix as the GEMV plan lays it out (validates the type).
  auto matrix = [&](GgmlType t, int64_t rows, int64_t cols) -> Result<size_t> {
    KVGATE_ASSIGN_OR_RETURN(const GemvPlan p, plan_gemv(t, rows, cols, 1));
    return static_cast<size_t>(rows * p.row_bytes);
  };
  const std::pair<int64_t, int64_t> shapes[] = {
      {q_dim, s.n_embd},  {kv_dim, s.n_embd}, {kv_dim, s.n_embd}, {s.n_embd, q_dim},
      {s.n_ff, s.n_embd}, {s.n_ff, s.n_embd}, {s.n_embd, s.n_ff}};
  size_t layer = 0, layer_f16 = 0;
  for (const auto& [rows, cols] : shapes) {
    KVGATE_ASSIGN_OR_RETURN(const size_t b, matrix(s.layer_type, rows, cols));
    layer += b;
    if (s.layer_type != GgmlType::kF16) layer_f16 += static_cast<size_t>(rows * cols) * 2;
  }
  m.gemv_weight_bytes = layer * static_cast<size_t>(s.n_layers);
  m.gemm_weight_bytes = layer_f16 * static_cast<size_t>(s.n_layers);
  KVGATE_ASSIGN_OR_RETURN(const size_t embd, matrix(s.embd_type, s.n_vocab, s.n_embd));
  if (s.tied_output) {
    m.gemv_weight_bytes += embd;
  } else {
    KVGATE_ASSIGN_OR_RETURN(const size_t out, matrix(s.output_type, s.n_vocab, s.n_embd));
    m.gemv_weight_bytes += out;
    m.embedding_bytes = embd;
  }
  m.kv_cache_bytes =
      static_cast<size_t>(s.n_layers * 2 * kv_dim) * static_cast<size_t>(s.max_context) * 2;
  const int64_t P = s.max_prefill;
  const int64_t max_cols = std::max({s.n_embd, q_dim, s.n_ff});
  // x, xn, q, k, v, attn, gate, up (fp32) + tokens/positions; the GEMM's
  // fp16 activations; the GEMV's 8-token activations (<= 1.25 bytes per
  // element); decode attention's partials at the plan's largest split.
  const size_t rows = static_cast<size_t>(P) *
                      static_cast<size_t>(2 * s.n_embd + 2 * q_dim + 2 * kv_dim + 2 * s.n_ff + 2) *
                      4;
  const size_t gemm_ws = static_cast<size_t>(P * max_cols) * 2;
  const size_t gemv_ws = static_cast<size_t>(kGemvMaxTokens * max_cols) * 2 + 1024;
  const size_t attn_ws = static_cast<size_t>(s.n_heads * kAttnMaxSplits * (s.head_dim + 2)) * 4;
  m.scratch_bytes = rows + gemm_ws + gemv_ws + attn_ws + static_cast<size_t>(s.n_vocab) * 4 +
                    static_cast<size_t>(s.n_layers * s.n_kv_heads) * (sizeof(AttnTask) + 16);
  m.total_bytes = m.gemv_weight_bytes + m.embedding_bytes + m.gemm_weight_bytes + m.kv_cache_bytes +
                  m.scratch_bytes;
  return m;
}

Result<PageCopyPlan> plan_page_copy(int64_t n_pages, int64_t page_bytes) {
  if (n_pages < 0 || page_bytes < 1) {
    return invalid_argument("cuda page copy: n_pages (" + str(n_pages) +
                            ") must be >= 0 and page_bytes (" + str(page_bytes) + ") >= 1");
  }
  if (n_pages > kMaxGridX)
    return invalid_argument("cuda page copy: too many pages " + str(n_pages));
  if (n_pages > 0 && page_bytes > std::numeric_limits<int64_t>::max() / n_pages) {
    return invalid_argument("cuda page copy: staging size overflows");
  }
  PageCopyPlan p;
  p.n_pages = n_pages;
  p.page_bytes = page_bytes;
  p.staging_bytes = static_cast<size_t>(n_pages * page_bytes);
  p.vectorized = page_bytes % 16 == 0;
  return p;
}

}  // namespace kvgate::engine::cuda
