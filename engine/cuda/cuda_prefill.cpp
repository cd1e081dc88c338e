#include "engine/cuda/cuda_prefill.h"

#include <cuda_runtime_api.h>

#include <chrono>
#include <string>
#include <utility>

#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/gate_plan.h"
#include "engine/kv_policy.h"
#include "kvstore/wire_image.h"

namespace kvgate::engine::cuda {
namespace {

std::string str(int64_t v) {
  return std::to_string(v);
}

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

// Gate slots grouped by the layer they run at (their gate block's first
// layer); each group has its own device buffers, so the window kernels
// run per group over [n_tokens][group slots].
struct CudaGatePrefill::Impl {
  const GateModel* gate = nullptr;
  const kvstore::KvLayout* layout = nullptr;
  int64_t n_tokens = 0;
  int64_t dim = 0;
  std::vector<int32_t> gate_slot;  // by layout slot
  struct Group {
    int64_t layer = 0;
    std::vector<int32_t> slots;  // gate slots, ascending
    GatePlan plan;               // over the whole prompt
    DeviceBuffer w, wo, bias, threshold;
    DeviceBuffer proj, logits, flags;
  };
  std::vector<Group> groups;
  std::vector<int32_t> group_of_layer;  // -1: no gate slot based there
};

CudaGatePrefill::CudaGatePrefill(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaGatePrefill::~CudaGatePrefill() = default;

Result<std::unique_ptr<CudaGatePrefill>> CudaGatePrefill::create(const GateModel& gate,
                                                                 const kvstore::KvLayout& layout,
                                                                 int64_t n_tokens) {
  KVGATE_RETURN_IF_ERROR(gate.validate());
  // The same checks (and mapping) as the decode step's schedule.
  KVGATE_ASSIGN_OR_RETURN(const GateSchedule schedule, make_gate_schedule(gate, layout));
  if (n_tokens < 1) return invalid_argument("cuda gate prefill: n_tokens must be >= 1");
  if (device_count() == 0) return unavailable("cuda gate prefill: no CUDA device");
  auto impl = std::make_unique<Impl>();
  impl->gate = &gate;
  impl->layout = &layout;
  impl->n_tokens = n_tokens;
  impl->dim = gate.gate_dim();
  impl->gate_slot = schedule.gate_slot;
  impl->group_of_layer.assign(static_cast<size_t>(layout.n_layers()), -1);
  std::vector<uint8_t> used(gate.slots.size(), 0);
  for (int32_t g : schedule.gate_slot) used[static_cast<size_t>(g)] = 1;
  for (int64_t g = 0; g < static_cast<int64_t>(gate.slots.size()); ++g) {
    if (!used[static_cast<size_t>(g)]) continue;
    const int64_t layer = gate.blocks.slot_block(g).first_layer;
    int32_t& gi = impl->group_of_layer[static_cast<size_t>(layer)];
    if (gi < 0) {
      gi = static_cast<int32_t>(impl->groups.size());
      impl->groups.emplace_back();
      impl->groups.back().layer = layer;
    }
    impl->groups[static_cast<size_t>(gi)].slots.push_back(static_cast<int32_t>(g));
  }
  const int64_t D = impl->dim;
  for (Impl::Group& grp : impl->groups) {
    const auto S = static_cast<int64_t>(grp.slots.size());
    // The CPU's context: the layout's sinks and window.
    KVGATE_ASSIGN_OR_RETURN(grp.plan, plan_gate(n_tokens, S, gate.n_gate_heads, gate.gate_head_dim,
                                                layout.n_sink_tokens, layout.n_window_tokens,
                                                gate.n_embd));
    std::vector<float> w, wo, bias, thr;
    for (int32_t g : grp.slots) {
      const GateSlot& s = gate.slots[static_cast<size_t>(g)];
      for (const std::vector<float>* m : {&s.wq, &s.wk, &s.wv}) w.insert(w.end(), m->begin(), m->end());
      wo.insert(wo.end(), s.wo.begin(), s.wo.end());
      bias.push_back(s.bias);
      thr.push_back(s.threshold);
    }
    if (w.size() != static_cast<size_t>(S * 3 * D * gate.n_embd)) {
      return invalid_argument("cuda gate prefill: gate projections are not 3 x " + str(D) + " x " +
                              str(gate.n_embd) + " per slot");
    }
    const auto up = [](const std::vector<float>& v, DeviceBuffer& dst) -> Status {
      KVGATE_ASSIGN_OR_RETURN(dst, DeviceBuffer::allocate(v.size() * sizeof(float)));
      return dst.upload(v.data(), v.size() * sizeof(float));
    };
    KVGATE_RETURN_IF_ERROR(up(w, grp.w));
    KVGATE_RETURN_IF_ERROR(up(wo, grp.wo));
    KVGATE_RETURN_IF_ERROR(up(bias, grp.bias));
    KVGATE_RETURN_IF_ERROR(up(thr, grp.threshold));
    KVGATE_ASSIGN_OR_RETURN(grp.proj, DeviceBuffer::allocate(grp.plan.proj_bytes));
    KVGATE_ASSIGN_OR_RETURN(grp.logits, DeviceBuffer::allocate(grp.plan.logits_bytes));
    KVGATE_ASSIGN_OR_RETURN(grp.flags, DeviceBuffer::allocate(static_cast<size_t>(S * n_tokens)));
  }
  return std::unique_ptr<CudaGatePrefill>(new CudaGatePrefill(std::move(impl)));
}

Status CudaGatePrefill::observe(int64_t layer, const float* xn_dev, int64_t n_rows,
                                int64_t first_pos, cudaStream_t stream) {
  Impl& m = *impl_;
  if (layer < 0 || layer >= static_cast<int64_t>(m.group_of_layer.size())) {
    return invalid_argument("cuda gate prefill: layer " + str(layer) + " out of range");
  }
  const int32_t gi = m.group_of_layer[static_cast<size_t>(layer)];
  if (gi < 0) return Status();
  if (first_pos < 0 || n_rows < 1 || first_pos + n_rows > m.n_tokens) {
    return invalid_argument("cuda gate prefill: rows [" + str(first_pos) + ", " +
                            str(first_pos + n_rows) + ") outside the prompt of " +
                            str(m.n_tokens));
  }
  Impl::Group& grp = m.groups[static_cast<size_t>(gi)];
  const auto S = static_cast<int64_t>(grp.slots.size());
  // The chunk's rows land at their positions in the whole prompt's
  // projections ([token][slot][3D]).
  KVGATE_ASSIGN_OR_RETURN(const GatePlan chunk,
                          plan_gate(n_rows, S, grp.plan.heads, grp.plan.head_dim, grp.plan.n_sink,
                                    grp.plan.n_window, grp.plan.n_embd));
  float* out = grp.proj.as<float>() + first_pos * S * 3 * m.dim;
  return gate_project(chunk, grp.w.as<float>(), xn_dev, out, stream);
}

Status CudaGatePrefill::finish(const GateDecision& decision, cudaStream_t stream,
                               std::vector<uint8_t>& flags, std::vector<fp16_t>& gate_rows) {
  Impl& m = *impl_;
  if (decision.retained_budget_tokens > 0) {
    return unimplemented(
        "cuda gate prefill: budget mode (a top-k over the prompt's logits) runs on the CPU "
        "backend only; use threshold mode on the GPU");
  }
  const int64_t T = m.n_tokens;
  const int64_t D = m.dim;
  const int64_t n_slots = m.layout->blocks.n_slots();
  for (Impl::Group& grp : m.groups) {
    KVGATE_RETURN_IF_ERROR(gate_logits_window(grp.plan, grp.proj.as<float>(), grp.wo.as<float>(),
                                              grp.bias.as<float>(), grp.logits.as<float>(),
                                              stream));
    KVGATE_RETURN_IF_ERROR(gate_flags(grp.plan, grp.logits.as<float>(),
                                      grp.threshold.as<float>(),
                                      static_cast<float>(decision.threshold_offset),
                                      grp.flags.as<uint8_t>(), stream));
  }
  KVGATE_RETURN_IF_ERROR(cuda_status(static_cast<int>(cudaStreamSynchronize(stream)), "gate prefill"));
  flags.assign(static_cast<size_t>(n_slots * T), 0);
  gate_rows.assign(static_cast<size_t>(T * n_slots * 2 * D), fp16_t{0});
  std::vector<uint8_t> gflags;
  std::vector<float> proj;
  for (Impl::Group& grp : m.groups) {
    const auto S = static_cast<int64_t>(grp.slots.size());
    gflags.resize(static_cast<size_t>(S * T));
    proj.resize(static_cast<size_t>(T * S * 3 * D));
    KVGATE_RETURN_IF_ERROR(grp.flags.download(gflags.data(), gflags.size()));
    KVGATE_RETURN_IF_ERROR(grp.proj.download(proj.data(), proj.size() * sizeof(float)));
    for (int64_t s = 0; s < n_slots; ++s) {
      // Layout slots of this group's gate slots copy their results.
      int64_t j = -1;
      for (int64_t k = 0; k < S; ++k) {
        if (grp.slots[static_cast<size_t>(k)] == m.gate_slot[static_cast<size_t>(s)]) j = k;
      }
      if (j < 0) continue;
      std::copy(gflags.begin() + j * T, gflags.begin() + (j + 1) * T, flags.begin() + s * T);
      for (int64_t t = 0; t < T; ++t) {
        const float* kv = proj.data() + (t * S + j) * 3 * D + D;
        fp16_t* row = gate_rows.data() + (t * n_slots + s) * 2 * D;
        for (int64_t e = 0; e < 2 * D; ++e) row[e] = fp32_to_fp16(kv[e]);
      }
    }
  }
  return Status();
}

kvstore::DenseGate CudaGatePrefill::dense_gate(const std::vector<fp16_t>& gate_rows) const {
  const int64_t row = 2 * impl_->dim;
  return {gate_rows.data(), impl_->layout->blocks.n_slots() * row, row};
}

Result<CompressedPrefill> prefill_compressed_cuda(CudaForward& forward,
                                                  const std::shared_ptr<const PolicyPlan>& plan,
                                                  std::span<const int32_t> tokens,
                                                  kvstore::PageSource* pool,
                                                  std::span<float> logits) {
  const LlamaConfig& c = forward.config();
  if (!plan) return invalid_argument("cuda prefill: no policy plan");
  if (tokens.empty()) return invalid_argument("cuda prefill: prompt is empty");
  const auto T = static_cast<int64_t>(tokens.size());
  if (T > forward.options().max_context_tokens) {
    return invalid_argument("cuda prefill: a prompt of " + str(T) + " tokens exceeds the forward's " +
                            str(forward.options().max_context_tokens) + "-token context");
  }
  if (static_cast<int64_t>(logits.size()) < c.n_vocab) {
    return invalid_argument("cuda prefill: logits buffer smaller than the vocabulary");
  }
  if (policy_needs_stats(plan->config)) {
    return unimplemented("cuda prefill: policy '" + plan->name +
                         "' ranks tokens by attention statistics, which the GPU prefill does "
                         "not gather; use the CPU backend for it");
  }
  std::unique_ptr<CudaGatePrefill> gate;
  if (policy_uses_gate(plan->config)) {
    if (!plan->config.gate) {
      return failed_precondition("cuda prefill: policy '" + plan->name + "' has no gate model");
    }
    KVGATE_ASSIGN_OR_RETURN(gate, CudaGatePrefill::create(*plan->config.gate, plan->layout, T));
  }
  forward.reset();
  const auto t0 = Clock::now();
  if (gate) {
    forward.set_prefill_observer([g = gate.get()](int64_t layer, const float* xn, int64_t n,
                                                  int64_t first, cudaStream_t s) {
      return g->observe(layer, xn, n, first, s);
    });
  }
  const Status run = forward.prefill(tokens, logits.data());
  forward.set_prefill_observer({});
  KVGATE_RETURN_IF_ERROR(run);
  const double prefill_seconds = seconds_since(t0);
  const auto t1 = Clock::now();
  std::vector<uint8_t> flags;
  std::vector<fp16_t> gate_rows;
  kvstore::DenseGate dense_gate;
  if (gate) {
    KVGATE_RETURN_IF_ERROR(gate->finish(plan->config.effective_gate_decision(), forward.stream(),
                                        flags, gate_rows));
    dense_gate = gate->dense_gate(gate_rows);
  } else {
    KVGATE_RETURN_IF_ERROR(policy_flags(plan->config, plan->layout, 0, T, flags, nullptr));
  }
  std::vector<uint16_t> kv;
  KVGATE_RETURN_IF_ERROR(forward.download_kv(kv));
  const int64_t plane = T * c.head_dim;  // one (layer, K|V, head)
  kvstore::DenseKv dense;
  dense.k = reinterpret_cast<const fp16_t*>(kv.data());
  dense.v = dense.k + c.n_kv_heads * plane;
  dense.token_stride = c.head_dim;
  dense.layer_stride = 2 * c.n_kv_heads * plane;
  dense.head_stride = plane;
  KVGATE_ASSIGN_OR_RETURN(kvstore::CompressedKvCache cache,
                          kvstore::CompressedKvCache::build_from_dense(plan->layout, pool, T, dense,
                                                                       flags, dense_gate));
  return CompressedPrefill{std::move(cache), prefill_seconds, seconds_since(t1)};
}

Result<std::vector<Result<CompressedPrefill>>> prefill_compressed_batch_cuda(
    CudaForward& forward, std::span<CompressedPrefillJob> jobs,
    const std::function<Status(int64_t layer)>& on_layer) {
  if (jobs.empty()) return invalid_argument("no prefill jobs");
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (!jobs[i].plan) return invalid_argument("prefill job " + str(static_cast<int64_t>(i)) + " has no KV policy");
    if (jobs[i].pool == nullptr) {
      return invalid_argument("prefill job " + str(static_cast<int64_t>(i)) + " has no page pool");
    }
  }
  std::vector<Result<CompressedPrefill>> out;
  out.reserve(jobs.size());
  for (CompressedPrefillJob& job : jobs) {
    auto done = prefill_compressed_cuda(forward, job.plan, job.tokens, job.pool, job.logits);
    if (done.ok() && job.on_segment) {
      const auto groups = kvstore::wire_slot_groups(job.plan->layout);
      for (size_t g = 0; g < groups.size() && done.ok(); ++g) {
        auto pages = kvstore::wire_group_pages(done->cache, groups[g]);
        Status st = pages.ok() ? job.on_segment(static_cast<int64_t>(g), groups[g], *pages)
                               : pages.status();
        if (!st.ok()) done = st;
      }
    }
    out.push_back(std::move(done));
    if (on_layer) KVGATE_RETURN_IF_ERROR(on_layer(-1));
  }
  return out;
}

}  // namespace kvgate::engine::cuda
