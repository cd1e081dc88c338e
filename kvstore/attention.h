// Attention over the compressed layout (DESIGN.md §4), CPU.
//
// At layer l, a query of KV head h attends to one softmax over the union of
//   - the proximal tokens (sinks and window): own-layer K and V, and
//   - the retained distant tokens of h's block holding l: the base layer's
//     K and layer l's V.
// Each set gives a partial attention (running max m, sum of exponentials
// s, unnormalized accumulator acc); the two are merged by log-sum-exp. The
// kernels take raw pointers and sizes and include nothing from the cache,
// so a CUDA version can mirror them one for one.
//
// Numerics: the query is rounded to fp16 once (as the dense engine and
// llama.cpp do before meeting fp16 keys, which makes the products exact in
// fp32). attend() — what the engine uses — then follows the dense engine
// step for step: every held token's score in position order (sinks, the
// retained distant tokens, the window), one softmax, probabilities rounded
// to fp16 before meeting V, accumulated in position order; with every token
// held it equals dense attention bit for bit. The partial-attention kernels
// below (online softmax over pages, merged by log-sum-exp, unnormalized
// probabilities) are the form split kernels use (the CUDA decode kernel);
// they agree with attend() to ~2^-11 relative.
//
// Pure functions; thread-safe; no allocation; no failure path in the
// kernels (sizes are the caller's preconditions). The cache-level functions
// validate their indices and return Status.
#pragma once

#include <cstdint>
#include <limits>

#include "common/status.h"
#include "engine/cpu/isa.h"
#include "engine/ggml_types.h"
#include "kvstore/compressed_cache.h"

namespace kvgate::kvstore {

// State of a partial attention; acc (head_dim floats) is held by the caller.
// Empty: max_score = -inf, sum_exp = 0, acc = 0.
struct PartialAttention {
  float max_score = -std::numeric_limits<float>::infinity();
  float sum_exp = 0.0f;  // Σ exp(score_j - max_score)
};

// Partial attention of q over n rows: score_j = (k_j · q) · scale, then
// acc[0..d) = Σ exp(score_j - m) v_j with m = max score. Row j of K and V
// starts at k + j * row_stride, v + j * row_stride (elements). n may be 0.
PartialAttention partial_attention(const fp16_t* k, const fp16_t* v, int64_t n, int64_t row_stride,
                                   const float* q, int64_t d, float scale, float* acc,
                                   engine::cpu::Isa isa);

// Continues `state`/`acc` over n more rows (online softmax): the result is
// the partial attention over the old rows and these together.
void accumulate_attention(PartialAttention& state, float* acc, const fp16_t* k, const fp16_t* v,
                          int64_t n, int64_t row_stride, const float* q, int64_t d, float scale,
                          engine::cpu::Isa isa);

// Merges b into a (log-sum-exp): a becomes the partial over both row sets.
// Either may be empty.
void merge_partial(PartialAttention& a, float* acc_a, const PartialAttention& b, const float* acc_b,
                   int64_t d);

// out[0..d) = acc / sum_exp; state must be non-empty.
void finish_partial(const PartialAttention& state, const float* acc, float* out, int64_t d);

// Attention of one query (RoPE'd, fp32, head_dim) of query head q_head at
// `layer`; n_q_heads / n_kv_heads query heads share a KV head (GQA), so the
// KV head is q_head / group. out gets head_dim floats.
//
// Distant tokens are scored with `q_base`, the same query head's query at
// the block's base layer: their scores are the base layer's own scores
// (q_base · k_base), shared by every layer of the block, as PoD shares
// attention scores between similar layers. Proximal tokens are scored with
// the layer's own query `q`. With blocks of one layer, q_base == q. (A
// layer's own query against another layer's keys would be meaningless: the
// projections differ per layer; DESIGN.md §4's "own query against the base
// key" wording is corrected to this.)
//
// Errors: OUT_OF_RANGE for layer or q_head, INVALID_ARGUMENT if n_q_heads is
// not a multiple of n_kv_heads, FAILED_PRECONDITION if the cache holds no
// token.
Status attend(const CompressedKvCache& cache, int64_t layer, int64_t q_head, int64_t n_q_heads,
              const float* q, const float* q_base, float* out, engine::cpu::Isa isa);

// All query heads of one layer: q, q_base and out are n_q_heads x head_dim
// (q_base: each head's query at its block's base layer).
Status attend_layer(const CompressedKvCache& cache, int64_t layer, int64_t n_q_heads,
                    const float* q, const float* q_base, float* out, engine::cpu::Isa isa);

}  // namespace kvgate::kvstore
