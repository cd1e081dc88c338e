// Timing main for the CPU matmul kernels on SmolLM2-135M's shapes (not a
// test; build with -DKVGATE_BENCH_KERNELS=ON).
//
//   matmul_bench [threads] [isa]
//
// Prints, per matrix: decode (1 token) time and GB/s of weights read, and
// prefill GFLOP/s (2*N*K*T flops) for several token counts; then a decode
// "token" that streams all 30 layers plus the output matrix from memory (96
// MB, more than the L3), which is what a real decode step costs.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/isa.h"
#include "engine/cpu/matmul.h"
#include "engine/cpu/quant.h"
#include "engine/cpu/thread_pool.h"

using kvgate::engine::ggml_row_bytes;
using kvgate::engine::GgmlType;
namespace cpu = kvgate::engine::cpu;

namespace {

using Clock = std::chrono::steady_clock;

struct Shape {
  const char* name;
  GgmlType type;
  int64_t rows, cols;
};

std::vector<uint8_t> make_weight(const Shape& s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<float> row(s.cols);
  const size_t rb = *ggml_row_bytes(s.type, s.cols);
  std::vector<uint8_t> w(rb * s.rows);
  for (int64_t r = 0; r < s.rows; ++r) {
    for (auto& f : row) f = nd(rng);
    cpu::quantize_row(s.type, row.data(), w.data() + r * rb, s.cols);
  }
  return w;
}

// Median (or, with `best`, minimum: the machine is shared, so the minimum
// is the cleaner number) seconds per call over timed batches.
template <typename F>
double time_it(F&& f, double min_batch_s = 0.02, bool best = false) {
  f();
  int iters = 1;
  for (;;) {
    const auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) f();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (dt >= min_batch_s) break;
    iters *= 2;
  }
  std::vector<double> samples;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) f();
    samples.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / iters);
  }
  std::sort(samples.begin(), samples.end());
  return best ? samples.front() : samples[samples.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  cpu::Isa isa = cpu::best_isa();
  if (argc > 2) {
    const std::string a = argv[2];
    isa = a == "scalar" ? cpu::Isa::kScalar : a == "avx2" ? cpu::Isa::kAvx2 : cpu::Isa::kAvx512;
  }
  isa = cpu::clamp_isa(isa);
  std::printf("threads=%d isa=%s\n", threads, cpu::isa_name(isa));
  cpu::ThreadPool pool(threads);
  cpu::MatmulWorkspace ws;
  ws.reserve(512, 1536, threads);

  const Shape shapes[] = {
      {"attn_q/o 576x576 Q4_1", GgmlType::kQ4_1, 576, 576},
      {"attn_k/v 192x576 Q4_1", GgmlType::kQ4_1, 192, 576},
      {"ffn_gate/up 1536x576 Q4_1", GgmlType::kQ4_1, 1536, 576},
      {"ffn_down 576x1536 Q4_1", GgmlType::kQ4_1, 576, 1536},
      {"output 49152x576 Q8_0", GgmlType::kQ8_0, 49152, 576},
      {"1536x576 Q4_0", GgmlType::kQ4_0, 1536, 576},
      {"1536x576 Q8_0", GgmlType::kQ8_0, 1536, 576},
      {"1536x576 F16", GgmlType::kF16, 1536, 576},
      {"1536x576 F32", GgmlType::kF32, 1536, 576},
  };
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(512 * 1536);
  for (auto& f : x) f = nd(rng);
  std::vector<float> y(512 * 49152);

  std::printf("%-28s %11s %9s | prefill GFLOP/s at T=%s\n", "matrix", "decode us", "GB/s",
              "16 / 64 / 128 / 256 / 512");
  for (const Shape& s : shapes) {
    const std::vector<uint8_t> w = make_weight(s, 7);
    const cpu::WeightView wv{s.type, w.data(), s.rows, s.cols};
    const double bytes = static_cast<double>(w.size());
    const double t1 = time_it([&] { cpu::matmul(wv, x.data(), 1, y.data(), pool, ws, isa); });
    std::printf("%-28s %11.1f %9.1f |", s.name, t1 * 1e6, bytes / t1 / 1e9);
    for (int64_t nt : {16, 64, 128, 256, 512}) {
      if (s.rows > 4096 && nt > 64) {
        std::printf("      -");
        continue;
      }
      const double t = time_it([&] { cpu::matmul(wv, x.data(), nt, y.data(), pool, ws, isa); });
      std::printf(" %6.1f", 2.0 * s.rows * s.cols * nt / t / 1e9);
    }
    std::printf("\n");
  }

  // A whole decode step's matmuls, each layer with its own weights so they
  // stream from DRAM as in the real model (30 layers + output: ~96 MB).
  const int kLayers = 30;
  const Shape layer[] = {
      {"q", GgmlType::kQ4_1, 576, 576},     {"k", GgmlType::kQ4_1, 192, 576},
      {"v", GgmlType::kQ4_1, 192, 576},     {"o", GgmlType::kQ4_1, 576, 576},
      {"gate", GgmlType::kQ4_1, 1536, 576}, {"up", GgmlType::kQ4_1, 1536, 576},
      {"down", GgmlType::kQ4_1, 576, 1536},
  };
  std::vector<std::vector<uint8_t>> weights;
  std::vector<cpu::WeightView> views;
  double total_bytes = 0;
  for (int l = 0; l < kLayers; ++l) {
    for (const Shape& s : layer) {
      weights.push_back(make_weight(s, 100 + l));
      views.push_back({s.type, weights.back().data(), s.rows, s.cols});
      total_bytes += static_cast<double>(weights.back().size());
    }
  }
  const Shape out{"output", GgmlType::kQ8_0, 49152, 576};
  weights.push_back(make_weight(out, 99));
  views.push_back({out.type, weights.back().data(), out.rows, out.cols});
  total_bytes += static_cast<double>(weights.back().size());

  auto step = [&](int64_t nt, bool with_output) {
    for (size_t i = 0; i + 1 < views.size(); ++i) {
      cpu::matmul(views[i], x.data(), nt, y.data(), pool, ws, isa);
    }
    if (with_output) cpu::matmul(views.back(), x.data(), 1, y.data(), pool, ws, isa);
  };
  const double td = time_it([&] { step(1, true); }, 0.2);
  const double tdb = time_it([&] { step(1, true); }, 0.05, true);
  std::printf(
      "decode step (all matmuls, %.1f MB): median %.2f ms = %.1f GB/s, best %.2f ms = %.1f GB/s\n",
      total_bytes / 1e6, td * 1e3, total_bytes / td / 1e9, tdb * 1e3, total_bytes / tdb / 1e9);
  double layer_flops = 0;
  for (size_t i = 0; i + 1 < views.size(); ++i) layer_flops += 2.0 * views[i].rows * views[i].cols;
  for (int64_t nt : {64, 512}) {
    const double tp = time_it([&] { step(nt, false); }, 0.2, true);
    std::printf(
        "prefill T=%ld (layer matmuls + last-token output), best: %.1f ms = %.1f GFLOP/s, %.0f "
        "tok/s\n",
        static_cast<long>(nt), tp * 1e3, layer_flops * nt / tp / 1e9, nt / tp);
  }
  return 0;
}
