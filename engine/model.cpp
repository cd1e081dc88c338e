#include "engine/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/cpu/ops.h"
#include "engine/cpu/quant.h"
#include "kvstore/attention.h"

namespace kvgate::engine {

namespace {

Result<int64_t> required_int(const GgufFile& f, const std::string& key) {
  auto v = f.get_uint(key);
  if (!v.ok()) return v.status();
  if (*v == 0 || *v > (1u << 30)) {
    return invalid_argument("metadata key '" + key + "' = " + std::to_string(*v) + " is out of range");
  }
  return static_cast<int64_t>(*v);
}

}  // namespace

Result<LlamaConfig> LlamaConfig::from_gguf(const GgufFile& f) {
  LlamaConfig c;
  KVGATE_ASSIGN_OR_RETURN(std::string_view arch, f.get_string("general.architecture"));
  c.architecture = std::string(arch);
  if (c.architecture != "llama") {
    return unimplemented("unsupported model architecture '" + c.architecture +
                         "' (supported: llama)");
  }
  const std::string p = c.architecture + ".";
  KVGATE_ASSIGN_OR_RETURN(c.n_layers, required_int(f, p + "block_count"));
  KVGATE_ASSIGN_OR_RETURN(c.n_embd, required_int(f, p + "embedding_length"));
  KVGATE_ASSIGN_OR_RETURN(c.n_ff, required_int(f, p + "feed_forward_length"));
  KVGATE_ASSIGN_OR_RETURN(c.n_heads, required_int(f, p + "attention.head_count"));
  c.n_kv_heads = c.n_heads;
  if (f.has(p + "attention.head_count_kv")) {
    KVGATE_ASSIGN_OR_RETURN(c.n_kv_heads, required_int(f, p + "attention.head_count_kv"));
  }
  if (c.n_embd % c.n_heads != 0) {
    return invalid_argument(p + "embedding_length is not a multiple of attention.head_count");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return invalid_argument(p + "attention.head_count is not a multiple of head_count_kv");
  }
  c.head_dim = c.n_embd / c.n_heads;
  if (c.head_dim % 2 != 0) return invalid_argument("head dimension must be even for RoPE");
  if (f.has(p + "rope.dimension_count")) {
    KVGATE_ASSIGN_OR_RETURN(int64_t rope_dims, required_int(f, p + "rope.dimension_count"));
    if (rope_dims != c.head_dim) {
      return unimplemented("partial RoPE (" + p + "rope.dimension_count = " +
                           std::to_string(rope_dims) + " != head dim) is not supported");
    }
  }
  c.n_ctx_train = 2048;
  if (f.has(p + "context_length")) {
    KVGATE_ASSIGN_OR_RETURN(c.n_ctx_train, required_int(f, p + "context_length"));
  }
  if (f.has(p + "rope.freq_base")) {
    KVGATE_ASSIGN_OR_RETURN(double base, f.get_float(p + "rope.freq_base"));
    if (!(base > 1.0) || !std::isfinite(base)) {
      return invalid_argument("metadata key '" + p + "rope.freq_base' must be > 1");
    }
    c.rope_freq_base = static_cast<float>(base);
  }
  if (f.has(p + "attention.layer_norm_rms_epsilon")) {
    KVGATE_ASSIGN_OR_RETURN(double eps, f.get_float(p + "attention.layer_norm_rms_epsilon"));
    if (!(eps > 0.0 && eps < 1.0)) {
      return invalid_argument("metadata key '" + p + "attention.layer_norm_rms_epsilon' out of range");
    }
    c.rms_eps = static_cast<float>(eps);
  }
  if (f.has(p + "vocab_size")) {
    KVGATE_ASSIGN_OR_RETURN(c.n_vocab, required_int(f, p + "vocab_size"));
  } else {
    KVGATE_ASSIGN_OR_RETURN(auto tokens, f.get_string_array("tokenizer.ggml.tokens"));
    c.n_vocab = static_cast<int64_t>(tokens.size());
  }
  return c;
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::load(const std::string& path) {
  KVGATE_ASSIGN_OR_RETURN(GgufFile file, GgufFile::open(path));
  return from_gguf(std::move(file));
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::from_gguf(GgufFile file) {
  std::unique_ptr<LlamaModel> m(new LlamaModel(std::move(file)));
  KVGATE_RETURN_IF_ERROR(m->bind());
  return m;
}

Result<cpu::WeightView> LlamaModel::matrix(const std::string& name, int64_t cols,
                                           int64_t rows) const {
  const GgufTensorInfo* t = file_.find_tensor(name);
  if (t == nullptr) return not_found("model tensor '" + name + "' missing");
  if (t->dims.size() != 2 || t->dims[0] != cols || t->dims[1] != rows) {
    std::string got;
    for (auto d : t->dims) got += (got.empty() ? "" : ",") + std::to_string(d);
    return invalid_argument("model tensor '" + name + "' has shape {" + got + "}, expected {" +
                            std::to_string(cols) + "," + std::to_string(rows) + "}");
  }
  switch (t->type) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ8_0:
      break;
    default: {
      auto traits = ggml_type_traits(static_cast<uint32_t>(t->type));
      return unimplemented("model tensor '" + name + "' has type " +
                           std::string(traits ? traits->name : "unknown") +
                           ", which the CPU backend does not support yet");
    }
  }
  return cpu::WeightView{t->type, t->data, rows, cols};
}

Result<const float*> LlamaModel::vector_f32(const std::string& name, int64_t n) {
  const GgufTensorInfo* t = file_.find_tensor(name);
  if (t == nullptr) return not_found("model tensor '" + name + "' missing");
  if (t->dims.size() != 1 || t->dims[0] != n) {
    return invalid_argument("model tensor '" + name + "' must be a vector of " +
                            std::to_string(n) + " elements");
  }
  if (t->type == GgmlType::kF32) return reinterpret_cast<const float*>(t->data);
  if (t->type != GgmlType::kF16 && t->type != GgmlType::kBF16) {
    return unimplemented("model tensor '" + name + "' must be F32, F16 or BF16");
  }
  auto buf = std::make_unique<float[]>(n);
  cpu::dequantize_row(t->type, t->data, buf.get(), n);
  owned_.push_back(std::move(buf));
  return owned_.back().get();
}

Status LlamaModel::bind() {
  KVGATE_ASSIGN_OR_RETURN(config_, LlamaConfig::from_gguf(file_));
  const LlamaConfig& c = config_;
  KVGATE_ASSIGN_OR_RETURN(token_embd_, matrix("token_embd.weight", c.n_embd, c.n_vocab));
  if (file_.find_tensor("output.weight") != nullptr) {
    KVGATE_ASSIGN_OR_RETURN(output_, matrix("output.weight", c.n_embd, c.n_vocab));
  } else {
    output_ = token_embd_;  // tied embeddings
  }
  KVGATE_ASSIGN_OR_RETURN(output_norm_, vector_f32("output_norm.weight", c.n_embd));
  layers_.resize(c.n_layers);
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    LayerWeights& l = layers_[i];
    KVGATE_ASSIGN_OR_RETURN(l.attn_norm, vector_f32(b + "attn_norm.weight", c.n_embd));
    KVGATE_ASSIGN_OR_RETURN(l.ffn_norm, vector_f32(b + "ffn_norm.weight", c.n_embd));
    KVGATE_ASSIGN_OR_RETURN(l.wq, matrix(b + "attn_q.weight", c.n_embd, c.q_dim()));
    KVGATE_ASSIGN_OR_RETURN(l.wk, matrix(b + "attn_k.weight", c.n_embd, c.kv_dim()));
    KVGATE_ASSIGN_OR_RETURN(l.wv, matrix(b + "attn_v.weight", c.n_embd, c.kv_dim()));
    KVGATE_ASSIGN_OR_RETURN(l.wo, matrix(b + "attn_output.weight", c.q_dim(), c.n_embd));
    KVGATE_ASSIGN_OR_RETURN(l.w_gate, matrix(b + "ffn_gate.weight", c.n_embd, c.n_ff));
    KVGATE_ASSIGN_OR_RETURN(l.w_up, matrix(b + "ffn_up.weight", c.n_embd, c.n_ff));
    KVGATE_ASSIGN_OR_RETURN(l.w_down, matrix(b + "ffn_down.weight", c.n_ff, c.n_embd));
  }
  return Status();
}

KvCache::KvCache(const LlamaConfig& c, int64_t capacity_tokens)
    : n_layers_(c.n_layers),
      n_kv_heads_(c.n_kv_heads),
      head_dim_(c.head_dim),
      capacity_(capacity_tokens),
      data_(static_cast<size_t>(c.n_layers * 2 * c.n_kv_heads * capacity_tokens * c.head_dim)) {}

int64_t KvCache::used_bytes() const {
  return n_layers_ * 2 * n_kv_heads_ * n_tokens_ * head_dim_ * static_cast<int64_t>(sizeof(fp16_t));
}

const fp16_t* KvCache::k(int64_t layer, int64_t kv_head) const {
  return data_.data() + (((layer * 2 + 0) * n_kv_heads_ + kv_head) * capacity_) * head_dim_;
}
const fp16_t* KvCache::v(int64_t layer, int64_t kv_head) const {
  return data_.data() + (((layer * 2 + 1) * n_kv_heads_ + kv_head) * capacity_) * head_dim_;
}

namespace {

// INVALID_ARGUMENT naming the first token id outside [0, n_vocab).
Status check_token_ids(std::span<const int32_t> tokens, int64_t n_vocab, const std::string& prefix) {
  for (int32_t t : tokens) {
    if (t < 0 || t >= n_vocab) {
      return invalid_argument(prefix + "token id " + std::to_string(t) + " outside the vocabulary [0, " +
                              std::to_string(n_vocab) + ")");
    }
  }
  return Status();
}

}  // namespace

CpuForward::CpuForward(const LlamaModel& model, const ForwardOptions& options)
    : model_(model), options_(options), pool_(options.n_threads) {
  options_.max_batch_tokens = std::max<int64_t>(1, options_.max_batch_tokens);
}

void CpuForward::ensure_scratch(int64_t n_tokens, int64_t max_context) {
  const LlamaConfig& c = model_.config();
  const size_t rows = static_cast<size_t>(std::max(n_tokens, options_.max_batch_tokens));
  if (x_.size() < rows * c.n_embd) {
    x_.resize(rows * c.n_embd);
    xn_.resize(rows * c.n_embd);
    q_.resize(rows * c.q_dim());
    k_.resize(rows * c.kv_dim());
    v_.resize(rows * c.kv_dim());
    attn_.resize(rows * c.q_dim());
    gate_.resize(rows * c.n_ff);
    up_.resize(rows * c.n_ff);
    row_pos_.resize(rows);
    row_item_.resize(rows);
  }
  if (max_context > scratch_context_) {
    scratch_context_ = max_context;
    scores_.resize(static_cast<size_t>(pool_.size()) * max_context);
  }
}

Status CpuForward::forward(std::span<const BatchItem> items, float* logits_out) {
  const LlamaConfig& c = model_.config();
  int64_t n = 0;
  int64_t max_context = 0;
  int64_t n_logits = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const BatchItem& it = items[i];
    if (it.cache == nullptr) return invalid_argument("batch item " + std::to_string(i) + " has no cache");
    if (it.tokens.empty()) return invalid_argument("batch item " + std::to_string(i) + " has no tokens");
    const int64_t end = it.cache->n_tokens() + static_cast<int64_t>(it.tokens.size());
    if (end > it.cache->capacity()) {
      return out_of_range("sequence of " + std::to_string(end) + " tokens exceeds its KV cache of " +
                          std::to_string(it.cache->capacity()) + " tokens");
    }
    KVGATE_RETURN_IF_ERROR(check_token_ids(it.tokens, c.n_vocab, ""));
    n += static_cast<int64_t>(it.tokens.size());
    max_context = std::max(max_context, end);
    n_logits += it.want_logits ? 1 : 0;
  }
  if (n == 0) return Status();
  if (n > options_.max_batch_tokens) {
    return invalid_argument("forward step of " + std::to_string(n) + " tokens exceeds max_batch_tokens " +
                            std::to_string(options_.max_batch_tokens));
  }
  ensure_scratch(n, max_context);

  // Embeddings and the position of every row.
  int64_t row = 0;
  const auto& emb = model_.token_embd();
  const uint64_t emb_row_bytes = *ggml_row_bytes(emb.type, c.n_embd);
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t base = items[i].cache->n_tokens();
    for (size_t j = 0; j < items[i].tokens.size(); ++j, ++row) {
      const auto* src = static_cast<const uint8_t*>(emb.data) + emb_row_bytes * items[i].tokens[j];
      cpu::dequantize_row(emb.type, src, x_.data() + row * c.n_embd, c.n_embd);
      row_pos_[row] = base + static_cast<int64_t>(j);
      row_item_[row] = static_cast<int32_t>(i);
    }
  }

  run_layers(n, items, {});
  for (const BatchItem& it : items) {
    it.cache->set_n_tokens(it.cache->n_tokens() + static_cast<int64_t>(it.tokens.size()));
  }
  if (n_logits == 0) return Status();
  std::vector<int64_t> rows;
  rows.reserve(n_logits);
  row = 0;
  for (const BatchItem& it : items) {
    row += static_cast<int64_t>(it.tokens.size());
    if (it.want_logits) rows.push_back(row - 1);
  }
  compute_logits(rows, logits_out);
  return Status();
}

void CpuForward::compute_logits(const std::vector<int64_t>& rows, float* logits_out) {
  const LlamaConfig& c = model_.config();
  // Final norm of the rows that want logits, then the vocabulary projection
  // for just those rows.
  for (size_t i = 0; i < rows.size(); ++i) {
    cpu::rms_norm(x_.data() + rows[i] * c.n_embd, model_.output_norm(), xn_.data() + i * c.n_embd,
                  c.n_embd, c.rms_eps, options_.isa);
  }
  cpu::matmul(model_.output(), xn_.data(), static_cast<int64_t>(rows.size()), logits_out, pool_, ws_,
              options_.isa);
}

void CpuForward::run_layers(int64_t n, std::span<const BatchItem> dense,
                            std::span<const CompressedItem> compressed) {
  for (int64_t l = 0; l < model_.config().n_layers; ++l) run_layer(l, n, dense, compressed);
}

void CpuForward::run_layer(int64_t l, int64_t n, std::span<const BatchItem> dense,
                           std::span<const CompressedItem> compressed) {
  const LlamaConfig& c = model_.config();
  const cpu::Isa isa = options_.isa;
  {
    const LayerWeights& w = model_.layers()[l];
    for (int64_t r = 0; r < n; ++r) {
      cpu::rms_norm(x_.data() + r * c.n_embd, w.attn_norm, xn_.data() + r * c.n_embd, c.n_embd,
                    c.rms_eps, isa);
    }
    if (observer_ != nullptr) {
      observer_->on_layer_input(l, xn_.data(), n, std::span<const int64_t>(row_pos_.data(), n),
                                std::span<const int32_t>(row_item_.data(), n));
    }
    if (item_observers_ != nullptr) {
      // Each sequence's own observer sees its rows (contiguous in a step)
      // as a batch of one.
      for (int64_t r0 = 0; r0 < n;) {
        int64_t r1 = r0 + 1;
        while (r1 < n && row_item_[r1] == row_item_[r0]) ++r1;
        LayerInputObserver* o = (*item_observers_)[row_item_[r0]];
        if (o != nullptr) {
          zero_items_.assign(static_cast<size_t>(r1 - r0), 0);
          o->on_layer_input(l, xn_.data() + r0 * c.n_embd, r1 - r0,
                            std::span<const int64_t>(row_pos_.data() + r0, r1 - r0), zero_items_);
        }
        r0 = r1;
      }
    }
    cpu::matmul(w.wq, xn_.data(), n, q_.data(), pool_, ws_, isa);
    cpu::matmul(w.wk, xn_.data(), n, k_.data(), pool_, ws_, isa);
    cpu::matmul(w.wv, xn_.data(), n, v_.data(), pool_, ws_, isa);
    for (int64_t r = 0; r < n; ++r) {
      float* q = q_.data() + r * c.q_dim();
      float* k = k_.data() + r * c.kv_dim();
      cpu::rope_norm(q, c.n_heads, c.head_dim, row_pos_[r], c.rope_freq_base, isa);
      cpu::rope_norm(k, c.n_kv_heads, c.head_dim, row_pos_[r], c.rope_freq_base, isa);
      // The query meets fp16 keys; llama.cpp rounds it to fp16 for that dot
      // product, and so do we (the products are then exact in fp32).
      for (int64_t e = 0; e < c.q_dim(); ++e) q[e] = fp16_to_fp32(fp32_to_fp16(q[e]));
      if (!compressed.empty()) {
        // Later layers of a block score distant tokens with this layer's query.
        std::copy(q, q + c.q_dim(), q_layers_.data() + (r * c.n_layers + l) * c.q_dim());
      }
      for (int64_t h = 0; h < c.n_kv_heads; ++h) {
        fp16_t* k_dst;
        fp16_t* v_dst;
        if (!dense.empty()) {
          KvCache* cache = dense[row_item_[r]].cache;
          k_dst = cache->k(l, h) + row_pos_[r] * c.head_dim;
          v_dst = cache->v(l, h) + row_pos_[r] * c.head_dim;
        } else {
          kvstore::CompressedKvCache* cache = compressed[row_item_[r]].cache;
          k_dst = cache->new_k_row(l, h);
          v_dst = cache->new_v_row(l, h);
        }
        cpu::convert_f32_to_f16(k + h * c.head_dim, k_dst, c.head_dim, isa);
        cpu::convert_f32_to_f16(v_.data() + r * c.kv_dim() + h * c.head_dim, v_dst, c.head_dim, isa);
      }
    }
    if (!dense.empty()) {
      attention(l, dense, n);
    } else {
      attention_compressed(l, compressed);
    }
    cpu::matmul(w.wo, attn_.data(), n, xn_.data(), pool_, ws_, isa);
    cpu::add_inplace(x_.data(), xn_.data(), n * c.n_embd, isa);

    for (int64_t r = 0; r < n; ++r) {
      cpu::rms_norm(x_.data() + r * c.n_embd, w.ffn_norm, xn_.data() + r * c.n_embd, c.n_embd,
                    c.rms_eps, isa);
    }
    cpu::matmul(w.w_gate, xn_.data(), n, gate_.data(), pool_, ws_, isa);
    cpu::matmul(w.w_up, xn_.data(), n, up_.data(), pool_, ws_, isa);
    cpu::swiglu(gate_.data(), up_.data(), gate_.data(), n * c.n_ff, isa);
    cpu::matmul(w.w_down, gate_.data(), n, xn_.data(), pool_, ws_, isa);
    cpu::add_inplace(x_.data(), xn_.data(), n * c.n_embd, isa);
  }
}

Status CpuForward::forward_compressed(std::span<const CompressedItem> items, float* logits_out) {
  const LlamaConfig& c = model_.config();
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return Status();
  if (n > options_.max_batch_tokens) {
    return invalid_argument("decode batch of " + std::to_string(n) + " exceeds max_batch_tokens " +
                            std::to_string(options_.max_batch_tokens));
  }
  for (int64_t i = 0; i < n; ++i) {
    const CompressedItem& it = items[i];
    if (it.cache == nullptr) return invalid_argument("batch item " + std::to_string(i) + " has no cache");
    KVGATE_RETURN_IF_ERROR(check_token_ids(std::span<const int32_t>(&it.token, 1), c.n_vocab, ""));
    if (!it.cache->host_accessible()) {
      return failed_precondition("batch item " + std::to_string(i) +
                                 ": the cache's pages are in device memory (decode it with the "
                                 "CUDA backend)");
    }
    if (it.cache->layout().n_layers() != c.n_layers || it.cache->layout().n_kv_heads() != c.n_kv_heads ||
        it.cache->layout().head_dim != c.head_dim) {
      return invalid_argument("batch item " + std::to_string(i) + ": cache layout does not match the model");
    }
  }
  ensure_scratch(n, 1);
  if (q_layers_.size() < static_cast<size_t>(n * c.n_layers * c.q_dim())) {
    q_layers_.resize(static_cast<size_t>(n * c.n_layers * c.q_dim()));
  }
  // Claim every sequence's new row first: a full pool fails before any
  // compute, and attention at layer l sees this token's own K/V.
  for (int64_t i = 0; i < n; ++i) {
    KVGATE_RETURN_IF_ERROR(items[i].cache->begin_append(items[i].cache->n_tokens(), items[i].flags));
  }
  const auto& emb = model_.token_embd();
  const uint64_t emb_row_bytes = *ggml_row_bytes(emb.type, c.n_embd);
  for (int64_t i = 0; i < n; ++i) {
    const auto* src = static_cast<const uint8_t*>(emb.data) + emb_row_bytes * items[i].token;
    cpu::dequantize_row(emb.type, src, x_.data() + i * c.n_embd, c.n_embd);
    row_pos_[i] = items[i].cache->n_tokens() - 1;
    row_item_[i] = static_cast<int32_t>(i);
  }
  run_layers(n, {}, items);
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < n; ++i) {
    if (items[i].want_logits) rows.push_back(i);
  }
  if (!rows.empty()) compute_logits(rows, logits_out);
  return Status();
}

void CpuForward::attention_compressed(int64_t layer, std::span<const CompressedItem> items) {
  const LlamaConfig& c = model_.config();
  const int64_t n_pairs = static_cast<int64_t>(items.size()) * c.n_heads;
  const int64_t group = c.n_heads / c.n_kv_heads;
  pool_.run([&](int tid, int nth) {
    for (int64_t pair = tid; pair < n_pairs; pair += nth) {
      const int64_t r = pair / c.n_heads;
      const int64_t h = pair % c.n_heads;
      const kvstore::CompressedKvCache& cache = *items[r].cache;
      const int64_t base = cache.layout().blocks.base_layer(layer, h / group);
      const float* q_base = q_layers_.data() + (r * c.n_layers + base) * c.q_dim() + h * c.head_dim;
      // Cannot fail: layer, head and the cache were validated by the caller.
      (void)kvstore::attend(cache, layer, h, c.n_heads, q_.data() + r * c.q_dim() + h * c.head_dim,
                            q_base, attn_.data() + r * c.q_dim() + h * c.head_dim, options_.isa);
    }
  });
}

void CpuForward::attention(int64_t layer, std::span<const BatchItem> items, int64_t n) {
  const LlamaConfig& c = model_.config();
  const cpu::Isa isa = options_.isa;
  const int64_t group = c.n_heads / c.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const int64_t n_pairs = n * c.n_heads;
  const int64_t ctx_stride = scratch_context_;
  pool_.run([&](int tid, int nth) {
    float* scores = scores_.data() + tid * ctx_stride;
    // Interleaved assignment balances rows of different context lengths.
    for (int64_t pair = tid; pair < n_pairs; pair += nth) {
      const int64_t r = pair / c.n_heads;
      const int64_t h = pair % c.n_heads;
      const int64_t kvh = h / group;
      const KvCache* cache = items[row_item_[r]].cache;
      const int64_t len = row_pos_[r] + 1;  // causal: keys 0..pos
      const float* q = q_.data() + r * c.q_dim() + h * c.head_dim;
      const fp16_t* keys = cache->k(layer, kvh);
      const fp16_t* vals = cache->v(layer, kvh);
      for (int64_t j = 0; j < len; ++j) {
        scores[j] = cpu::dot_f16_f32(keys + j * c.head_dim, q, c.head_dim, isa) * scale;
      }
      if (stats_ != nullptr && stats_->capture_from >= 0 && row_pos_[r] >= stats_->capture_from) {
        // Raw scaled scores (before the softmax). Rows are disjoint per
        // (head, query): written without a reduction.
        float* cap = stats_->captured.data() +
                     ((layer * c.n_heads + h) * stats_->n_captured() +
                      (row_pos_[r] - stats_->capture_from)) * stats_->n_tokens;
        std::copy(scores, scores + len, cap);
      }
      cpu::softmax_inplace(scores, len, isa);
      if (stats_ != nullptr) {
        // Per-share partial sums; reduced into stats_ after the region.
        const int64_t nt = stats_->n_tokens;
        float* recv = stats_scratch_.data() + (tid * 4 * c.n_kv_heads + kvh) * nt;
        for (int64_t j = 0; j < len; ++j) recv[j] += scores[j];
        if (row_pos_[r] >= stats_->observe_from) {
          float* obs = recv + c.n_kv_heads * nt;
          for (int64_t j = 0; j < len; ++j) obs[j] += scores[j];
        }
        if (stats_->distant_window > 0) {
          // Keys at least W before the query: j <= pos - W.
          float* dist = recv + 2 * c.n_kv_heads * nt;
          float* dmax = recv + 3 * c.n_kv_heads * nt;
          const int64_t n_far = row_pos_[r] - stats_->distant_window + 1;
          for (int64_t j = 0; j < n_far; ++j) {
            dist[j] += scores[j];
            dmax[j] = std::max(dmax[j], scores[j]);
          }
        }
      }
      float* out = attn_.data() + r * c.q_dim() + h * c.head_dim;
      std::fill(out, out + c.head_dim, 0.0f);
      for (int64_t j = 0; j < len; ++j) {
        // Probabilities meet fp16 values: rounded to fp16 as llama.cpp does.
        const float p = fp16_to_fp32(fp32_to_fp16(scores[j]));
        cpu::axpy_f16(p, vals + j * c.head_dim, out, c.head_dim, isa);
      }
    }
  });
  if (stats_ != nullptr) {
    const int64_t nt = stats_->n_tokens;
    for (int t = 0; t < pool_.size(); ++t) {
      float* part = stats_scratch_.data() + t * 4 * c.n_kv_heads * nt;
      for (int64_t h = 0; h < c.n_kv_heads; ++h) {
        float* recv = stats_->received_row(layer, h);
        float* obs = stats_->observed_row(layer, h);
        for (int64_t j = 0; j < nt; ++j) {
          recv[j] += part[h * nt + j];
          obs[j] += part[(c.n_kv_heads + h) * nt + j];
        }
        if (stats_->distant_window > 0) {
          float* dist = stats_->received_distant_row(layer, h);
          float* dmax = stats_->received_distant_max.data() + (layer * c.n_kv_heads + h) * nt;
          for (int64_t j = 0; j < nt; ++j) {
            dist[j] += part[(2 * c.n_kv_heads + h) * nt + j];
            dmax[j] = std::max(dmax[j], part[(3 * c.n_kv_heads + h) * nt + j]);
          }
        }
      }
      std::fill(part, part + 4 * c.n_kv_heads * nt, 0.0f);
    }
  }
}

void AttentionStats::reset(int64_t layers, int64_t kv_heads, int64_t tokens, int64_t observe_from_pos) {
  n_layers = layers;
  n_kv_heads = kv_heads;
  n_tokens = tokens;
  observe_from = observe_from_pos;
  received.assign(static_cast<size_t>(layers * kv_heads * tokens), 0.0f);
  observed.assign(static_cast<size_t>(layers * kv_heads * tokens), 0.0f);
  distant_window = 0;
  received_distant.clear();
  received_distant_max.clear();
  capture_from = -1;
  captured.clear();
}

void AttentionStats::enable_distant(int64_t window) {
  distant_window = window;
  received_distant.assign(static_cast<size_t>(n_layers * n_kv_heads * n_tokens), 0.0f);
  received_distant_max.assign(static_cast<size_t>(n_layers * n_kv_heads * n_tokens), 0.0f);
}

void AttentionStats::enable_capture(int64_t q_heads, int64_t from_pos) {
  n_q_heads = q_heads;
  capture_from = std::clamp<int64_t>(from_pos, 0, n_tokens);
  captured.assign(static_cast<size_t>(n_layers * n_q_heads * n_captured() * n_tokens), 0.0f);
}

Status CpuForward::prefill(KvCache& cache, std::span<const int32_t> tokens, float* logits_out,
                           AttentionStats* stats) {
  if (tokens.empty()) return invalid_argument("prompt is empty");
  const LlamaConfig& c = model_.config();
  if (stats != nullptr) {
    if (stats->n_layers != c.n_layers || stats->n_kv_heads != c.n_kv_heads ||
        stats->n_tokens < cache.n_tokens() + static_cast<int64_t>(tokens.size())) {
      return invalid_argument("attention stats are not sized for this model and prompt");
    }
    if (stats->capture_from >= 0 && stats->n_q_heads != c.n_heads) {
      return invalid_argument("attention capture is not sized for this model's query heads");
    }
    stats_ = stats;
    stats_scratch_.assign(static_cast<size_t>(pool_.size()) * 4 * c.n_kv_heads * stats->n_tokens, 0.0f);
  }
  struct Reset {
    AttentionStats** p;
    ~Reset() { *p = nullptr; }
  } reset{&stats_};
  const int64_t chunk = options_.max_batch_tokens;
  for (size_t start = 0; start < tokens.size(); start += chunk) {
    const size_t len = std::min<size_t>(chunk, tokens.size() - start);
    const bool last = start + len == tokens.size();
    BatchItem item{&cache, tokens.subspan(start, len), last};
    KVGATE_RETURN_IF_ERROR(forward(std::span<const BatchItem>(&item, 1), last ? logits_out : nullptr));
  }
  return Status();
}

// Steps of a layer-major prefill, as ranges of rows of the sequences'
// concatenation. Every token must meet the same matmul kernel as in
// prefill() of its sequence alone, which cuts the sequence into chunks of
// max_batch_tokens: a chunk of at most `small` tokens (the kernels' switch,
// cpu::matmul_small_batch_tokens) runs on the small-batch kernel, any other
// on the large one, whose per-token result does not depend on the step.
// So: the rows of large chunks, in order, packed into steps of up to
// max_batch_tokens (never leaving a last step of `small` rows or fewer);
// then each small chunk as a step of its own (it is a sequence's tail, so
// the rows it attends to are done by then).
std::vector<std::vector<CpuForward::RowRange>> CpuForward::plan_prefill_steps(
    std::span<const PrefillSequence> seqs) const {
  const int64_t chunk = options_.max_batch_tokens;
  const int64_t small = cpu::matmul_small_batch_tokens(options_.isa);
  std::vector<std::vector<RowRange>> steps;
  // One sequence, or chunks too small to pack safely: prefill()'s own steps.
  if (seqs.size() == 1 || chunk <= 2 * small + 1) {
    int64_t base = 0;
    for (const PrefillSequence& s : seqs) {
      const auto len = static_cast<int64_t>(s.tokens.size());
      for (int64_t r = 0; r < len; r += chunk) {
        steps.push_back({RowRange{base + r, base + std::min(len, r + chunk)}});
      }
      base += len;
    }
    return steps;
  }
  std::vector<RowRange> large;  // rows of large chunks, merged where adjacent
  std::vector<RowRange> tails;  // small chunks
  int64_t base = 0;
  for (const PrefillSequence& s : seqs) {
    const auto len = static_cast<int64_t>(s.tokens.size());
    for (int64_t r = 0; r < len; r += chunk) {
      const RowRange range{base + r, base + std::min(len, r + chunk)};
      if (range.end - range.begin <= small) {
        tails.push_back(range);
      } else if (!large.empty() && large.back().end == range.begin) {
        large.back().end = range.end;
      } else {
        large.push_back(range);
      }
    }
    base += len;
  }
  int64_t total = 0;
  for (const RowRange& r : large) total += r.end - r.begin;
  // Step sizes: chunk, chunk, ..., then the rest; a rest of `small` rows or
  // fewer borrows from the step before it (chunk > 2 * small + 1, so both
  // stay above `small`).
  std::vector<int64_t> sizes;
  for (int64_t left = total; left > 0; left -= std::min(chunk, left)) sizes.push_back(std::min(chunk, left));
  if (sizes.size() >= 2 && sizes.back() <= small) {
    const int64_t move = small + 1 - sizes.back();
    sizes[sizes.size() - 2] -= move;
    sizes.back() += move;
  }
  size_t at = 0;
  int64_t offset = 0;  // rows of large[at] already placed
  for (int64_t size : sizes) {
    std::vector<RowRange> step;
    for (int64_t need = size; need > 0;) {
      const int64_t take = std::min(need, large[at].end - large[at].begin - offset);
      step.push_back({large[at].begin + offset, large[at].begin + offset + take});
      need -= take;
      offset += take;
      if (large[at].begin + offset == large[at].end) {
        ++at;
        offset = 0;
      }
    }
    steps.push_back(std::move(step));
  }
  for (const RowRange& t : tails) steps.push_back({t});
  return steps;
}

Status CpuForward::prefill_layers(std::span<const PrefillSequence> seqs,
                                  const std::function<Status(int64_t layer)>& layer_done) {
  const LlamaConfig& c = model_.config();
  if (seqs.empty()) return invalid_argument("prefill of no sequences");
  int64_t total = 0;
  int64_t max_context = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const PrefillSequence& s = seqs[i];
    const std::string which = "prefill sequence " + std::to_string(i);
    if (s.cache == nullptr) return invalid_argument(which + " has no cache");
    if (s.tokens.empty()) return invalid_argument(which + ": prompt is empty");
    const int64_t end = s.cache->n_tokens() + static_cast<int64_t>(s.tokens.size());
    if (end > s.cache->capacity()) {
      return out_of_range(which + ": " + std::to_string(end) + " tokens exceed its KV cache of " +
                          std::to_string(s.cache->capacity()) + " tokens");
    }
    KVGATE_RETURN_IF_ERROR(check_token_ids(s.tokens, c.n_vocab, which + ": "));
    if (s.stats != nullptr) {
      if (seqs.size() != 1) {
        return invalid_argument("attention statistics are recorded for a prefill of one sequence only");
      }
      if (s.stats->n_layers != c.n_layers || s.stats->n_kv_heads != c.n_kv_heads ||
          s.stats->n_tokens < end || (s.stats->capture_from >= 0 && s.stats->n_q_heads != c.n_heads)) {
        return invalid_argument("attention stats are not sized for this model and prompt");
      }
    }
    total += static_cast<int64_t>(s.tokens.size());
    max_context = std::max(max_context, end);
  }
  const int64_t chunk = options_.max_batch_tokens;
  ensure_scratch(std::min(total, chunk), max_context);

  // The residual stream of every prompt token lives here between layers;
  // each step copies its rows into the step scratch and back.
  std::vector<float> x_all(static_cast<size_t>(total * c.n_embd));
  std::vector<int64_t> pos_all(static_cast<size_t>(total));
  std::vector<int32_t> item_all(static_cast<size_t>(total));
  std::vector<BatchItem> items(seqs.size());
  std::vector<LayerInputObserver*> observers(seqs.size(), nullptr);
  bool any_observer = false;
  const auto& emb = model_.token_embd();
  const uint64_t emb_row_bytes = *ggml_row_bytes(emb.type, c.n_embd);
  int64_t row = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    items[i] = BatchItem{seqs[i].cache, seqs[i].tokens, false};
    observers[i] = seqs[i].observer;
    any_observer = any_observer || seqs[i].observer != nullptr;
    const int64_t base = seqs[i].cache->n_tokens();
    for (size_t j = 0; j < seqs[i].tokens.size(); ++j, ++row) {
      const auto* src = static_cast<const uint8_t*>(emb.data) + emb_row_bytes * seqs[i].tokens[j];
      cpu::dequantize_row(emb.type, src, x_all.data() + row * c.n_embd, c.n_embd);
      pos_all[row] = base + static_cast<int64_t>(j);
      item_all[row] = static_cast<int32_t>(i);
    }
  }

  AttentionStats* stats = seqs.size() == 1 ? seqs[0].stats : nullptr;
  if (stats != nullptr) {
    stats_scratch_.assign(static_cast<size_t>(pool_.size()) * 4 * c.n_kv_heads * stats->n_tokens, 0.0f);
  }
  struct Reset {
    CpuForward* f;
    ~Reset() {
      f->stats_ = nullptr;
      f->item_observers_ = nullptr;
    }
  } reset{this};
  stats_ = stats;
  item_observers_ = any_observer ? &observers : nullptr;

  const std::vector<std::vector<RowRange>> steps = plan_prefill_steps(seqs);
  const std::span<const BatchItem> dense(items);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    // A row's attention at layer l needs the K/V of layer l of the rows
    // before it in its sequence, written by earlier steps of this layer (or
    // earlier in this step): the plan keeps each sequence's rows in order.
    for (const std::vector<RowRange>& step : steps) {
      int64_t n = 0;
      for (const RowRange& r : step) {
        std::copy(x_all.data() + r.begin * c.n_embd, x_all.data() + r.end * c.n_embd,
                  x_.data() + n * c.n_embd);
        std::copy(pos_all.data() + r.begin, pos_all.data() + r.end, row_pos_.data() + n);
        std::copy(item_all.data() + r.begin, item_all.data() + r.end, row_item_.data() + n);
        n += r.end - r.begin;
      }
      run_layer(l, n, dense, {});
      n = 0;
      for (const RowRange& r : step) {
        std::copy(x_.data() + n * c.n_embd, x_.data() + (n + r.end - r.begin) * c.n_embd,
                  x_all.data() + r.begin * c.n_embd);
        n += r.end - r.begin;
      }
    }
    if (layer_done) KVGATE_RETURN_IF_ERROR(layer_done(l));
  }

  // Logits of the last token of every sequence that wants them, one row at
  // a time: the vocabulary projection of a single row is what prefill()
  // computes (the matmul kernels for several rows may sum in another order).
  row = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const auto len = static_cast<int64_t>(seqs[i].tokens.size());
    row += len;
    seqs[i].cache->set_n_tokens(seqs[i].cache->n_tokens() + len);
    if (seqs[i].logits == nullptr) continue;
    std::copy(x_all.data() + (row - 1) * c.n_embd, x_all.data() + row * c.n_embd, x_.data());
    compute_logits({0}, seqs[i].logits);
  }
  return Status();
}

}  // namespace kvgate::engine
