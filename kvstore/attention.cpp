#include "kvstore/attention.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "engine/cpu/ops.h"

namespace kvgate::kvstore {
namespace {

using engine::fp16_to_fp32;
using engine::fp32_to_fp16;
using engine::cpu::Isa;

// Rows scored before the accumulator is rescaled: one rescale per chunk at
// most instead of one per new maximum.
constexpr int64_t kScoreChunk = 64;

}  // namespace

void accumulate_attention(PartialAttention& state, float* acc, const fp16_t* k, const fp16_t* v,
                          int64_t n, int64_t row_stride, const float* q, int64_t d, float scale,
                          Isa isa) {
  float scores[kScoreChunk];
  for (int64_t c = 0; c < n; c += kScoreChunk) {
    const int64_t nc = std::min(kScoreChunk, n - c);
    float chunk_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < nc; ++j) {
      scores[j] = engine::cpu::dot_f16_f32(k + (c + j) * row_stride, q, d, isa) * scale;
      chunk_max = std::max(chunk_max, scores[j]);
    }
    if (chunk_max > state.max_score) {
      // exp(-inf) = 0 clears an empty state's (zero) accumulator harmlessly.
      const float rescale = std::exp(state.max_score - chunk_max);
      for (int64_t e = 0; e < d; ++e) acc[e] *= rescale;
      state.sum_exp *= rescale;
      state.max_score = chunk_max;
    }
    for (int64_t j = 0; j < nc; ++j) {
      const float p = std::exp(scores[j] - state.max_score);
      state.sum_exp += p;
      engine::cpu::axpy_f16(p, v + (c + j) * row_stride, acc, d, isa);
    }
  }
}

PartialAttention partial_attention(const fp16_t* k, const fp16_t* v, int64_t n, int64_t row_stride,
                                   const float* q, int64_t d, float scale, float* acc, Isa isa) {
  PartialAttention state;
  std::fill(acc, acc + d, 0.0f);
  accumulate_attention(state, acc, k, v, n, row_stride, q, d, scale, isa);
  return state;
}

void merge_partial(PartialAttention& a, float* acc_a, const PartialAttention& b, const float* acc_b,
                   int64_t d) {
  if (b.sum_exp == 0.0f) return;  // b empty
  if (a.sum_exp == 0.0f) {
    a = b;
    std::copy(acc_b, acc_b + d, acc_a);
    return;
  }
  const float m = std::max(a.max_score, b.max_score);
  const float fa = std::exp(a.max_score - m);
  const float fb = std::exp(b.max_score - m);
  for (int64_t e = 0; e < d; ++e) acc_a[e] = acc_a[e] * fa + acc_b[e] * fb;
  a.sum_exp = a.sum_exp * fa + b.sum_exp * fb;
  a.max_score = m;
}

void finish_partial(const PartialAttention& state, const float* acc, float* out, int64_t d) {
  const float inv = 1.0f / state.sum_exp;
  for (int64_t e = 0; e < d; ++e) out[e] = acc[e] * inv;
}

Status attend(const CompressedKvCache& cache, int64_t layer, int64_t q_head, int64_t n_q_heads,
              const float* q, const float* q_base, float* out, Isa isa) {
  if (!cache.host_accessible()) {
    return failed_precondition(
        "attention: the cache's pages are in device memory; attend on the device");
  }
  const KvLayout& layout = cache.layout();
  const int64_t n_kv = layout.n_kv_heads();
  if (n_q_heads < n_kv || n_q_heads % n_kv != 0) {
    return invalid_argument("attention: " + std::to_string(n_q_heads) +
                            " query heads are not a multiple of " + std::to_string(n_kv) +
                            " KV heads");
  }
  if (q_head < 0 || q_head >= n_q_heads) {
    return out_of_range("attention: query head " + std::to_string(q_head) + " not in [0, " +
                        std::to_string(n_q_heads) + ")");
  }
  if (cache.n_tokens() == 0) return failed_precondition("attention: the cache holds no token");
  const int64_t h = q_head / (n_q_heads / n_kv);
  KVGATE_ASSIGN_OR_RETURN(const SegmentView near, cache.proximal(layer, h));
  KVGATE_ASSIGN_OR_RETURN(const SegmentView far, cache.distant(layer, h));

  // One softmax over every held token, visited in position order — sinks,
  // then the retained distant tokens (kept in increasing position), then
  // the window (ring rows rotated back into position order) — with the same
  // steps as the dense engine (scores, softmax, probabilities rounded to
  // fp16, then meeting V in that order). So when every token is held (the
  // dense layout: blocks of one layer, every flag 1) the result is bit for
  // bit the dense engine's, and a disaggregated `dense` request reproduces
  // the single-process output exactly.
  const int64_t d = layout.head_dim;  // <= kMaxHeadDim (validate_layout)
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // The queries meet fp16 keys rounded to fp16 (the engine has done so
  // already; rounding again changes nothing), as llama.cpp does.
  float q16[kMaxHeadDim];
  float qb16[kMaxHeadDim];
  for (int64_t e = 0; e < d; ++e) q16[e] = fp16_to_fp32(fp32_to_fp16(q[e]));
  for (int64_t e = 0; e < d; ++e) qb16[e] = fp16_to_fp32(fp32_to_fp16(q_base[e]));
  const int64_t n_near = near.n_tokens();
  const int64_t n_far = far.n_tokens();
  const int64_t n_sink_rows = std::min(layout.n_sink_tokens, n_near);
  const int64_t n_window_rows = n_near - n_sink_rows;
  const int64_t first_window_pos = cache.n_tokens() - n_window_rows;
  // Ring row of the i-th window token in position order.
  auto window_row = [&](int64_t i) {
    const int64_t pos = first_window_pos + i;
    return layout.n_sink_tokens + (pos - layout.n_sink_tokens) % layout.n_window_tokens;
  };
  const int64_t total = n_near + n_far;
  // Grown once per thread to the longest context seen; no allocation after.
  thread_local std::vector<float> scores;
  if (scores.size() < static_cast<size_t>(total)) scores.resize(static_cast<size_t>(total));
  float* sc = scores.data();
  for (int64_t i = 0; i < n_sink_rows; ++i) {
    sc[i] = engine::cpu::dot_f16_f32(near.k_row(i), q16, d, isa) * scale;
  }
  for (int64_t i = 0; i < n_far; ++i) {
    sc[n_sink_rows + i] = engine::cpu::dot_f16_f32(far.k_row(i), qb16, d, isa) * scale;
  }
  for (int64_t i = 0; i < n_window_rows; ++i) {
    sc[n_sink_rows + n_far + i] = engine::cpu::dot_f16_f32(near.k_row(window_row(i)), q16, d, isa) * scale;
  }
  engine::cpu::softmax_inplace(sc, total, isa);
  std::fill(out, out + d, 0.0f);
  auto add = [&](float p, const fp16_t* v) {
    engine::cpu::axpy_f16(fp16_to_fp32(fp32_to_fp16(p)), v, out, d, isa);
  };
  for (int64_t i = 0; i < n_sink_rows; ++i) add(sc[i], near.v_row(i));
  for (int64_t i = 0; i < n_far; ++i) add(sc[n_sink_rows + i], far.v_row(i));
  for (int64_t i = 0; i < n_window_rows; ++i) {
    add(sc[n_sink_rows + n_far + i], near.v_row(window_row(i)));
  }
  return Status();
}

Status attend_layer(const CompressedKvCache& cache, int64_t layer, int64_t n_q_heads,
                    const float* q, const float* q_base, float* out, Isa isa) {
  const int64_t d = cache.layout().head_dim;
  for (int64_t qh = 0; qh < n_q_heads; ++qh) {
    KVGATE_RETURN_IF_ERROR(
        attend(cache, layer, qh, n_q_heads, q + qh * d, q_base + qh * d, out + qh * d, isa));
  }
  return Status();
}

}  // namespace kvgate::kvstore
