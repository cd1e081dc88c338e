#include "engine/cuda/cuda_forward.h"

#include "engine/cuda/cuda_forward_impl.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <utility>

#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/launch_plan.h"

namespace kvgate::engine::cuda {
namespace {

using detail::Layer;
using detail::Matrix;

std::string str(int64_t v) {
  return std::to_string(v);
}

Status launched(cudaError_t err, const char* what) {
  return cuda_status(static_cast<int>(err), what);
}


Result<DeviceBuffer> upload_bytes(const void* src, size_t bytes, const std::string& what) {
  auto buf = DeviceBuffer::allocate(bytes);
  if (!buf.ok()) {
    return Status(buf.status().code(), "cuda forward: " + what + ": " + buf.status().message());
  }
  KVGATE_RETURN_IF_ERROR(buf->upload(src, bytes));
  return std::move(buf).value();
}

Result<EmbedType> embed_type(GgmlType t) {
  switch (t) {
    case GgmlType::kF32:
      return EmbedType::kF32;
    case GgmlType::kF16:
      return EmbedType::kF16;
    case GgmlType::kQ4_1:
      return EmbedType::kQ4_1;
    case GgmlType::kQ8_0:
      return EmbedType::kQ8_0;
    default:
      return unimplemented("cuda forward: token embedding type " + str(static_cast<int64_t>(t)) +
                           " (F32, F16, Q4_1, Q8_0 only)");
  }
}

// The shape plan_forward_memory counts, when every layer matrix has one
// type (otherwise the uploads find out one by one).
std::optional<ForwardMemoryShape> memory_shape(const HostWeights& w, const CudaForwardOptions& o) {
  const LlamaConfig& c = w.config;
  if (w.layers.empty()) return std::nullopt;
  const GgmlType t = w.layers[0].wq.type;
  for (const LayerWeights& l : w.layers) {
    for (const cpu::WeightView* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      if (m->type != t) return std::nullopt;
    }
  }
  ForwardMemoryShape s;
  s.n_layers = c.n_layers;
  s.n_embd = c.n_embd;
  s.n_ff = c.n_ff;
  s.n_heads = c.n_heads;
  s.n_kv_heads = c.n_kv_heads;
  s.head_dim = c.head_dim;
  s.n_vocab = c.n_vocab;
  s.layer_type = t;
  s.embd_type = w.token_embd.type;
  s.tied_output = w.output.data == w.token_embd.data && w.output.type == w.token_embd.type;
  s.output_type = w.output.type;
  s.max_context = o.max_context_tokens;
  s.max_prefill = o.max_prefill_tokens;
  return s;
}

}  // namespace



Status CudaForward::Impl::upload_matrix(const cpu::WeightView& view, int64_t rows, int64_t cols,
                                        bool need_gemm, const std::string& name, Matrix& m) {
  if (view.data == nullptr || view.rows != rows || view.cols != cols) {
    return invalid_argument("cuda forward: " + name + " is missing or not " + str(rows) + " x " +
                            str(cols));
  }
  auto gp = plan_gemv(view.type, rows, cols, kGemvMaxTokens);
  if (!gp.ok()) return Status(gp.status().code(), name + ": " + gp.status().message());
  m.gemv = *gp;
  KVGATE_ASSIGN_OR_RETURN(
      m.raw, upload_bytes(view.data, static_cast<size_t>(rows * m.gemv.row_bytes), name));
  gemv_bytes += m.raw.bytes();
  if (!need_gemm) return Status();
  auto mp = plan_gemm(view.type, rows, cols, opt.max_prefill_tokens);
  if (!mp.ok()) return Status(mp.status().code(), name + ": " + mp.status().message());
  m.gemm = *mp;
  if (view.type != GgmlType::kF16) {
    KVGATE_ASSIGN_OR_RETURN(m.f16, weight_to_f16(m.gemm, m.raw.data(), s()));
    gemm_bytes += m.f16.bytes();
  }
  return Status();
}

Status CudaForward::Impl::build(const HostWeights& w) {
  c = w.config;
  if (c.n_layers < 1 || c.n_embd < 1 || c.n_heads < 1 || c.n_kv_heads < 1 || c.head_dim < 1 ||
      c.n_vocab < 1 || c.n_ff < 1 || c.n_heads % c.n_kv_heads != 0 ||
      static_cast<int64_t>(w.layers.size()) != c.n_layers || w.output_norm == nullptr) {
    return invalid_argument("cuda forward: inconsistent model configuration or missing layers");
  }
  if (opt.max_context_tokens < 1 || opt.max_prefill_tokens < 1 ||
      opt.max_prefill_tokens > opt.max_context_tokens) {
    return invalid_argument("cuda forward: max_prefill_tokens (" + str(opt.max_prefill_tokens) +
                            ") must be in [1, max_context_tokens (" + str(opt.max_context_tokens) +
                            ")]");
  }
  // Plans first: a shape the kernels cannot take fails before any upload.
  KVGATE_ASSIGN_OR_RETURN(const int sms, multiprocessor_count());
  sm_count = sms;
  AttentionShape as;
  as.n_tasks = c.n_kv_heads;
  as.group = c.n_heads / c.n_kv_heads;
  as.head_dim = c.head_dim;
  as.page_tokens = opt.max_context_tokens;  // one "page": the whole cache of a KV head
  as.max_rows = opt.max_context_tokens;
  as.sm_count = sms;
  KVGATE_ASSIGN_OR_RETURN(decode_plan, plan_decode_attention(as));
  KVGATE_ASSIGN_OR_RETURN(prefill_plan,
                          plan_prefill_attention({opt.max_prefill_tokens, c.n_heads, c.n_kv_heads,
                                                  c.head_dim, opt.max_context_tokens}));
  KVGATE_ASSIGN_OR_RETURN(embd_type, embed_type(w.token_embd.type));
  KVGATE_ASSIGN_OR_RETURN(stream, CudaStream::create());
  KVGATE_ASSIGN_OR_RETURN(cublas, CublasHandle::create());
  // Does it fit? Counted before the first upload, so a model too large for
  // the device fails at once, with the sizes, not after gigabytes of copies.
  if (const auto shape = memory_shape(w, opt)) {
    auto need = plan_forward_memory(*shape);
    if (!need.ok()) {
      return Status(need.status().code(), "cuda forward: " + need.status().message());
    }
    size_t free_bytes = 0, total_bytes = 0;
    KVGATE_RETURN_IF_ERROR(cuda_status(cudaMemGetInfo(&free_bytes, &total_bytes), "memory info"));
    if (need->total_bytes > free_bytes) {
      return resource_exhausted(
          "cuda forward: the model needs ~" + str(static_cast<int64_t>(need->total_bytes >> 20)) +
          " MiB of device memory (weights " +
          str(static_cast<int64_t>(
              (need->gemv_weight_bytes + need->embedding_bytes + need->gemm_weight_bytes) >> 20)) +
          " MiB, KV cache " + str(static_cast<int64_t>(need->kv_cache_bytes >> 20)) +
          " MiB, scratch " + str(static_cast<int64_t>(need->scratch_bytes >> 20)) + " MiB); " +
          str(static_cast<int64_t>(free_bytes >> 20)) + " MiB are free");
    }
  }

  // Weights.
  const auto row_bytes = ggml_row_bytes(w.token_embd.type, static_cast<uint64_t>(c.n_embd));
  if (!row_bytes || w.token_embd.data == nullptr || w.token_embd.rows != c.n_vocab ||
      w.token_embd.cols != c.n_embd) {
    return invalid_argument("cuda forward: token embedding is missing or mis-shaped");
  }
  embd_row_bytes = static_cast<int64_t>(*row_bytes);
  KVGATE_ASSIGN_OR_RETURN(
      embd, upload_bytes(w.token_embd.data, static_cast<size_t>(c.n_vocab * embd_row_bytes),
                         "token_embd"));
  if (w.output.data == w.token_embd.data && w.output.type == w.token_embd.type) {
    KVGATE_ASSIGN_OR_RETURN(output_gemv,
                            plan_gemv(w.output.type, c.n_vocab, c.n_embd, kGemvMaxTokens));
    output_rows = embd.data();
    gemv_bytes += embd.bytes();
  } else {
    KVGATE_RETURN_IF_ERROR(
        upload_matrix(w.output, c.n_vocab, c.n_embd, false, "output", output_own));
    output_gemv = output_own.gemv;
    output_rows = output_own.raw.data();
  }
  const size_t norm_bytes = static_cast<size_t>(c.n_embd) * sizeof(float);
  KVGATE_ASSIGN_OR_RETURN(output_norm, upload_bytes(w.output_norm, norm_bytes, "output_norm"));
  layers.resize(c.n_layers);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& hw = w.layers[l];
    Layer& d = layers[l];
    const std::string b = "blk." + str(l) + ".";
    if (hw.attn_norm == nullptr || hw.ffn_norm == nullptr) {
      return invalid_argument("cuda forward: " + b + " norms are missing");
    }
    KVGATE_ASSIGN_OR_RETURN(d.attn_norm, upload_bytes(hw.attn_norm, norm_bytes, b + "attn_norm"));
    KVGATE_ASSIGN_OR_RETURN(d.ffn_norm, upload_bytes(hw.ffn_norm, norm_bytes, b + "ffn_norm"));
    KVGATE_RETURN_IF_ERROR(upload_matrix(hw.wq, c.q_dim(), c.n_embd, true, b + "attn_q", d.wq));
    KVGATE_RETURN_IF_ERROR(upload_matrix(hw.wk, c.kv_dim(), c.n_embd, true, b + "attn_k", d.wk));
    KVGATE_RETURN_IF_ERROR(upload_matrix(hw.wv, c.kv_dim(), c.n_embd, true, b + "attn_v", d.wv));
    KVGATE_RETURN_IF_ERROR(
        upload_matrix(hw.wo, c.n_embd, c.q_dim(), true, b + "attn_output", d.wo));
    KVGATE_RETURN_IF_ERROR(
        upload_matrix(hw.w_gate, c.n_ff, c.n_embd, true, b + "ffn_gate", d.w_gate));
    KVGATE_RETURN_IF_ERROR(upload_matrix(hw.w_up, c.n_ff, c.n_embd, true, b + "ffn_up", d.w_up));
    KVGATE_RETURN_IF_ERROR(
        upload_matrix(hw.w_down, c.n_embd, c.n_ff, true, b + "ffn_down", d.w_down));
  }

  // Cache and scratch: everything a step touches exists from here on.
  const int64_t P = opt.max_prefill_tokens;
  const auto fl = [&](int64_t n) { return DeviceBuffer::allocate(static_cast<size_t>(n) * 4); };
  KVGATE_ASSIGN_OR_RETURN(kv,
                          DeviceBuffer::allocate(static_cast<size_t>(c.n_layers * 2 * c.kv_dim()) *
                                                 static_cast<size_t>(opt.max_context_tokens) * 2));
  KVGATE_ASSIGN_OR_RETURN(x, fl(P * c.n_embd));
  KVGATE_ASSIGN_OR_RETURN(xn, fl(P * c.n_embd));
  KVGATE_ASSIGN_OR_RETURN(q, fl(P * c.q_dim()));
  KVGATE_ASSIGN_OR_RETURN(k, fl(P * c.kv_dim()));
  KVGATE_ASSIGN_OR_RETURN(v, fl(P * c.kv_dim()));
  KVGATE_ASSIGN_OR_RETURN(attn, fl(P * c.q_dim()));
  KVGATE_ASSIGN_OR_RETURN(gate, fl(P * c.n_ff));
  KVGATE_ASSIGN_OR_RETURN(up, fl(P * c.n_ff));
  KVGATE_ASSIGN_OR_RETURN(logits, fl(c.n_vocab));
  KVGATE_ASSIGN_OR_RETURN(tokens, fl(P));
  KVGATE_ASSIGN_OR_RETURN(positions, fl(P));
  KVGATE_ASSIGN_OR_RETURN(step, DeviceBuffer::allocate(sizeof(DecodeStep)));
  KVGATE_ASSIGN_OR_RETURN(next_token, fl(1));
  KVGATE_RETURN_IF_ERROR(step.zero());
  KVGATE_RETURN_IF_ERROR(next_token.zero());
  size_t gemv_ws_bytes = output_gemv.workspace_bytes;
  for (const Layer& d : layers) {
    for (const Matrix* m : {&d.wq, &d.wk, &d.wv, &d.wo, &d.w_gate, &d.w_up, &d.w_down}) {
      gemv_ws_bytes = std::max(gemv_ws_bytes, m->gemv.workspace_bytes);
    }
  }
  KVGATE_ASSIGN_OR_RETURN(gemv_ws, DeviceBuffer::allocate(std::max<size_t>(gemv_ws_bytes, 256)));
  const int64_t max_cols = std::max({c.n_embd, c.q_dim(), c.n_ff});
  KVGATE_ASSIGN_OR_RETURN(gemm_ws, DeviceBuffer::allocate(static_cast<size_t>(P * max_cols) * 2));
  KVGATE_ASSIGN_OR_RETURN(attn_ws, DeviceBuffer::allocate(decode_plan.workspace_bytes));

  // Decode attention tasks: (layer, KV head), the head's whole cache slice
  // as its single proximal page; near_tokens is set on the device per step.
  const int64_t n_tasks = c.n_layers * c.n_kv_heads;
  KVGATE_ASSIGN_OR_RETURN(pages,
                          DeviceBuffer::allocate(static_cast<size_t>(n_tasks) * 2 * sizeof(void*)));
  std::vector<const uint16_t*> page_ptrs(static_cast<size_t>(n_tasks) * 2);
  std::vector<AttnTask> recs(static_cast<size_t>(n_tasks));
  const auto* page_base = pages.as<const uint16_t*>();
  const int64_t head_stride = opt.max_context_tokens * c.head_dim;
  const int64_t group = c.n_heads / c.n_kv_heads;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    for (int64_t h = 0; h < c.n_kv_heads; ++h) {
      const int64_t t = l * c.n_kv_heads + h;
      page_ptrs[2 * t] = k_cache(l) + h * head_stride;
      page_ptrs[2 * t + 1] = v_cache(l) + h * head_stride;
      AttnTask& r = recs[t];
      r.near_k = page_base + 2 * t;
      r.near_v = page_base + 2 * t + 1;
      r.near_tokens = 1;  // checked below; the step kernel overwrites it
      r.q = q.as<float>() + h * group * c.head_dim;
      r.q_base = r.q;  // no distant rows in a dense cache
      r.out = attn.as<float>() + h * group * c.head_dim;
    }
  }
  for (int64_t l = 0; l < c.n_layers; ++l) {
    KVGATE_RETURN_IF_ERROR(
        check_attn_tasks(recs.data() + l * c.n_kv_heads, c.n_kv_heads, decode_plan));
  }
  KVGATE_RETURN_IF_ERROR(pages.upload(page_ptrs.data(), page_ptrs.size() * sizeof(void*)));
  KVGATE_ASSIGN_OR_RETURN(tasks, DeviceBuffer::allocate(recs.size() * sizeof(AttnTask)));
  KVGATE_RETURN_IF_ERROR(tasks.upload(recs.data(), recs.size() * sizeof(AttnTask)));
  host_rows.resize(static_cast<size_t>(P));
  return cuda_status(cudaDeviceSynchronize(), "set-up");
}

Status CudaForward::Impl::matmul(const Matrix& m, const float* x_in, int64_t n, float* y) {
  if (n <= kGemvMaxTokens) return gemv(m.gemv, m.raw.data(), x_in, n, y, gemv_ws.data(), s());
  return gemm(cublas, m.gemm, m.f16_rows(), x_in, n, y, gemm_ws.data(), s());
}

// One layer over the n rows in x (CpuForward::run_layer's order of
// operations). decode: one row whose token and position are in `step`;
// otherwise a prefill chunk at positions past.. (in `positions`).
Status CudaForward::Impl::run_layer(int64_t l, int64_t n, bool decode, int64_t past) {
  const Layer& w = layers[l];
  const int32_t* pos = decode ? step_pos() : positions.as<int32_t>();
  KVGATE_RETURN_IF_ERROR(rms_norm(f(x), f(w.attn_norm), f(xn), n, c.n_embd, c.rms_eps, s()));
  if (!decode && prefill_observer) KVGATE_RETURN_IF_ERROR(prefill_observer(l, f(xn), n, past, s()));
  KVGATE_RETURN_IF_ERROR(matmul(w.wq, f(xn), n, f(q)));
  KVGATE_RETURN_IF_ERROR(matmul(w.wk, f(xn), n, f(k)));
  KVGATE_RETURN_IF_ERROR(matmul(w.wv, f(xn), n, f(v)));
  KVGATE_RETURN_IF_ERROR(rope_norm(f(q), n, c.n_heads, c.head_dim, pos, c.rope_freq_base, s()));
  KVGATE_RETURN_IF_ERROR(rope_norm(f(k), n, c.n_kv_heads, c.head_dim, pos, c.rope_freq_base, s()));
  // K/V rows to the cache in fp16 (both attention kernels round q to fp16
  // themselves, as the CPU does before its dot products).
  KVGATE_RETURN_IF_ERROR(
      launched(kernels::store_kv(f(k), f(v), n, c.n_kv_heads, c.head_dim, pos,
                                 opt.max_context_tokens * c.head_dim, k_cache(l), v_cache(l), s()),
               "store_kv launch"));
  if (decode) {
    KVGATE_RETURN_IF_ERROR(decode_attention(decode_plan, tasks.as<AttnTask>() + l * c.n_kv_heads,
                                            c.n_kv_heads, f(attn_ws), s()));
  } else {
    KVGATE_RETURN_IF_ERROR(
        prefill_attention(prefill_plan, f(q), n, past, k_cache(l), v_cache(l), f(attn), s()));
  }
  return output_and_mlp(w, n);
}

// The rest of a layer once `attn` holds its attention output for n rows:
// wo, (all-reduce), residual, RMSNorm, SwiGLU MLP, (all-reduce), residual.
Status CudaForward::Impl::output_and_mlp(const Layer& w, int64_t n) {
  KVGATE_RETURN_IF_ERROR(matmul(w.wo, f(attn), n, f(xn)));
  KVGATE_RETURN_IF_ERROR(reduce(f(xn), n));
  KVGATE_RETURN_IF_ERROR(
      launched(kernels::add_inplace(f(x), f(xn), n * c.n_embd, s()), "residual add launch"));
  KVGATE_RETURN_IF_ERROR(rms_norm(f(x), f(w.ffn_norm), f(xn), n, c.n_embd, c.rms_eps, s()));
  KVGATE_RETURN_IF_ERROR(matmul(w.w_gate, f(xn), n, f(gate)));
  KVGATE_RETURN_IF_ERROR(matmul(w.w_up, f(xn), n, f(up)));
  KVGATE_RETURN_IF_ERROR(swiglu(f(gate), f(up), f(gate), n * c.n_ff, s()));
  KVGATE_RETURN_IF_ERROR(matmul(w.w_down, f(gate), n, f(xn)));
  KVGATE_RETURN_IF_ERROR(reduce(f(xn), n));
  return launched(kernels::add_inplace(f(x), f(xn), n * c.n_embd, s()), "residual add launch");
}

// Logits of row `row` of x (final norm, vocabulary GEMV of one row as the
// CPU computes them), their argmax, and the next step's inputs: that token
// at next_pos (-1: the step's own position + 1, read on the device).
Status CudaForward::Impl::final_logits(int64_t row, int32_t next_pos) {
  KVGATE_RETURN_IF_ERROR(
      rms_norm(f(x) + row * c.n_embd, f(output_norm), f(xn), 1, c.n_embd, c.rms_eps, s()));
  KVGATE_RETURN_IF_ERROR(gemv(output_gemv, output_rows, f(xn), 1, f(logits), gemv_ws.data(), s()));
  KVGATE_RETURN_IF_ERROR(argmax(f(logits), 1, c.n_vocab, next_token.as<int32_t>(), s()));
  return launched(
      kernels::finish_step(next_token.as<int32_t>(), step.as<DecodeStep>(), next_pos, s()),
      "finish_step launch");
}

// The decode step as both decode() and the graph run it: reads the token
// and position from `step`, nothing from the host.
Status CudaForward::Impl::enqueue_decode_step() {
  KVGATE_RETURN_IF_ERROR(
      launched(kernels::set_task_lengths(tasks.as<AttnTask>(), c.n_layers * c.n_kv_heads,
                                         step.as<DecodeStep>(), s()),
               "set_task_lengths launch"));
  KVGATE_RETURN_IF_ERROR(launched(kernels::embed_rows(embd.data(), embd_type, embd_row_bytes,
                                                      step_token(), 1, c.n_embd, f(x), s()),
                                  "embedding launch"));
  for (int64_t l = 0; l < c.n_layers; ++l) KVGATE_RETURN_IF_ERROR(run_layer(l, 1, true, 0));
  return final_logits(0, -1);
}

Status CudaForward::Impl::check_usable() const {
  if (!failed.ok()) {
    return failed_precondition("cuda forward: an earlier step failed (" + failed.to_string() +
                               "); reset() first");
  }
  return Status();
}

Status CudaForward::Impl::begin_decode(int32_t token) {
  KVGATE_RETURN_IF_ERROR(check_usable());
  if (token < 0 || token >= c.n_vocab) {
    return invalid_argument("cuda forward: token id " + str(token) +
                            " outside the vocabulary [0, " + str(c.n_vocab) + ")");
  }
  if (n_tokens >= opt.max_context_tokens) {
    return out_of_range("cuda forward: the KV cache of " + str(opt.max_context_tokens) +
                        " tokens is full");
  }
  host_step = DecodeStep{token, static_cast<int32_t>(n_tokens)};
  // Pageable source: the copy is staged before cudaMemcpyAsync returns.
  return cuda_status(
      cudaMemcpyAsync(step.data(), &host_step, sizeof(DecodeStep), cudaMemcpyHostToDevice, s()),
      "decode step upload");
}

// After a step was enqueued: a failure poisons the forward (the cache may
// be half-written); a success optionally fetches the logits.
Status CudaForward::Impl::finish(Status st, float* logits_out) {
  if (!st.ok()) {
    failed = st;
    return st;
  }
  have_logits = true;
  if (logits_out == nullptr) return Status();
  KVGATE_RETURN_IF_ERROR(stream.synchronize());
  return logits.download(logits_out, static_cast<size_t>(c.n_vocab) * sizeof(float));
}

CudaForward::CudaForward(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaForward::~CudaForward() = default;

Result<std::unique_ptr<CudaForward>> CudaForward::create(const HostWeights& weights,
                                                         const CudaForwardOptions& options) {
  if (device_count() == 0) return unavailable("cuda forward: no CUDA device");
  auto impl = std::make_unique<Impl>();
  impl->opt = options;
  KVGATE_RETURN_IF_ERROR(impl->build(weights));
  return std::unique_ptr<CudaForward>(new CudaForward(std::move(impl)));
}

Status CudaForward::prefill(std::span<const int32_t> tokens, float* logits_out) {
  Impl& m = *impl_;
  const LlamaConfig& c = m.c;
  KVGATE_RETURN_IF_ERROR(m.check_usable());
  if (tokens.empty()) return invalid_argument("cuda forward: prompt is empty");
  for (int32_t t : tokens) {
    if (t < 0 || t >= c.n_vocab) {
      return invalid_argument("cuda forward: token id " + str(t) + " outside the vocabulary [0, " +
                              str(c.n_vocab) + ")");
    }
  }
  const auto total = static_cast<int64_t>(tokens.size());
  if (m.n_tokens + total > m.opt.max_context_tokens) {
    return out_of_range("cuda forward: " + str(m.n_tokens + total) +
                        " tokens exceed the KV cache of " + str(m.opt.max_context_tokens));
  }
  Status st;
  for (int64_t start = 0; start < total && st.ok(); start += m.opt.max_prefill_tokens) {
    const int64_t n = std::min(m.opt.max_prefill_tokens, total - start);
    const int64_t past = m.n_tokens;
    // Tokens, then positions, through the same staging vector: each copy is
    // staged before cudaMemcpyAsync returns (pageable memory).
    std::copy(tokens.begin() + start, tokens.begin() + start + n, m.host_rows.begin());
    st = cuda_status(
        cudaMemcpyAsync(m.tokens.data(), m.host_rows.data(), n * 4, cudaMemcpyHostToDevice, m.s()),
        "prefill tokens upload");
    if (!st.ok()) break;
    for (int64_t i = 0; i < n; ++i) m.host_rows[i] = static_cast<int32_t>(past + i);
    st = cuda_status(cudaMemcpyAsync(m.positions.data(), m.host_rows.data(), n * 4,
                                     cudaMemcpyHostToDevice, m.s()),
                     "prefill positions upload");
    if (!st.ok()) break;
    st = launched(kernels::embed_rows(m.embd.data(), m.embd_type, m.embd_row_bytes,
                                      m.tokens.as<int32_t>(), n, c.n_embd, m.f(m.x), m.s()),
                  "embedding launch");
    for (int64_t l = 0; l < c.n_layers && st.ok(); ++l) st = m.run_layer(l, n, false, past);
    if (!st.ok()) break;
    m.n_tokens += n;
    if (start + n == total) st = m.final_logits(n - 1, static_cast<int32_t>(m.n_tokens));
  }
  return m.finish(st, logits_out);
}

Status CudaForward::decode(int32_t token, float* logits_out) {
  Impl& m = *impl_;
  KVGATE_RETURN_IF_ERROR(m.begin_decode(token));
  const Status st = m.enqueue_decode_step();
  if (st.ok()) ++m.n_tokens;
  return m.finish(st, logits_out);
}

Status CudaForward::capture_decode_graph() {
  Impl& m = *impl_;
  KVGATE_RETURN_IF_ERROR(m.check_usable());
  KVGATE_RETURN_IF_ERROR(cuda_status(
      cudaStreamBeginCapture(m.s(), cudaStreamCaptureModeThreadLocal), "begin graph capture"));
  const Status st = m.enqueue_decode_step();
  cudaGraph_t graph = nullptr;
  // Ending the capture is needed whatever happened, or the stream stays in
  // capture mode.
  const Status end = cuda_status(cudaStreamEndCapture(m.s(), &graph), "end graph capture");
  Status result = !st.ok() ? st : end;
  cudaGraphExec_t exec = nullptr;
  if (result.ok()) {
    result = cuda_status(cudaGraphInstantiate(&exec, graph, 0), "graph instantiate");
  }
  if (graph != nullptr) (void)cudaGraphDestroy(graph);
  KVGATE_RETURN_IF_ERROR(result);
  if (m.graph != nullptr) (void)cudaGraphExecDestroy(m.graph);
  m.graph = exec;
  return Status();
}

bool CudaForward::has_decode_graph() const {
  return impl_->graph != nullptr;
}

Status CudaForward::decode_graph(int32_t token, float* logits_out) {
  Impl& m = *impl_;
  if (m.graph == nullptr) {
    return failed_precondition("cuda forward: decode_graph before capture_decode_graph");
  }
  KVGATE_RETURN_IF_ERROR(m.begin_decode(token));
  const Status st = cuda_status(cudaGraphLaunch(m.graph, m.s()), "graph launch");
  if (st.ok()) ++m.n_tokens;
  return m.finish(st, logits_out);
}

Status CudaForward::decode_graph_greedy(float* logits_out) {
  Impl& m = *impl_;
  KVGATE_RETURN_IF_ERROR(m.check_usable());
  if (m.graph == nullptr) {
    return failed_precondition("cuda forward: decode_graph_greedy before capture_decode_graph");
  }
  if (!m.have_logits) {
    return failed_precondition("cuda forward: a greedy step needs a previous step's logits");
  }
  if (m.n_tokens >= m.opt.max_context_tokens) {
    return out_of_range("cuda forward: the KV cache of " + str(m.opt.max_context_tokens) +
                        " tokens is full");
  }
  // The device's DecodeStep already holds {argmax, n_tokens}: the previous
  // step's finish_step wrote it.
  const Status st = cuda_status(cudaGraphLaunch(m.graph, m.s()), "graph launch");
  if (st.ok()) ++m.n_tokens;
  return m.finish(st, logits_out);
}

Result<int32_t> CudaForward::greedy_token() {
  Impl& m = *impl_;
  KVGATE_RETURN_IF_ERROR(m.check_usable());
  if (!m.have_logits) return failed_precondition("cuda forward: no logits yet");
  KVGATE_RETURN_IF_ERROR(m.stream.synchronize());
  int32_t id = 0;
  KVGATE_RETURN_IF_ERROR(m.next_token.download(&id, sizeof(id)));
  return id;
}

Status CudaForward::logits(float* out) {
  Impl& m = *impl_;
  KVGATE_RETURN_IF_ERROR(m.check_usable());
  if (!m.have_logits) return failed_precondition("cuda forward: no logits yet");
  return m.finish(Status(), out);
}

Status CudaForward::synchronize() {
  return impl_->stream.synchronize();
}

void CudaForward::reset() {
  impl_->n_tokens = 0;
  impl_->have_logits = false;
  impl_->failed = Status();
}

int64_t CudaForward::n_tokens() const {
  return impl_->n_tokens;
}
void CudaForward::set_prefill_observer(PrefillObserver observer) {
  impl_->prefill_observer = std::move(observer);
}

Status CudaForward::download_kv(std::vector<uint16_t>& out) {
  Impl& m = *impl_;
  const LlamaConfig& c = m.c;
  KVGATE_RETURN_IF_ERROR(m.check_usable());
  const auto n = static_cast<size_t>(m.n_tokens);
  const auto hd = static_cast<size_t>(c.head_dim);
  const auto planes = static_cast<size_t>(c.n_layers * 2 * c.n_kv_heads);
  out.resize(planes * n * hd);
  if (n == 0) return Status();
  // Each (layer, K|V, head) plane holds max_context rows; take the first n.
  KVGATE_RETURN_IF_ERROR(cuda_status(
      cudaMemcpy2DAsync(out.data(), n * hd * 2, m.kv.data(),
                        static_cast<size_t>(m.opt.max_context_tokens) * hd * 2, n * hd * 2, planes,
                        cudaMemcpyDeviceToHost, m.s()),
      "KV download"));
  return m.stream.synchronize();
}

cudaStream_t CudaForward::stream() const {
  return impl_->s();
}
const LlamaConfig& CudaForward::config() const {
  return impl_->c;
}
const CudaForwardOptions& CudaForward::options() const {
  return impl_->opt;
}
size_t CudaForward::gemv_weight_bytes() const {
  return impl_->gemv_bytes;
}
size_t CudaForward::gemm_weight_bytes() const {
  return impl_->gemm_bytes;
}
size_t CudaForward::kv_cache_bytes() const {
  return impl_->kv.bytes();
}

}  // namespace kvgate::engine::cuda
