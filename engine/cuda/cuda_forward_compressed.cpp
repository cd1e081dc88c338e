// CudaForward::decode_compressed: one decode step of a batch of block-gated
// PoD caches with pages in device memory (cuda_forward.h), and the gate's
// device weights (CudaGateWeights). The order of operations per layer is
// CpuForward::run_layers' with attention_compressed (engine/model.cpp), the
// gate at each slot's gate layer as GateDecoder observes it (the layer's
// normalized input).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>
#include <utility>

#include "engine/cuda/cuda_forward.h"
#include "engine/cuda/cuda_forward_impl.h"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda {
namespace {

std::string str(int64_t v) {
  return std::to_string(v);
}

Status launched(cudaError_t err, const char* what) {
  return cuda_status(static_cast<int>(err), what);
}

// Grows `buf` to at least `bytes` (contents not kept). The stream must be
// idle when it grows: the old buffer may still be read by enqueued work.
Status ensure_bytes(DeviceBuffer& buf, size_t bytes, CudaStream& stream) {
  if (buf.bytes() >= bytes && buf.data() != nullptr) return Status();
  KVGATE_RETURN_IF_ERROR(stream.synchronize());
  KVGATE_ASSIGN_OR_RETURN(buf, DeviceBuffer::allocate(std::max<size_t>(bytes, 256)));
  return Status();
}

}  // namespace

// Per layer with gated slots: the slots' [Wq;Wk;Wv] ([S][3D][n_embd]), wo
// ([S][D]), bias, threshold and layout slot ids, in the schedule's order.
struct CudaGateWeights::Impl {
  GateSchedule schedule;
  int64_t heads = 0, head_dim = 0, n_embd = 0, n_sink = 0, n_window = 0;
  struct Layer {
    int64_t n_slots = 0;
    DeviceBuffer w, wo, bias, threshold, slot_ids;
    GatePlan plan_one;  // gate_project's plan for one item (checks shapes)
  };
  std::vector<Layer> layers;
  int64_t max_slots = 0;  // largest per-layer slot count
};

CudaGateWeights::CudaGateWeights(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaGateWeights::~CudaGateWeights() = default;

const GateSchedule& CudaGateWeights::schedule() const {
  return impl_->schedule;
}

Result<std::unique_ptr<CudaGateWeights>> CudaGateWeights::create(const GateModel& gate,
                                                                 const kvstore::KvLayout& layout) {
  KVGATE_RETURN_IF_ERROR(gate.validate());
  auto impl = std::make_unique<Impl>();
  KVGATE_ASSIGN_OR_RETURN(impl->schedule, make_gate_schedule(gate, layout));
  if (device_count() == 0) return unavailable("cuda gate: no CUDA device");
  impl->heads = gate.n_gate_heads;
  impl->head_dim = gate.gate_head_dim;
  impl->n_embd = gate.n_embd;
  impl->n_sink = gate.n_sink_tokens;
  impl->n_window = std::max<int64_t>(1, gate.n_window_tokens);
  const int64_t D = gate.gate_dim();
  const auto E = static_cast<size_t>(gate.n_embd);
  impl->layers.resize(impl->schedule.by_layer.size());
  for (size_t l = 0; l < impl->layers.size(); ++l) {
    const auto& slots = impl->schedule.by_layer[l];
    Impl::Layer& out = impl->layers[l];
    out.n_slots = static_cast<int64_t>(slots.size());
    if (slots.empty()) continue;
    impl->max_slots = std::max(impl->max_slots, out.n_slots);
    KVGATE_ASSIGN_OR_RETURN(out.plan_one, plan_gate(1, out.n_slots, impl->heads, impl->head_dim,
                                                    impl->n_sink, impl->n_window, gate.n_embd));
    std::vector<float> w, wo, bias, thr;
    std::vector<int32_t> ids;
    for (int32_t s : slots) {
      const GateSlot& g = gate.slots[static_cast<size_t>(impl->schedule.gate_slot[s])];
      for (const std::vector<float>* m : {&g.wq, &g.wk, &g.wv}) {
        if (m->size() != static_cast<size_t>(D) * E) {
          return invalid_argument("cuda gate: slot " + str(s) + " projection is not " + str(D) +
                                  " x " + str(gate.n_embd));
        }
        w.insert(w.end(), m->begin(), m->end());
      }
      wo.insert(wo.end(), g.wo.begin(), g.wo.end());
      bias.push_back(g.bias);
      thr.push_back(g.threshold);
      ids.push_back(s);
    }
    const auto up = [](const auto& v, DeviceBuffer& dst) -> Status {
      const size_t bytes = v.size() * sizeof(v[0]);
      KVGATE_ASSIGN_OR_RETURN(dst, DeviceBuffer::allocate(bytes));
      return dst.upload(v.data(), bytes);
    };
    KVGATE_RETURN_IF_ERROR(up(w, out.w));
    KVGATE_RETURN_IF_ERROR(up(wo, out.wo));
    KVGATE_RETURN_IF_ERROR(up(bias, out.bias));
    KVGATE_RETURN_IF_ERROR(up(thr, out.threshold));
    KVGATE_RETURN_IF_ERROR(up(ids, out.slot_ids));
  }
  return std::unique_ptr<CudaGateWeights>(new CudaGateWeights(std::move(impl)));
}

Status CudaForward::Impl::ensure_compressed(int64_t n_slots, const CudaGateWeights* gate) {
  const int64_t B = opt.max_decode_batch;
  if (cz.capacity == 0) {
    if (B < 1 || B > opt.max_prefill_tokens) {
      return invalid_argument("cuda forward: max_decode_batch (" + str(B) +
                              ") must be in [1, max_prefill_tokens (" +
                              str(opt.max_prefill_tokens) + ")]");
    }
    const auto f = [](int64_t n) { return static_cast<size_t>(n) * sizeof(float); };
    KVGATE_ASSIGN_OR_RETURN(cz.q_layers, DeviceBuffer::allocate(f(c.n_layers * B * c.q_dim())));
    KVGATE_ASSIGN_OR_RETURN(cz.logits, DeviceBuffer::allocate(f(B * c.n_vocab)));
    cz.capacity = B;
  }
  KVGATE_RETURN_IF_ERROR(ensure_bytes(cz.flags, static_cast<size_t>(B * n_slots), stream));
  if (gate != nullptr) {
    const auto& g = gate->impl();
    const int64_t pairs = B * g.max_slots;
    KVGATE_RETURN_IF_ERROR(ensure_bytes(
        cz.gate_proj, static_cast<size_t>(pairs * 3 * g.heads * g.head_dim) * sizeof(float),
        stream));
    KVGATE_RETURN_IF_ERROR(
        ensure_bytes(cz.gate_logits, static_cast<size_t>(pairs) * sizeof(float), stream));
  }
  return Status();
}

Status CudaForward::Impl::run_compressed_layer(int64_t l, int64_t n, const AttentionPlan& plan,
                                               const CudaGateWeights* gw,
                                               const GateDecision& decision, int64_t n_slots) {
  const detail::Layer& w = layers[l];
  const std::byte* table = cz.table.as<std::byte>();
  const StepTableOffsets& o = cz.tables.offsets();
  const auto* positions = reinterpret_cast<const int32_t*>(table + o.positions);
  const int64_t rows = n * c.n_kv_heads;
  const auto* k_rows = reinterpret_cast<uint16_t* const*>(table + o.k_rows) + l * rows;
  const auto* v_rows = reinterpret_cast<uint16_t* const*>(table + o.v_rows) + l * rows;
  const auto* tasks = reinterpret_cast<const AttnTask*>(table + o.tasks) + l * rows;
  float* q_l = f(cz.q_layers) + l * cz.capacity * c.q_dim();

  KVGATE_RETURN_IF_ERROR(rms_norm(f(x), f(w.attn_norm), f(xn), n, c.n_embd, c.rms_eps, s()));
  if (gw != nullptr && gw->impl().layers[static_cast<size_t>(l)].n_slots > 0) {
    // GateDecoder sees the layer's normalized input: the new token's gate
    // K/V into the cache (before its logit, whose context includes it).
    const auto& g = gw->impl();
    const auto& gl = g.layers[static_cast<size_t>(l)];
    const int64_t pairs = n * gl.n_slots;
    const auto* gtasks = reinterpret_cast<const GateRowTask*>(table + o.gate_tasks[l]);
    KVGATE_ASSIGN_OR_RETURN(const GatePlan plan_n, plan_gate(n, gl.n_slots, g.heads, g.head_dim,
                                                             g.n_sink, g.n_window, g.n_embd));
    KVGATE_RETURN_IF_ERROR(gate_project(plan_n, gl.w.as<float>(), f(xn), f(cz.gate_proj), s()));
    KVGATE_RETURN_IF_ERROR(launched(
        kernels::gate_store_rows(f(cz.gate_proj), pairs, g.heads * g.head_dim, gtasks, s()),
        "gate_store_rows launch"));
    KVGATE_RETURN_IF_ERROR(launched(
        kernels::gate_decode_logits(f(cz.gate_proj), gtasks, pairs, gl.n_slots,
                                    static_cast<int>(g.heads), static_cast<int>(g.head_dim),
                                    gl.wo.as<float>(), gl.bias.as<float>(), f(cz.gate_logits), s()),
        "gate_decode_logits launch"));
    KVGATE_RETURN_IF_ERROR(launched(
        kernels::gate_decode_flags(f(cz.gate_logits), pairs, gl.n_slots, gl.slot_ids.as<int32_t>(),
                                   n_slots, gl.threshold.as<float>(),
                                   static_cast<float>(decision.threshold_offset),
                                   decision.retained_budget_tokens > 0, cz.flags.as<uint8_t>(),
                                   s()),
        "gate_decode_flags launch"));
  }
  KVGATE_RETURN_IF_ERROR(matmul(w.wq, f(xn), n, q_l));
  KVGATE_RETURN_IF_ERROR(matmul(w.wk, f(xn), n, f(k)));
  KVGATE_RETURN_IF_ERROR(matmul(w.wv, f(xn), n, f(v)));
  KVGATE_RETURN_IF_ERROR(rope_norm(q_l, n, c.n_heads, c.head_dim, positions, c.rope_freq_base, s()));
  KVGATE_RETURN_IF_ERROR(
      rope_norm(f(k), n, c.n_kv_heads, c.head_dim, positions, c.rope_freq_base, s()));
  KVGATE_RETURN_IF_ERROR(launched(
      kernels::store_kv_rows(f(k), f(v), n, c.n_kv_heads, c.head_dim, k_rows, v_rows, s()),
      "store_kv_rows launch"));
  KVGATE_RETURN_IF_ERROR(decode_attention(plan, tasks, rows, f(cz.attn_ws), s()));
  return output_and_mlp(w, n);
}

Status CudaForward::decode_compressed(std::span<const CompressedItem> items, float* logits_out,
                                      const PageFlush& flush, const CudaGateWeights* gate,
                                      const GateDecision& decision) {
  Impl& m = *impl_;
  const LlamaConfig& c = m.c;
  KVGATE_RETURN_IF_ERROR(m.check_usable());
  const auto n = static_cast<int64_t>(items.size());
  if (n == 0 || n > m.opt.max_decode_batch) {
    return invalid_argument("cuda forward: a compressed step takes 1 to " +
                            str(m.opt.max_decode_batch) + " items (max_decode_batch), not " +
                            str(n));
  }
  std::vector<kvstore::CompressedKvCache*> caches(static_cast<size_t>(n));
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const CompressedItem& it = items[i];
    if (it.cache == nullptr) return invalid_argument("cuda forward: item " + str(i) + " has no cache");
    if (it.token < 0 || it.token >= c.n_vocab) {
      return invalid_argument("cuda forward: item " + str(i) + ": token id " + str(it.token) +
                              " outside the vocabulary [0, " + str(c.n_vocab) + ")");
    }
    caches[i] = it.cache;
    tokens[i] = it.token;
  }
  const kvstore::KvLayout& layout = caches[0]->layout();
  const int64_t n_slots = layout.blocks.n_slots();
  if (gate != nullptr && gate->schedule().n_slots() != n_slots) {
    return invalid_argument("cuda forward: the gate weights were made for " +
                            str(gate->schedule().n_slots()) + " slots, the caches have " +
                            str(n_slots));
  }
  const StepModelShape shape{c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim};
  KVGATE_RETURN_IF_ERROR(m.ensure_compressed(n_slots, gate));
  const StepBuffers buffers{m.cz.q_layers.as<float>(), m.f(m.attn), m.cz.capacity};

  // Appends first (host bookkeeping; the device copies of tokens leaving
  // the window are recorded by the page pool), so a full lease fails
  // before any compute.
  for (int64_t i = 0; i < n; ++i) {
    KVGATE_RETURN_IF_ERROR(
        caches[i]->begin_append(caches[i]->n_tokens(), gate != nullptr ? std::span<const uint8_t>()
                                                                       : items[i].flags));
  }
  const auto st = [&]() -> Status {
    if (flush) KVGATE_RETURN_IF_ERROR(flush(m.s()));
    KVGATE_ASSIGN_OR_RETURN(const StepTableOffsets size,
                            m.cz.tables.measure(shape, caches, gate ? &gate->schedule() : nullptr,
                                                buffers));
    KVGATE_RETURN_IF_ERROR(ensure_bytes(m.cz.table, size.total, m.stream));
    KVGATE_RETURN_IF_ERROR(m.cz.tables.build(shape, caches, tokens,
                                             gate ? &gate->schedule() : nullptr, buffers,
                                             reinterpret_cast<std::uintptr_t>(m.cz.table.data())));
    // The attention plan of this step: its tasks' longest row count and
    // the caches' page size.
    int64_t max_rows = 0;
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const AttnTask* t = m.cz.tables.host_tasks(l);
      for (int64_t r = 0; r < n * c.n_kv_heads; ++r) {
        max_rows = std::max<int64_t>(max_rows, t[r].near_tokens + t[r].far_tokens);
      }
    }
    AttentionShape as;
    as.n_tasks = n * c.n_kv_heads;
    as.group = c.n_heads / c.n_kv_heads;
    as.head_dim = c.head_dim;
    as.page_tokens = caches[0]->page_tokens();
    as.max_rows = max_rows;
    as.sm_count = m.sm_count;
    KVGATE_ASSIGN_OR_RETURN(const AttentionPlan plan, plan_decode_attention(as));
    for (int64_t l = 0; l < c.n_layers; ++l) {
      KVGATE_RETURN_IF_ERROR(check_attn_tasks(m.cz.tables.host_tasks(l), as.n_tasks, plan));
    }
    KVGATE_RETURN_IF_ERROR(ensure_bytes(m.cz.attn_ws, plan.workspace_bytes, m.stream));
    const auto image = m.cz.tables.image();
    // Pageable source: staged before cudaMemcpyAsync returns.
    KVGATE_RETURN_IF_ERROR(cuda_status(cudaMemcpyAsync(m.cz.table.data(), image.data(),
                                                       image.size(), cudaMemcpyHostToDevice, m.s()),
                                       "step table upload"));
    const auto* tok = reinterpret_cast<const int32_t*>(m.cz.table.as<std::byte>() +
                                                       m.cz.tables.offsets().tokens);
    KVGATE_RETURN_IF_ERROR(launched(kernels::embed_rows(m.embd.data(), m.embd_type,
                                                        m.embd_row_bytes, tok, n, c.n_embd,
                                                        m.f(m.x), m.s()),
                                    "embedding launch"));
    for (int64_t l = 0; l < c.n_layers; ++l) {
      KVGATE_RETURN_IF_ERROR(m.run_compressed_layer(l, n, plan, gate, decision, n_slots));
    }
    // Logits of every row: final norm, then the vocabulary GEMV in passes
    // of at most the plan's tokens (the output matrix has no GEMM copy).
    KVGATE_RETURN_IF_ERROR(
        rms_norm(m.f(m.x), m.f(m.output_norm), m.f(m.xn), n, c.n_embd, c.rms_eps, m.s()));
    for (int64_t r = 0; r < n; r += kGemvMaxTokens) {
      const int64_t rows = std::min<int64_t>(kGemvMaxTokens, n - r);
      KVGATE_RETURN_IF_ERROR(gemv(m.output_gemv, m.output_rows, m.f(m.xn) + r * c.n_embd, rows,
                                  m.f(m.cz.logits) + r * c.n_vocab, m.gemv_ws.data(), m.s()));
    }
    KVGATE_RETURN_IF_ERROR(m.stream.synchronize());
    if (logits_out != nullptr) {
      KVGATE_RETURN_IF_ERROR(m.cz.logits.download(
          logits_out, static_cast<size_t>(n * c.n_vocab) * sizeof(float)));
    }
    if (gate != nullptr) {
      // The deferred flags, set before the token can leave the window.
      m.cz.host_flags.resize(static_cast<size_t>(n * n_slots));
      KVGATE_RETURN_IF_ERROR(m.cz.flags.download(m.cz.host_flags.data(), m.cz.host_flags.size()));
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t s = 0; s < n_slots; ++s) {
          caches[i]->set_flag_unchecked(s, m.cz.host_flags[static_cast<size_t>(i * n_slots + s)]);
        }
      }
    }
    return Status();
  }();
  if (!st.ok()) m.failed = st;
  return st;
}

}  // namespace kvgate::engine::cuda
