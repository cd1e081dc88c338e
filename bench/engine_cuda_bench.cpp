// Throughput of CudaForward (engine/cuda/cuda_forward.h) against a device's
// peak: prefill tokens/s and achieved TFLOP/s at several prompt lengths,
// decode tokens/s at batch 1 and achieved bandwidth, for SmolLM2-135M (the
// GGUF file), for a synthetic model with Llama-3-8B's shapes (random F16
// weights made in memory) and for any llama GGUF (--model-file: the GPU
// benchmark passes the synthetic file tools/make_synthetic_gguf writes, so
// llama.cpp runs the very same weights; docs/gpu-bench.md).
//
//   kvgate_engine_cuda_bench [--model PATH] [--models smollm2,llama3-8b,file]
//       [--model-file PATH [--name NAME]] [--json PATH]
//       [--prefill 512,4096] [--decode-context 512] [--decode-steps 256]
//       [--peak-tflops 989] [--peak-gbps 3350] [--repeats 3]
//
// --model-file alone (no --models) benchmarks just that file, reported
// under NAME (default: "file"). --json writes every figure as one JSON object
// {"peak_tflops", "peak_gbps", "models": {NAME: {"config", "prefill":
// {"N": {"ms", "tokens_per_s", "flops", "tflops", "fraction"}}, "decode":
// {"plain"|"graph": {"context", "steps", "ms_per_token", "tokens_per_s",
// "bytes_per_step", "gbps", "fraction"}}}}}.
//
// Defaults are an H100 SXM's dense FP16 tensor peak and HBM3 bandwidth.
// FLOPs counted: 2 x (matrix parameters) per token plus causal attention,
// 4 x head_dim per (query, key, head) pair (Q.K and P.V); the prefill
// attention kernel's third pass (it recomputes Q.K to round probabilities
// as the CPU does) is not counted. Decode bytes per step: every weight the
// GEMV reads (layer matrices and the vocabulary projection) plus the K and
// V rows attention reads at that step's context. Results on stdout,
// progress on stderr. Needs a GPU; exits 1 with the reason otherwise.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "engine/cuda/cuda_forward.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/launch_plan.h"
#include "engine/model.h"

namespace kvgate::engine::cuda {
namespace {

struct Flags {
  std::string model = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string models = "smollm2,llama3-8b";
  bool models_set = false;
  std::string model_file;
  std::string name = "file";
  std::string json_out;
  std::vector<int64_t> prefill = {512, 4096};
  int64_t decode_context = 512;
  int64_t decode_steps = 256;
  int repeats = 3;
  double peak_tflops = 989.0;
  double peak_gbps = 3350.0;
};

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::atoll(item.c_str()));
  return out;
}

bool parse_flags(int argc, char** argv, Flags& f) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string v;
    const auto eq = a.find('=');
    if (eq != std::string::npos) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (i + 1 < argc) {
      v = argv[++i];
    } else {
      std::fprintf(stderr, "flag %s needs a value\n", a.c_str());
      return false;
    }
    if (a == "--model") {
      f.model = v;
    } else if (a == "--models") {
      f.models = v;
      f.models_set = true;
    } else if (a == "--model-file") {
      f.model_file = v;
    } else if (a == "--name") {
      f.name = v;
    } else if (a == "--json") {
      f.json_out = v;
    } else if (a == "--prefill") {
      f.prefill = parse_list(v);
    } else if (a == "--decode-context") {
      f.decode_context = std::atoll(v.c_str());
    } else if (a == "--decode-steps") {
      f.decode_steps = std::atoll(v.c_str());
    } else if (a == "--repeats") {
      f.repeats = std::atoi(v.c_str());
    } else if (a == "--peak-tflops") {
      f.peak_tflops = std::atof(v.c_str());
    } else if (a == "--peak-gbps") {
      f.peak_gbps = std::atof(v.c_str());
    } else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return false;
    }
  }
  if (!f.model_file.empty() && !f.models_set) f.models = "file";
  if (f.name.empty() || f.name.find_first_of("\"\\") != std::string::npos) {
    std::fprintf(stderr, "--name must be non-empty, without quotes or backslashes\n");
    return false;
  }
  for (int64_t n : f.prefill) {
    if (n < 1) {
      std::fprintf(stderr, "--prefill lengths must be >= 1\n");
      return false;
    }
  }
  if (f.prefill.empty() || f.decode_context < 1 || f.decode_steps < 1 || f.repeats < 1 ||
      !(f.peak_tflops > 0) || !(f.peak_gbps > 0)) {
    std::fprintf(stderr, "bad flag values\n");
    return false;
  }
  return true;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool check(const Status& s, const char* what) {
  if (s.ok()) return true;
  std::fprintf(stderr, "%s: %s\n", what, s.to_string().c_str());
  return false;
}

// Random F16 weights with Llama-3-8B's shapes. One host buffer per distinct
// shape, shared by every layer (CudaForward uploads each layer on its own,
// so the device holds 32 layers); output tied to the embedding (uploaded
// once; Llama 3 unties them, which changes neither FLOPs nor bytes read per
// step). Values ~ U(-a, a) with a = sqrt(3 / cols), unit-variance outputs.
struct SyntheticLlama3 {
  LlamaConfig config;
  std::vector<uint16_t> embd, wq, wk, w_ff_in, w_ff_out;
  std::vector<float> norm;

  static void fill(std::vector<uint16_t>& v, size_t n, int64_t cols, uint64_t seed) {
    v.resize(n);
    const float a = std::sqrt(3.0f / static_cast<float>(cols));
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; ++i) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);  // [0, 1)
      v[i] = fp32_to_fp16((2.0f * u - 1.0f) * a);
    }
  }

  SyntheticLlama3() {
    LlamaConfig& c = config;
    c.architecture = "llama";
    c.n_layers = 32;
    c.n_embd = 4096;
    c.n_ff = 14336;
    c.n_heads = 32;
    c.n_kv_heads = 8;
    c.head_dim = 128;
    c.n_vocab = 128256;
    c.n_ctx_train = 8192;
    c.rope_freq_base = 500000.0f;
    c.rms_eps = 1e-5f;
    std::fprintf(stderr, "llama3-8b: generating %.2f GB of random F16 weights on the host\n",
                 2.0 *
                     (c.n_vocab * c.n_embd + c.q_dim() * c.n_embd + c.kv_dim() * c.n_embd +
                      2 * c.n_ff * c.n_embd) /
                     1e9);
    fill(embd, static_cast<size_t>(c.n_vocab * c.n_embd), 3, 1);  // embeddings ~ U(-1, 1)
    fill(wq, static_cast<size_t>(c.q_dim() * c.n_embd), c.n_embd, 2);
    fill(wk, static_cast<size_t>(c.kv_dim() * c.n_embd), c.n_embd, 3);
    fill(w_ff_in, static_cast<size_t>(c.n_ff * c.n_embd), c.n_embd, 4);
    fill(w_ff_out, static_cast<size_t>(c.n_embd * c.n_ff), c.n_ff, 5);
    norm.assign(static_cast<size_t>(c.n_embd), 1.0f);
  }

  HostWeights weights() const {
    const LlamaConfig& c = config;
    HostWeights w;
    w.config = c;
    auto view = [](const std::vector<uint16_t>& b, int64_t rows, int64_t cols) {
      return cpu::WeightView{GgmlType::kF16, b.data(), rows, cols};
    };
    LayerWeights l;
    l.attn_norm = norm.data();
    l.ffn_norm = norm.data();
    l.wq = view(wq, c.q_dim(), c.n_embd);
    l.wk = view(wk, c.kv_dim(), c.n_embd);
    l.wv = view(wk, c.kv_dim(), c.n_embd);
    l.wo = view(wq, c.n_embd, c.q_dim());  // square: the same bytes serve
    l.w_gate = view(w_ff_in, c.n_ff, c.n_embd);
    l.w_up = view(w_ff_in, c.n_ff, c.n_embd);
    l.w_down = view(w_ff_out, c.n_embd, c.n_ff);
    w.layers.assign(static_cast<size_t>(c.n_layers), l);
    w.token_embd = view(embd, c.n_vocab, c.n_embd);
    w.output = w.token_embd;
    w.output_norm = norm.data();
    return w;
  }
};

double matrix_params(const LlamaConfig& c) {
  const double per_layer =
      double(c.q_dim()) * c.n_embd * 2 + 2.0 * c.kv_dim() * c.n_embd + 3.0 * c.n_ff * c.n_embd;
  return per_layer * c.n_layers;
}

// Useful FLOPs of a causal prefill of n tokens from an empty cache.
double prefill_flops(const LlamaConfig& c, int64_t n) {
  const double dense = 2.0 * matrix_params(c) * n + 2.0 * c.n_vocab * c.n_embd;  // + 1 logits row
  const double pairs = double(n) * (n + 1) / 2;  // (query, key) pairs, causal
  const double attn = 4.0 * c.head_dim * pairs * c.n_heads * c.n_layers;
  return dense + attn;
}

// ---- the --json report (numbers and plain names: no escaping needed; the
// header comment has the layout) ----
template <typename... Args>
std::string format(const char* fmt, Args... args) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), fmt, args...);
  return buf;
}

std::string json_object(const std::vector<std::string>& members) {
  std::string out = "{";
  for (size_t i = 0; i < members.size(); ++i) out += (i ? ", " : "") + members[i];
  return out + "}";
}

std::string json_config(const LlamaConfig& c, const std::string& weight_type,
                        int64_t gemv_weight_bytes) {
  return format(
      "\"config\": {\"n_layers\": %lld, \"n_embd\": %lld, \"n_ff\": %lld, \"n_heads\": %lld, "
      "\"n_kv_heads\": %lld, \"head_dim\": %lld, \"n_vocab\": %lld, \"weight_type\": \"%s\", "
      "\"gemv_weight_bytes\": %lld}",
      (long long)c.n_layers, (long long)c.n_embd, (long long)c.n_ff, (long long)c.n_heads,
      (long long)c.n_kv_heads, (long long)c.head_dim, (long long)c.n_vocab, weight_type.c_str(),
      (long long)gemv_weight_bytes);
}

std::string json_prefill(int64_t n, double seconds, double flops, double peak_tflops) {
  const double tflops = flops / seconds / 1e12;
  return format(
      "\"%lld\": {\"ms\": %.4f, \"tokens_per_s\": %.2f, \"flops\": %.6e, \"tflops\": %.3f, "
      "\"fraction\": %.5f}",
      (long long)n, seconds * 1e3, n / seconds, flops, tflops, tflops / peak_tflops);
}

std::string json_decode(const char* mode, int64_t context, int64_t steps, double step_s,
                        double bytes_per_step, double peak_gbps) {
  const double gbps = bytes_per_step / step_s / 1e9;
  return format(
      "\"%s\": {\"batch\": 1, \"context\": %lld, \"steps\": %lld, \"ms_per_token\": %.5f, "
      "\"tokens_per_s\": %.3f, \"bytes_per_step\": %.6e, \"gbps\": %.3f, \"fraction\": %.5f}",
      mode, (long long)context, (long long)steps, step_s * 1e3, 1.0 / step_s, bytes_per_step, gbps,
      gbps / peak_gbps);
}

// Benchmarks one model; its JSON object ({"config", "prefill", "decode"})
// goes to `js`.
int bench_model(const std::string& name, const HostWeights& w, const Flags& f, std::string& js) {
  const LlamaConfig& c = w.config;
  const int64_t max_prefill = *std::max_element(f.prefill.begin(), f.prefill.end());
  CudaForwardOptions o;
  o.max_prefill_tokens = max_prefill;
  o.max_context_tokens = std::max(max_prefill, f.decode_context + f.decode_steps + 8);
  // What the device must hold (Llama-3-8B in F16: ~15 GB of weights, ~0.6
  // GB of cache, ~1.5 GB of scratch; cuda_plan_test checks the arithmetic).
  ForwardMemoryShape ms;
  ms.n_layers = c.n_layers;
  ms.n_embd = c.n_embd;
  ms.n_ff = c.n_ff;
  ms.n_heads = c.n_heads;
  ms.n_kv_heads = c.n_kv_heads;
  ms.head_dim = c.head_dim;
  ms.n_vocab = c.n_vocab;
  ms.layer_type = w.layers[0].wq.type;
  ms.embd_type = w.token_embd.type;
  ms.tied_output = w.output.data == w.token_embd.data;
  ms.output_type = w.output.type;
  ms.max_context = o.max_context_tokens;
  ms.max_prefill = o.max_prefill_tokens;
  if (auto need = plan_forward_memory(ms); need.ok()) {
    std::fprintf(stderr,
                 "%s: uploading; device memory needed ~%.2f GB (KV cache %.2f GB, "
                 "scratch %.2f GB)\n",
                 name.c_str(), need->total_bytes / 1e9, need->kv_cache_bytes / 1e9,
                 need->scratch_bytes / 1e9);
  }
  auto created = CudaForward::create(w, o);
  if (!check(created.status(), "create")) return 1;
  CudaForward& fwd = **created;
  std::printf(
      "%s: %lld layers, embd %lld, ff %lld, heads %lld/%lld x %lld, vocab %lld; device "
      "weights %.2f GB (GEMV) + %.2f GB (fp16 for GEMM), KV cache %.2f GB\n",
      name.c_str(), (long long)c.n_layers, (long long)c.n_embd, (long long)c.n_ff,
      (long long)c.n_heads, (long long)c.n_kv_heads, (long long)c.head_dim, (long long)c.n_vocab,
      fwd.gemv_weight_bytes() / 1e9, fwd.gemm_weight_bytes() / 1e9, fwd.kv_cache_bytes() / 1e9);
  const auto traits = ggml_type_traits(static_cast<uint32_t>(w.layers[0].wq.type));
  const std::string type_name = traits ? std::string(traits->name) : "unknown";
  std::vector<std::string> prefill_js, decode_js;

  std::vector<int32_t> prompt(static_cast<size_t>(o.max_context_tokens));
  for (size_t i = 0; i < prompt.size(); ++i) {
    prompt[i] = static_cast<int32_t>((i * 7919 + 13) % static_cast<size_t>(c.n_vocab));
  }

  for (int64_t n : f.prefill) {
    std::fprintf(stderr, "%s: prefill %lld tokens (warm-up + %d timed)\n", name.c_str(),
                 (long long)n, f.repeats);
    const std::span<const int32_t> toks(prompt.data(), static_cast<size_t>(n));
    fwd.reset();
    if (!check(fwd.prefill(toks), "prefill") || !check(fwd.synchronize(), "prefill")) return 1;
    double best = 1e30;
    for (int r = 0; r < f.repeats; ++r) {
      fwd.reset();
      const double t0 = now_s();
      if (!check(fwd.prefill(toks), "prefill") || !check(fwd.synchronize(), "prefill")) return 1;
      best = std::min(best, now_s() - t0);
    }
    const double tflops = prefill_flops(c, n) / best / 1e12;
    std::printf(
        "%s prefill %6lld tokens: %8.2f ms  %10.0f tok/s  %7.1f TFLOP/s  (%.1f%% of %.0f)\n",
        name.c_str(), (long long)n, best * 1e3, n / best, tflops, 100.0 * tflops / f.peak_tflops,
        f.peak_tflops);
    prefill_js.push_back(json_prefill(n, best, prefill_flops(c, n), f.peak_tflops));
  }

  // Decode at batch 1 after a prompt of decode_context tokens: plain steps
  // (host token each step, waiting for it) and graph steps fed on device.
  const std::span<const int32_t> ctx(prompt.data(), static_cast<size_t>(f.decode_context));
  const double kv_row_bytes = 2.0 * c.n_layers * c.kv_dim() * 2;  // K + V, fp16, all layers
  const double avg_context = f.decode_context + (f.decode_steps + 1) / 2.0;
  const double bytes_per_step = double(fwd.gemv_weight_bytes()) + kv_row_bytes * avg_context;
  for (int mode = 0; mode < 2; ++mode) {
    std::fprintf(stderr, "%s: decode %lld steps after %lld tokens (%s)\n", name.c_str(),
                 (long long)f.decode_steps, (long long)f.decode_context,
                 mode == 0 ? "plain" : "graph");
    fwd.reset();
    if (!check(fwd.prefill(ctx), "prefill") || !check(fwd.synchronize(), "prefill")) return 1;
    if (mode == 1 && !check(fwd.capture_decode_graph(), "capture")) return 1;
    const double t0 = now_s();
    for (int64_t s = 0; s < f.decode_steps; ++s) {
      if (mode == 0) {
        auto tok = fwd.greedy_token();  // waits: what a host-driven loop pays
        if (!check(tok.status(), "greedy") || !check(fwd.decode(*tok), "decode")) return 1;
      } else if (!check(fwd.decode_graph_greedy(), "graph decode")) {
        return 1;
      }
    }
    if (!check(fwd.synchronize(), "decode")) return 1;
    const double step = (now_s() - t0) / f.decode_steps;
    const double gbps = bytes_per_step / step / 1e9;
    std::printf(
        "%s decode (%s, ctx %lld): %7.3f ms/token  %8.1f tok/s  %7.1f GB/s  (%.1f%% of "
        "%.0f)\n",
        name.c_str(), mode == 0 ? "plain" : "graph", (long long)f.decode_context, step * 1e3,
        1.0 / step, gbps, 100.0 * gbps / f.peak_gbps, f.peak_gbps);
    decode_js.push_back(json_decode(mode == 0 ? "plain" : "graph", f.decode_context,
                                    f.decode_steps, step, bytes_per_step, f.peak_gbps));
  }
  js = json_object({json_config(c, type_name, fwd.gemv_weight_bytes()),
                    "\"prefill\": " + json_object(prefill_js),
                    "\"decode\": " + json_object(decode_js)});
  return 0;
}

int run(int argc, char** argv) {
  Flags f;
  if (!parse_flags(argc, argv, f)) return 2;
  if (device_count() == 0) {
    std::fprintf(stderr, "no CUDA device: this benchmark needs a GPU\n");
    return 1;
  }
  int rc = 0;
  std::vector<std::string> models_js;  // "NAME": {...} for --json
  auto run_one = [&](const std::string& name, const HostWeights& w) {
    std::string one;
    const int r = bench_model(name, w, f, one);
    if (r == 0) models_js.push_back("\"" + name + "\": " + one);
    return r;
  };
  for (const std::string& which : [&] {
         std::vector<std::string> v;
         std::stringstream in(f.models);
         std::string s;
         while (std::getline(in, s, ',')) v.push_back(s);
         return v;
       }()) {
    if (which == "smollm2") {
      std::fprintf(stderr, "smollm2: loading %s\n", f.model.c_str());
      auto m = LlamaModel::load(f.model);
      if (!check(m.status(), "load")) {
        rc = 1;
        continue;
      }
      rc |= run_one("smollm2", HostWeights::of(**m));
    } else if (which == "llama3-8b") {
      const SyntheticLlama3 synth;
      rc |= run_one("llama3-8b", synth.weights());
    } else if (which == "file") {
      if (f.model_file.empty()) {
        std::fprintf(stderr, "--models file needs --model-file PATH\n");
        rc = 2;
        continue;
      }
      std::fprintf(stderr, "%s: loading %s\n", f.name.c_str(), f.model_file.c_str());
      auto m = LlamaModel::load(f.model_file);
      if (!check(m.status(), "load")) {
        rc = 1;
        continue;
      }
      rc |= run_one(f.name, HostWeights::of(**m));
    } else {
      std::fprintf(stderr, "unknown model %s (smollm2, llama3-8b, file)\n", which.c_str());
      rc = 2;
    }
  }
  if (!f.json_out.empty()) {
    std::FILE* out = std::fopen(f.json_out.c_str(), "w");
    if (out == nullptr) {
      std::fprintf(stderr, "cannot write %s: %s\n", f.json_out.c_str(), std::strerror(errno));
      return 1;
    }
    std::fprintf(out, "{\"peak_tflops\": %.1f, \"peak_gbps\": %.1f, \"models\": %s}\n",
                 f.peak_tflops, f.peak_gbps, json_object(models_js).c_str());
    if (std::fclose(out) != 0) {
      std::fprintf(stderr, "cannot write %s\n", f.json_out.c_str());
      return 1;
    }
  }
  return rc;
}

}  // namespace
}  // namespace kvgate::engine::cuda

int main(int argc, char** argv) {
  return kvgate::engine::cuda::run(argc, argv);
}
