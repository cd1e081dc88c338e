// Decode step time on the GPU over compressed caches (issue 5 target: at
// 16k+ context, gate+pod faster per step than dense by at least the share
// of bytes it no longer reads). Both policies run the same step
// (CudaForward::decode_compressed over caches in a DevicePagePool):
//   dense     the dense policy's layout (blocks of one layer, every token
//             kept: all of the context is read at every layer);
//   gate+pod  the gate's block map with key sharing, distant tokens kept
//             at --keep (random flags, the rate the gates keep at this
//             length), the window-context gate running on the device;
// plus, at batch 1, CudaForward::decode over its contiguous dense cache
// (the plain dense path) as a second reference.
//
//   kvgate_compressed_decode_bench --model M.gguf [--gate G.gate.gguf]
//       [--context 16384] [--keep 0.32] [--batch 1,8] [--steps 32]
//       [--window 256] [--sinks 4] [--pod-group 2] [--page-tokens 16]
//       [--peak-gbps 3350]
//
// Without --gate a random window-context gate with uniform blocks of
// --pod-group layers is made (timing does not depend on its weights). The
// caches hold random K/V. Bytes per step: the GEMV weights plus the K/V
// rows the attention tasks read (near + far rows x head_dim x 2 (K, V) x
// 2 bytes per (layer, KV head, item)). Prints, per batch: ms/step,
// tokens/s, bytes/step, achieved GB/s and the gate+pod/dense ratios of time
// and of bytes. Progress on stderr. Needs a GPU (exits 1 otherwise).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/cuda/cuda_forward.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/device_page_pool.h"
#include "engine/gate_file.h"
#include "engine/gate_runtime.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "kvstore/block_map.h"

namespace kvgate::engine::cuda {
namespace {

using Clock = std::chrono::steady_clock;

struct Flags {
  std::string model;
  std::string gate;
  int64_t context = 16384;
  double keep = 0.32;
  std::vector<int64_t> batch = {1, 8};
  int64_t steps = 32;
  int64_t window = 256;
  int64_t sinks = 4;
  int64_t pod_group = 2;
  int64_t page_tokens = 16;
  double peak_gbps = 3350.0;
};

void progress(const std::string& s) {
  std::fprintf(stderr, "[compressed-decode] %s\n", s.c_str());
}

bool parse(int argc, char** argv, Flags& f) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) return false;
    const std::string v = argv[++i];
    if (a == "--model") f.model = v;
    else if (a == "--gate") f.gate = v;
    else if (a == "--context") f.context = std::atoll(v.c_str());
    else if (a == "--keep") f.keep = std::atof(v.c_str());
    else if (a == "--steps") f.steps = std::atoll(v.c_str());
    else if (a == "--window") f.window = std::atoll(v.c_str());
    else if (a == "--sinks") f.sinks = std::atoll(v.c_str());
    else if (a == "--pod-group") f.pod_group = std::atoll(v.c_str());
    else if (a == "--page-tokens") f.page_tokens = std::atoll(v.c_str());
    else if (a == "--peak-gbps") f.peak_gbps = std::atof(v.c_str());
    else if (a == "--batch") {
      f.batch.clear();
      std::stringstream in(v);
      std::string item;
      while (std::getline(in, item, ',')) f.batch.push_back(std::atoll(item.c_str()));
    } else {
      return false;
    }
  }
  return !f.model.empty() && f.context > f.sinks + f.window && f.keep >= 0 && f.keep <= 1 &&
         f.steps > 0 && !f.batch.empty();
}

// A random attention gate of the model's shapes: window context, uniform
// blocks of g layers, 2 heads of 8.
GateModel random_gate(const LlamaConfig& c, const Flags& f) {
  GateModel g;
  g.blocks = *kvstore::BlockMap::uniform(c.n_layers, c.n_kv_heads, f.pod_group);
  g.kind = GateKind::kAttention;
  g.context = GateContext::kWindow;
  g.n_embd = c.n_embd;
  g.n_gate_heads = 2;
  g.gate_head_dim = 8;
  g.n_sink_tokens = f.sinks;
  g.n_window_tokens = f.window;
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 0.02f);
  const auto proj = static_cast<size_t>(g.gate_dim() * g.n_embd);
  g.slots.resize(static_cast<size_t>(g.blocks.n_slots()));
  for (GateSlot& s : g.slots) {
    for (auto* m : {&s.wq, &s.wk, &s.wv}) {
      m->resize(proj);
      for (float& x : *m) x = n(rng);
    }
    s.wo.assign(static_cast<size_t>(g.gate_dim()), 0.1f);
  }
  return g;
}

struct Run {
  double ms_per_step = 0;
  double kv_bytes = 0;  // per step, all items
};

// Builds `batch` caches of `context` tokens under `layout` in a fresh
// device pool, then times `steps` decode_compressed steps.
Result<Run> run_policy(CudaForward& fwd, const kvstore::KvLayout& layout, bool gated,
                       const CudaGateWeights* gate_weights, int64_t batch, const Flags& f,
                       const std::vector<fp16_t>& k, const std::vector<fp16_t>& v,
                       const std::vector<fp16_t>& gate_rows, const LlamaConfig& c) {
  const int64_t T = f.context;
  const int64_t page_bytes = f.page_tokens * c.head_dim * 2;
  KVGATE_ASSIGN_OR_RETURN(const int64_t per_cache,
                          compressed_pool_bytes(layout, T + f.steps + 8, page_bytes));
  KVGATE_ASSIGN_OR_RETURN(auto pool, DevicePagePool::create(page_bytes, per_cache * batch));
  const int64_t n_slots = layout.blocks.n_slots();
  std::mt19937 rng(11);
  std::bernoulli_distribution keep(f.keep);
  std::vector<kvstore::CompressedKvCache> caches;
  const kvstore::DenseKv dense{k.data(), v.data(), c.n_layers * c.kv_dim(), c.kv_dim(), c.head_dim};
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<uint8_t> flags(static_cast<size_t>(n_slots * T), 1);
    if (gated) {
      for (auto& x : flags) x = keep(rng) ? 1 : 0;
    }
    kvstore::DenseGate dg;
    if (layout.has_gate_state()) dg = {gate_rows.data(), n_slots * layout.gate_row_elems(), layout.gate_row_elems()};
    KVGATE_ASSIGN_OR_RETURN(auto cache, kvstore::CompressedKvCache::build_from_dense(
                                            layout, pool.get(), T, dense, flags, dg));
    caches.push_back(std::move(cache));
    KVGATE_RETURN_IF_ERROR(pool->flush(fwd.stream()));  // bounds the staged bytes
    progress("  cache " + std::to_string(b + 1) + "/" + std::to_string(batch) + " built (" +
             std::to_string(caches.back().bytes() >> 20) + " MiB)");
  }
  std::vector<uint8_t> all_kept(static_cast<size_t>(n_slots), 1);
  std::vector<CompressedItem> items;
  for (auto& cache : caches) {
    items.push_back(CompressedItem{&cache, 42, gated ? std::span<const uint8_t>() : all_kept, false});
  }
  const PageFlush flush = [p = pool.get()](cudaStream_t s) { return p->flush(s); };
  GateDecision decision;
  Run run;
  // KV rows the tasks read at the first timed step (grows by ~1 row per step).
  for (const auto& cache : caches) {
    for (int64_t l = 0; l < c.n_layers; ++l) {
      for (int64_t h = 0; h < c.n_kv_heads; ++h) {
        const int64_t rows = cache.proximal_tokens() + cache.distant(l, h)->n_tokens();
        run.kv_bytes += static_cast<double>(rows) * c.head_dim * 2 * 2;
      }
    }
  }
  for (int i = 0; i < 3; ++i) {  // warm-up
    KVGATE_RETURN_IF_ERROR(fwd.decode_compressed(items, nullptr, flush, gate_weights, decision));
  }
  const auto t0 = Clock::now();
  for (int64_t s = 0; s < f.steps; ++s) {
    KVGATE_RETURN_IF_ERROR(fwd.decode_compressed(items, nullptr, flush, gate_weights, decision));
  }
  run.ms_per_step = std::chrono::duration<double, std::milli>(Clock::now() - t0).count() /
                    static_cast<double>(f.steps);
  return run;
}

int main_impl(int argc, char** argv) {
  Flags f;
  if (!parse(argc, argv, f)) {
    std::fprintf(stderr,
                 "usage: kvgate_compressed_decode_bench --model M.gguf [--gate G] [--context N] "
                 "[--keep R] [--batch 1,8] [--steps N] [--window N] [--sinks N] [--pod-group G] "
                 "[--page-tokens N] [--peak-gbps X]\n");
    return 2;
  }
  if (device_count() == 0) {
    std::fprintf(stderr, "kvgate_compressed_decode_bench: no CUDA device\n");
    return 1;
  }
  progress("loading " + f.model);
  auto model = LlamaModel::load(f.model);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().to_string().c_str());
    return 1;
  }
  const LlamaConfig& c = (*model)->config();
  GateModel gate;
  if (!f.gate.empty()) {
    auto g = load_gate_for_model(f.gate, **model);
    if (!g.ok()) {
      std::fprintf(stderr, "%s\n", g.status().to_string().c_str());
      return 1;
    }
    gate = std::move(*g);
  } else {
    gate = random_gate(c, f);
  }
  auto gp_layout = make_gate_layout(c, gate, true, f.sinks, f.window);
  if (!gp_layout.ok()) {
    std::fprintf(stderr, "%s\n", gp_layout.status().to_string().c_str());
    return 1;
  }
  kvstore::KvLayout dense_layout;
  dense_layout.blocks = *kvstore::BlockMap::dense(c.n_layers, c.n_kv_heads);
  dense_layout.head_dim = c.head_dim;
  dense_layout.n_sink_tokens = f.sinks;
  dense_layout.n_window_tokens = f.window;
  const int64_t max_batch = *std::max_element(f.batch.begin(), f.batch.end());
  CudaForwardOptions o;
  o.max_context_tokens = f.context + f.steps + 16;
  o.max_prefill_tokens = std::max<int64_t>(512, max_batch);
  o.max_decode_batch = max_batch;
  progress("uploading weights");
  auto fwd = CudaForward::create(HostWeights::of(**model), o);
  if (!fwd.ok()) {
    std::fprintf(stderr, "%s\n", fwd.status().to_string().c_str());
    return 1;
  }
  auto gw = CudaGateWeights::create(gate, *gp_layout);
  if (!gw.ok()) {
    std::fprintf(stderr, "%s\n", gw.status().to_string().c_str());
    return 1;
  }
  progress("random K/V for " + std::to_string(f.context) + " tokens");
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const auto kv_elems = static_cast<size_t>(f.context * c.n_layers * c.kv_dim());
  std::vector<fp16_t> k(kv_elems), v(kv_elems);
  for (size_t i = 0; i < kv_elems; ++i) {
    k[i] = fp32_to_fp16(u(rng));
    v[i] = fp32_to_fp16(u(rng));
  }
  std::vector<fp16_t> gate_rows(
      static_cast<size_t>(f.context * gp_layout->blocks.n_slots() * gp_layout->gate_row_elems()));
  for (auto& x : gate_rows) x = fp32_to_fp16(u(rng) * 0.1f);
  const double weight_bytes = static_cast<double>((*fwd)->gemv_weight_bytes());

  std::printf("context %lld, keep %.2f, window %lld, sinks %lld, page %lld tokens, weights %.1f MiB\n",
              static_cast<long long>(f.context), f.keep, static_cast<long long>(f.window),
              static_cast<long long>(f.sinks), static_cast<long long>(f.page_tokens),
              weight_bytes / (1 << 20));
  std::printf("%-6s %-10s %10s %10s %12s %9s %8s\n", "batch", "policy", "ms/step", "tok/s",
              "MB/step", "GB/s", "of peak");
  for (int64_t b : f.batch) {
    Run runs[2];
    for (int p = 0; p < 2; ++p) {
      const bool gated = p == 1;
      progress(std::string(gated ? "gate+pod" : "dense") + ", batch " + std::to_string(b));
      auto r = run_policy(**fwd, gated ? *gp_layout : dense_layout, gated,
                          gated ? gw->get() : nullptr, b, f, k, v, gate_rows, c);
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.status().to_string().c_str());
        return 1;
      }
      runs[p] = *r;
      const double bytes = weight_bytes + r->kv_bytes;
      const double gbps = bytes / (r->ms_per_step * 1e-3) / 1e9;
      std::printf("%-6lld %-10s %10.3f %10.1f %12.1f %9.1f %7.1f%%\n", static_cast<long long>(b),
                  gated ? "gate+pod" : "dense", r->ms_per_step,
                  1e3 * static_cast<double>(b) / r->ms_per_step, bytes / 1e6, gbps,
                  100.0 * gbps / f.peak_gbps);
    }
    const double time_ratio = runs[1].ms_per_step / runs[0].ms_per_step;
    const double bytes_ratio = (weight_bytes + runs[1].kv_bytes) / (weight_bytes + runs[0].kv_bytes);
    std::printf("batch %lld: gate+pod / dense time %.3f, bytes %.3f, KV bytes %.3f -> %s\n",
                static_cast<long long>(b), time_ratio, bytes_ratio,
                runs[1].kv_bytes / runs[0].kv_bytes,
                time_ratio <= bytes_ratio ? "meets the target" : "short of the target");
  }
  // The plain dense path at batch 1: CudaForward's contiguous cache.
  progress("plain dense decode (CudaForward::decode), batch 1");
  std::vector<int32_t> prompt(static_cast<size_t>(f.context), 42);
  Status st = (*fwd)->prefill(prompt);
  for (int i = 0; st.ok() && i < 3; ++i) st = (*fwd)->decode(42);
  const auto t0 = Clock::now();
  for (int64_t s = 0; st.ok() && s < f.steps; ++s) st = (*fwd)->decode(42);
  if (st.ok()) st = (*fwd)->synchronize();
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.to_string().c_str());
    return 1;
  }
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count() /
                    static_cast<double>(f.steps);
  std::printf("%-6d %-10s %10.3f %10.1f\n", 1, "dense-plain", ms, 1e3 / ms);
  return 0;
}

}  // namespace
}  // namespace kvgate::engine::cuda

int main(int argc, char** argv) {
  return kvgate::engine::cuda::main_impl(argc, argv);
}
