// Writes a llama GGUF with random F16 weights (tools/synthetic_gguf.h), the
// model both kvgate and llama.cpp load in the GPU benchmark
// (docs/gpu-bench.md). Benchmarks only: the weights are noise.
//
//   kvgate_make_synthetic_gguf --out PATH [--shape llama3-8b|tiny]
//       [--layers N] [--seed S]
//
// Progress on stderr; exit 0 on success, 1 on a write error, 2 on bad flags.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "tools/synthetic_gguf.h"

int main(int argc, char** argv) {
  std::string out, shape_name = "llama3-8b";
  long long layers = -1;
  unsigned long long seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::printf("kvgate_make_synthetic_gguf --out PATH [--shape llama3-8b|tiny] [--layers N] "
                  "[--seed S]\n");
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "flag %s needs a value\n", a.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    char* end = nullptr;
    if (a == "--out") {
      out = v;
    } else if (a == "--shape") {
      shape_name = v;
    } else if (a == "--layers") {
      layers = std::strtoll(v.c_str(), &end, 10);
      if (*end != '\0' || layers < 1) {
        std::fprintf(stderr, "--layers wants a positive integer, got '%s'\n", v.c_str());
        return 2;
      }
    } else if (a == "--seed") {
      seed = std::strtoull(v.c_str(), &end, 10);
      if (*end != '\0') {
        std::fprintf(stderr, "--seed wants an integer, got '%s'\n", v.c_str());
        return 2;
      }
    } else {
      std::fprintf(stderr, "unknown flag %s (see --help)\n", a.c_str());
      return 2;
    }
  }
  if (out.empty()) {
    std::fprintf(stderr, "--out PATH is required\n");
    return 2;
  }
  auto shape = kvgate::tools::synthetic_preset(shape_name);
  if (!shape.ok()) {
    std::fprintf(stderr, "%s\n", shape.status().to_string().c_str());
    return 2;
  }
  if (layers > 0) shape->n_layers = layers;
  std::fprintf(stderr,
               "synthetic %s: %lld layers, embd %lld, ff %lld, heads %lld/%lld, vocab %lld; "
               "%.1f M params, writing %s\n",
               shape->name.c_str(), (long long)shape->n_layers, (long long)shape->n_embd,
               (long long)shape->n_ff, (long long)shape->n_heads, (long long)shape->n_kv_heads,
               (long long)shape->n_vocab, shape->n_params() / 1e6, out.c_str());
  int last_pct = -1;
  const kvgate::Status s = kvgate::tools::write_synthetic_llama(
      *shape, out, seed, [&](uint64_t done, uint64_t total) {
        const int pct = static_cast<int>(100 * done / total);
        if (pct / 10 != last_pct / 10) {
          std::fprintf(stderr, "  %3d%% of %.2f GB\n", pct, total / 1e9);
          last_pct = pct;
        }
      });
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.to_string().c_str());
    return 1;
  }
  std::fprintf(stderr, "wrote %s\n", out.c_str());
  return 0;
}
