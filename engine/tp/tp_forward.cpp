#include "engine/tp/tp_forward.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "engine/cpu/ops.h"
#include "engine/cpu/quant.h"

namespace kvgate::engine::tp {

TpForward::TpForward(const TpShard& shard, Collective& comm, const TpForwardOptions& options)
    : shard_(shard), comm_(comm), options_(options), pool_(std::max(1, options.n_threads)) {
  options_.max_batch_tokens = std::max<int64_t>(1, options_.max_batch_tokens);
  const TpRankPlan& p = shard.rank_plan();
  n_q_ = p.q_heads.size();
  n_kv_ = p.kv_heads.size();
  n_ff_ = p.ff.size();
  local_ = shard.config();
  local_.n_heads = n_q_;
  local_.n_kv_heads = n_kv_;
  local_.n_ff = n_ff_;
  const LlamaConfig& c = shard.config();
  const auto rows = static_cast<size_t>(options_.max_batch_tokens);
  x_.resize(rows * c.n_embd);
  xn_.resize(rows * c.n_embd);
  partial_.resize(rows * c.n_embd);
  q_.resize(rows * local_.q_dim());
  k_.resize(rows * local_.kv_dim());
  v_.resize(rows * local_.kv_dim());
  attn_.resize(rows * local_.q_dim());
  gate_.resize(rows * n_ff_);
  up_.resize(rows * n_ff_);
  row_pos_.resize(rows);
}

Result<std::unique_ptr<TpForward>> TpForward::create(const TpShard& shard, Collective& comm,
                                                     const TpForwardOptions& options) {
  if (comm.world() != shard.plan().world_size || comm.rank() != shard.rank()) {
    return invalid_argument("tensor-parallel forward: collective is rank " + std::to_string(comm.rank()) +
                            " of " + std::to_string(comm.world()) + ", the shard rank " +
                            std::to_string(shard.rank()) + " of " + std::to_string(shard.plan().world_size));
  }
  if (options.n_threads < 0) return invalid_argument("tensor-parallel forward: negative n_threads");
  return std::unique_ptr<TpForward>(new TpForward(shard, comm, options));
}

Status TpForward::reset(int64_t capacity_tokens) {
  if (capacity_tokens < 1) return invalid_argument("tensor-parallel forward: cache capacity must be >= 1");
  cache_ = std::make_unique<KvCache>(local_, capacity_tokens);
  scores_.assign(static_cast<size_t>(pool_.size()) * capacity_tokens, 0.0f);
  return Status();
}

Status TpForward::prefill(std::span<const int32_t> tokens, float* logits_out) {
  if (tokens.empty()) return invalid_argument("prompt is empty");
  KVGATE_RETURN_IF_ERROR(reset(static_cast<int64_t>(tokens.size())));
  return forward(tokens, logits_out);
}

Status TpForward::forward(std::span<const int32_t> tokens, float* logits_out) {
  if (tokens.empty()) return invalid_argument("no tokens to forward");
  if (!cache_) return failed_precondition("tensor-parallel forward: reset() the cache first");
  const int64_t end = cache_->n_tokens() + static_cast<int64_t>(tokens.size());
  if (end > cache_->capacity()) {
    return out_of_range("sequence of " + std::to_string(end) + " tokens exceeds its KV cache of " +
                        std::to_string(cache_->capacity()) + " tokens");
  }
  const int64_t n_vocab = shard_.config().n_vocab;
  for (int32_t t : tokens) {
    if (t < 0 || t >= n_vocab) {
      return invalid_argument("token id " + std::to_string(t) + " outside the vocabulary [0, " +
                              std::to_string(n_vocab) + ")");
    }
  }
  // The same chunks as CpuForward::prefill, so each token meets the same
  // matmul kernel (the small-batch one switches on the step's size).
  const auto chunk = static_cast<size_t>(options_.max_batch_tokens);
  for (size_t start = 0; start < tokens.size(); start += chunk) {
    const size_t len = std::min(chunk, tokens.size() - start);
    const bool last = start + len == tokens.size();
    KVGATE_RETURN_IF_ERROR(step(tokens.subspan(start, len), last ? logits_out : nullptr));
  }
  return Status();
}

Status TpForward::step(std::span<const int32_t> tokens, float* logits_out) {
  const LlamaConfig& c = shard_.config();
  const auto n = static_cast<int64_t>(tokens.size());
  const auto& emb = shard_.token_embd();
  const uint64_t emb_row_bytes = *ggml_row_bytes(emb.type, c.n_embd);
  const int64_t base = cache_->n_tokens();
  for (int64_t r = 0; r < n; ++r) {
    const auto* src = static_cast<const uint8_t*>(emb.data) + emb_row_bytes * tokens[r];
    cpu::dequantize_row(emb.type, src, x_.data() + r * c.n_embd, c.n_embd);
    row_pos_[r] = base + r;
  }
  for (int64_t l = 0; l < c.n_layers; ++l) KVGATE_RETURN_IF_ERROR(run_layer(l, n));
  cache_->set_n_tokens(base + n);
  if (logits_out != nullptr) {
    cpu::rms_norm(x_.data() + (n - 1) * c.n_embd, shard_.output_norm(), xn_.data(), c.n_embd, c.rms_eps,
                  options_.isa);
    cpu::matmul(shard_.output(), xn_.data(), 1, logits_out, pool_, ws_, options_.isa);
  }
  return Status();
}

Status TpForward::run_layer(int64_t l, int64_t n) {
  const LlamaConfig& c = shard_.config();
  const cpu::Isa isa = options_.isa;
  const TpLayerShard& w = shard_.layers()[static_cast<size_t>(l)];
  const int64_t hd = c.head_dim;
  const int64_t q_dim = local_.q_dim(), kv_dim = local_.kv_dim();
  for (int64_t r = 0; r < n; ++r) {
    cpu::rms_norm(x_.data() + r * c.n_embd, w.attn_norm, xn_.data() + r * c.n_embd, c.n_embd, c.rms_eps,
                  isa);
  }
  cpu::matmul(w.wq, xn_.data(), n, q_.data(), pool_, ws_, isa);
  cpu::matmul(w.wk, xn_.data(), n, k_.data(), pool_, ws_, isa);
  cpu::matmul(w.wv, xn_.data(), n, v_.data(), pool_, ws_, isa);
  for (int64_t r = 0; r < n; ++r) {
    float* q = q_.data() + r * q_dim;
    float* k = k_.data() + r * kv_dim;
    // RoPE rotates every head alike (it depends on the position only).
    cpu::rope_norm(q, n_q_, hd, row_pos_[r], c.rope_freq_base, isa);
    cpu::rope_norm(k, n_kv_, hd, row_pos_[r], c.rope_freq_base, isa);
    // As CpuForward: the query is rounded to fp16 to meet the fp16 keys.
    for (int64_t e = 0; e < q_dim; ++e) q[e] = fp16_to_fp32(fp32_to_fp16(q[e]));
    for (int64_t h = 0; h < n_kv_; ++h) {
      cpu::convert_f32_to_f16(k + h * hd, cache_->k(l, h) + row_pos_[r] * hd, hd, isa);
      cpu::convert_f32_to_f16(v_.data() + r * kv_dim + h * hd, cache_->v(l, h) + row_pos_[r] * hd, hd, isa);
    }
  }
  attention(l, n);
  // wo: this rank's attention outputs are a column block of wo's input; the
  // product is a partial sum over them, completed by the all-reduce.
  cpu::matmul(w.wo, attn_.data(), n, partial_.data(), pool_, ws_, isa);
  KVGATE_RETURN_IF_ERROR(comm_.all_reduce_sum(partial_.data(), static_cast<size_t>(n * c.n_embd)));
  cpu::add_inplace(x_.data(), partial_.data(), n * c.n_embd, isa);

  for (int64_t r = 0; r < n; ++r) {
    cpu::rms_norm(x_.data() + r * c.n_embd, w.ffn_norm, xn_.data() + r * c.n_embd, c.n_embd, c.rms_eps,
                  isa);
  }
  cpu::matmul(w.w_gate, xn_.data(), n, gate_.data(), pool_, ws_, isa);
  cpu::matmul(w.w_up, xn_.data(), n, up_.data(), pool_, ws_, isa);
  cpu::swiglu(gate_.data(), up_.data(), gate_.data(), n * n_ff_, isa);
  cpu::matmul(w.w_down, gate_.data(), n, partial_.data(), pool_, ws_, isa);
  KVGATE_RETURN_IF_ERROR(comm_.all_reduce_sum(partial_.data(), static_cast<size_t>(n * c.n_embd)));
  cpu::add_inplace(x_.data(), partial_.data(), n * c.n_embd, isa);
  return Status();
}

// CpuForward::attention for the rank's heads (without attention statistics):
// the same per-(row, head) arithmetic, so a head's output does not depend on
// which rank computes it.
void TpForward::attention(int64_t layer, int64_t n) {
  const LlamaConfig& c = shard_.config();
  const cpu::Isa isa = options_.isa;
  const int64_t hd = c.head_dim;
  const int64_t group = c.n_heads / c.n_kv_heads;
  const int64_t q_dim = local_.q_dim();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t n_pairs = n * n_q_;
  const int64_t ctx_stride = cache_->capacity();
  pool_.run([&](int tid, int nth) {
    float* scores = scores_.data() + tid * ctx_stride;
    for (int64_t pair = tid; pair < n_pairs; pair += nth) {
      const int64_t r = pair / n_q_;
      const int64_t h = pair % n_q_;
      const int64_t kvh = h / group;  // local: the rank's heads are whole groups
      const int64_t len = row_pos_[r] + 1;
      const float* q = q_.data() + r * q_dim + h * hd;
      const fp16_t* keys = cache_->k(layer, kvh);
      const fp16_t* vals = cache_->v(layer, kvh);
      for (int64_t j = 0; j < len; ++j) scores[j] = cpu::dot_f16_f32(keys + j * hd, q, hd, isa) * scale;
      cpu::softmax_inplace(scores, len, isa);
      float* out = attn_.data() + r * q_dim + h * hd;
      std::fill(out, out + hd, 0.0f);
      for (int64_t j = 0; j < len; ++j) {
        const float p = fp16_to_fp32(fp32_to_fp16(scores[j]));
        cpu::axpy_f16(p, vals + j * hd, out, hd, isa);
      }
    }
  });
}

}  // namespace kvgate::engine::tp
