// Constants and argument records shared by the CUDA kernels (compiled by
// nvcc as C++17), their launch plans (plain C++, built and unit-tested
// without CUDA) and the host API. Only <cstdint>: nothing from the serving
// code, no CUDA header, so every side can include it.
#pragma once

#include <cstdint>

namespace kvgate::engine::cuda {

inline constexpr int kWarpSize = 32;

// ---- decode GEMV (gemv.cu)
// One warp per output row, kGemvWarps rows per block. Up to kGemvMaxTokens
// tokens share one pass over the weights (each weight block is loaded once
// per pass); more tokens take several passes.
inline constexpr int kGemvWarps = 4;
inline constexpr int kGemvMaxTokens = 8;
inline constexpr int kQuantBlock = 32;  // Q4_1 / Q8_0 / Q8_1 block elements

// ---- decode attention (attention.cu)
// A block of kAttnWarps warps scores rows [split * rows_per_split, ...) of
// one task; each lane owns head-dim elements lane, lane + 32, ... (at most
// kAttnMaxPerLane of them).
inline constexpr int kAttnWarps = 4;
inline constexpr int kAttnMaxHeadDim = 256;
inline constexpr int kAttnMaxPerLane = kAttnMaxHeadDim / kWarpSize;
inline constexpr int kAttnMaxGroup = 8;  // query heads per KV head (GQA)
// group * head_dim bound: keeps the queries and the warps' merge states in
// 25 KiB of shared memory (Llama-70B: 8 x 128; Llama-3-8B: 4 x 128).
inline constexpr int kAttnMaxGroupDims = 1024;
inline constexpr int kAttnMinRowsPerSplit = 64;  // below this a split costs more than it saves
inline constexpr int kAttnMaxSplits = 128;
inline constexpr int kAttnMergeThreads = 128;

// One (sequence, layer, KV head) of a decode step: the proximal segment
// (sinks + window: own-layer K and V) and the distant segment (the block
// base layer's K, this layer's V), each a list of page addresses in device
// memory (page i holds rows [i * page_tokens, ...) of head_dim fp16). The
// `group` query heads of this KV head are scored with q against proximal
// rows and with q_base (the same heads' queries at the block's base layer)
// against distant rows, one softmax over both (kvstore/attention.h).
struct AttnTask {
  const uint16_t* const* near_k = nullptr;  // device array of device page addresses
  const uint16_t* const* near_v = nullptr;
  const uint16_t* const* far_k = nullptr;
  const uint16_t* const* far_v = nullptr;
  int32_t near_tokens = 0;
  int32_t far_tokens = 0;
  const float* q = nullptr;       // group x head_dim, fp32 (rounded to fp16 in the kernel)
  const float* q_base = nullptr;  // group x head_dim
  float* out = nullptr;           // group x head_dim
};

// ---- prefill attention (prefill_attention.cu)
// Causal attention of a prompt chunk over a dense fp16 K/V cache. A block of
// kPrefillWarps warps takes one query head and a tile of q_tile queries
// (each warp queries_per_warp of them); keys stream through shared memory
// kPrefillKeyTile at a time, one key per lane. Per-lane head-dim elements
// (lane, lane + 32, ...) bound head_dim by kPrefillMaxHeadDim.
inline constexpr int kPrefillWarps = 4;
inline constexpr int kPrefillKeyTile = 32;
inline constexpr int kPrefillMaxHeadDim = 256;
inline constexpr int kPrefillMaxQueriesPerWarp = 4;
// Dynamic shared memory the plan stays within (no opt-in attribute needed).
inline constexpr int kPrefillMaxSharedBytes = 48 * 1024;

// ---- the forward pass's glue (forward_ops.cu)
// Row formats the embedding lookup dequantizes (as engine/cpu/quant.cpp).
enum class EmbedType : int32_t { kF32 = 0, kF16 = 1, kQ4_1 = 2, kQ8_0 = 3 };

// A decode step's inputs in device memory, so a captured step replays with
// new values: the token to embed and its position (= tokens already in the
// cache). The step's kernels read them from here, never by value.
struct DecodeStep {
  int32_t token = 0;
  int32_t pos = 0;
};

// ---- sampling (sampling.cu)
// One block per row of logits. At most kSampleMaxCandidates candidates
// survive top-k into the sorted top-p / min-p walk.
inline constexpr int kSampleThreads = 1024;
inline constexpr int kSampleMaxCandidates = 1024;
inline constexpr int kArgmaxThreads = 1024;

// Per-row sampling parameters (device array, one per row of logits), so a
// batch mixes requests. temperature <= 0 means greedy. u in [0, 1) is the
// row's uniform draw, made on the host from the request's seeded generator
// (sampling_plan.h: sampling_uniform) so results are reproducible.
struct SampleRow {
  float temperature = 0.0f;
  int32_t top_k = 0;   // 0 = off
  float top_p = 1.0f;  // 1 = off
  float min_p = 0.0f;  // 0 = off
  double u = 0.0;
};

// ---- elementwise and copies (ops.cu)
inline constexpr int kEltThreads = 256;
inline constexpr int kCopyThreads = 256;

// ---- the Attention-Gate (gate.cu, gate_plan.h)
// Gate heads and head width bound as GateModel::validate does; one lane of
// a warp per head holds that head's o (head_dim floats, local memory).
inline constexpr int kGateMaxHeads = 64;
inline constexpr int kGateMaxHeadDim = 64;
inline constexpr int kGateProjectThreads = 256;  // 8 warps, one output each
inline constexpr int kGateLogitThreads = 32;     // one warp per (token, slot)
inline constexpr int kGateFlagThreads = 256;

// One (item, layout slot) of a compressed decode step's gate work
// (compressed_ops.cu): the new token's gate row (2D fp16: K then V) to
// write, and the slot's proximal gate rows (sinks + window, ring order,
// the new row included) to attend over, as page addresses of
// rows_per_page rows each.
struct GateRowTask {
  uint16_t* own_row = nullptr;
  const uint16_t* const* pages = nullptr;  // device array of device page addresses
  int32_t n_rows = 0;
  int32_t rows_per_page = 0;
};

// ---- compressed decode (compressed_ops.cu)
inline constexpr int kStoreRowThreads = 128;

}  // namespace kvgate::engine::cuda
