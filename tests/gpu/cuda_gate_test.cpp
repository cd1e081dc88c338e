// The Attention-Gate's kernels (engine/cuda/gate.cu) against the CPU's
// arithmetic (engine/gate_math.h, as GatePrefill uses it with the window
// context). Skips without a device, except the argument checks, which
// return before any CUDA call.
//
// Tolerances (float32 eps = 2^-23):
//   projection: the GPU sums n_embd products in a warp-strided order, the
//     CPU in its own; both are within n_embd * eps * Σ|w_i x_i| of the exact
//     sum, so they differ by at most 2 * n_embd * eps * Σ|w_i x_i|.
//   logits from the same projections: the kernel does the CPU's operations
//     in the CPU's order (context order, online softmax, heads summed in
//     order), so only expf vs std::exp (a few ulp each) and FMA contraction
//     (one rounding fewer per multiply-add) differ. Each row's p and each
//     accumulator then carry a relative error of a few eps, growing at most
//     linearly over the n_ctx rows and the head_dim-long dots:
//     tol = 8 * (n_ctx + head_dim) * eps * M, M = |bias| + Σ|wo| * max|v|
//     (o_a / sum_a is a convex combination of V rows, so |o| <= max|v|).
//   end to end (CPU projections vs GPU projections): a projection's last-bit
//     difference can move a K or V element by one fp16 ulp (<= 2^-10
//     relative) in the rounding. A V move shifts the logit by at most
//     2^-10 * M; a K move shifts a score by <= 2^-10 * S (S = the largest
//     Σ_i |q_ai| |k_ai| / sqrt(d')), changing each p by a relative
//     <= 2 * 2^-10 * S, adding 2^-10 * (1 + 2 * S) * M — only for tokens
//     with such a rounding flip in their context (the test finds them). q
//     is not rounded: its difference dq moves a score by dS <= Σ|dq| |k| /
//     sqrt(d'), each p by a relative <= 2 dS, the logit by <= 2 dS M. So
//     tol_e2e = (flip ? 2^-10 (1 + 2S) : 0) M + 2 dS M + 2 tol.
//   flags: exactly the CPU's rule on the logits; against the CPU's flags
//     except where |cpu logit - threshold| < tol_e2e.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/isa.h"
#include "engine/cuda/cuda_ops.h"
#include "engine/gate.h"
#include "engine/gate_math.h"
#include "engine/ggml_types.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::engine::cuda {
namespace {

using testing::device_zeros;
using testing::to_device;
using testing::to_host;

constexpr float kEps = 1.1920929e-7f;

struct Shape {
  int64_t n_tokens, n_window, n_sink, heads, head_dim;
};

std::string name(const Shape& s) {
  return "tokens=" + std::to_string(s.n_tokens) + " window=" + std::to_string(s.n_window) +
         " sink=" + std::to_string(s.n_sink) + " h'xd'=" + std::to_string(s.heads) + "x" +
         std::to_string(s.head_dim);
}

std::vector<float> uniform(size_t n, std::mt19937& rng, float scale) {
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

GateModel random_gate(const Shape& s, int64_t n_slots, int64_t n_embd, std::mt19937& rng) {
  GateModel g;
  g.kind = GateKind::kAttention;
  g.n_embd = n_embd;
  g.n_gate_heads = s.heads;
  g.gate_head_dim = s.head_dim;
  g.n_sink_tokens = s.n_sink;
  g.n_window_tokens = s.n_window;
  const int64_t dim = g.gate_dim();
  const float ws = 2.0f / std::sqrt(static_cast<float>(n_embd));
  for (int64_t k = 0; k < n_slots; ++k) {
    GateSlot slot;
    slot.wq = uniform(static_cast<size_t>(dim * n_embd), rng, ws);
    slot.wk = uniform(static_cast<size_t>(dim * n_embd), rng, ws);
    slot.wv = uniform(static_cast<size_t>(dim * n_embd), rng, ws);
    slot.wo = uniform(static_cast<size_t>(dim), rng, 1.0f);
    slot.bias = uniform(1, rng, 0.5f)[0];
    g.slots.push_back(std::move(slot));
  }
  return g;
}

// CPU logit of token t, slot s, over the window context, reading q and the
// fp16-rounded K/V rows from proj [t][s][3D] (GatePrefill's arithmetic).
float cpu_logit(const GateModel& g, const std::vector<float>& proj, int64_t n_slots, int64_t t,
                int64_t s, std::vector<float>& scratch) {
  const int64_t dim = g.gate_dim();
  const int64_t width = 3 * dim;
  std::vector<int64_t> context;
  for (int64_t i = 0; i < std::min(g.n_sink_tokens, t + 1); ++i) context.push_back(i);
  for (int64_t i = std::max(g.n_sink_tokens, t + 1 - g.n_window_tokens); i <= t; ++i) {
    context.push_back(i);
  }
  std::vector<float> kv(context.size() * 2 * dim);
  for (size_t c = 0; c < context.size(); ++c) {
    const float* p = proj.data() + (context[c] * n_slots + s) * width + dim;
    for (int64_t e = 0; e < 2 * dim; ++e) kv[c * 2 * dim + e] = fp16_to_fp32(fp32_to_fp16(p[e]));
  }
  const float* q = proj.data() + (t * n_slots + s) * width;
  return gate_attention_logit(
      g, s, q, static_cast<int64_t>(context.size()),
      [&](int64_t c) -> const float* { return kv.data() + c * 2 * dim; }, scratch);
}

void run_shape(const Shape& sh) {
  SCOPED_TRACE(name(sh));
  constexpr int64_t kSlots = 3;
  constexpr int64_t kEmbd = 64;
  std::mt19937 rng(static_cast<unsigned>(sh.n_tokens * 131 + sh.n_window * 7 + sh.n_sink * 3 +
                                         sh.heads * 11 + sh.head_dim));
  const GateModel g = random_gate(sh, kSlots, kEmbd, rng);
  const int64_t n = sh.n_tokens;
  const int64_t dim = g.gate_dim();
  const int64_t width = 3 * dim;
  const std::vector<float> x = uniform(static_cast<size_t>(n * kEmbd), rng, 1.0f);

  auto plan = plan_gate(n, kSlots, sh.heads, sh.head_dim, sh.n_sink, sh.n_window, kEmbd);
  ASSERT_TRUE(plan.ok()) << plan.status().to_string();

  // Projections.
  std::vector<float> w;
  for (const GateSlot& s : g.slots) {
    w.insert(w.end(), s.wq.begin(), s.wq.end());
    w.insert(w.end(), s.wk.begin(), s.wk.end());
    w.insert(w.end(), s.wv.begin(), s.wv.end());
  }
  std::vector<float> wo, bias;
  for (const GateSlot& s : g.slots) {
    wo.insert(wo.end(), s.wo.begin(), s.wo.end());
    bias.push_back(s.bias);
  }
  auto w_dev = to_device(w);
  auto x_dev = to_device(x);
  auto wo_dev = to_device(wo);
  auto bias_dev = to_device(bias);
  auto proj_dev = device_zeros<float>(plan->proj_bytes / sizeof(float));
  auto logits_dev = device_zeros<float>(plan->logits_bytes / sizeof(float));
  ASSERT_TRUE(gate_project(*plan, static_cast<const float*>(w_dev.data()),
                           static_cast<const float*>(x_dev.data()),
                           static_cast<float*>(proj_dev.data()), nullptr)
                  .ok());
  ASSERT_TRUE(gate_logits_window(*plan, static_cast<const float*>(proj_dev.data()),
                                 static_cast<const float*>(wo_dev.data()),
                                 static_cast<const float*>(bias_dev.data()),
                                 static_cast<float*>(logits_dev.data()), nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto proj_gpu = to_host<float>(proj_dev, static_cast<size_t>(n * kSlots * width));
  const auto logit_gpu = to_host<float>(logits_dev, static_cast<size_t>(n * kSlots));

  std::vector<float> proj_cpu(static_cast<size_t>(n * kSlots * width));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t s = 0; s < kSlots; ++s) {
      float* out = proj_cpu.data() + (t * kSlots + s) * width;
      engine::gate_project(g, s, x.data() + t * kEmbd, out, cpu::Isa::kScalar);
      for (int64_t r = 0; r < width; ++r) {
        const std::vector<float>& m = r < dim ? g.slots[s].wq
                                      : r < 2 * dim ? g.slots[s].wk
                                                    : g.slots[s].wv;
        float mag = 0.0f;
        for (int64_t i = 0; i < kEmbd; ++i) {
          mag += std::fabs(m[(r % dim) * kEmbd + i] * x[t * kEmbd + i]);
        }
        ASSERT_NEAR(proj_gpu[(t * kSlots + s) * width + r], out[r], 2 * kEmbd * kEps * mag)
            << "t=" << t << " s=" << s << " r=" << r;
      }
    }
  }

  // Logits, kernel alone (GPU projections on both sides), and end to end.
  // Rows whose fp16 K/V differ between the CPU's and the GPU's projections
  // (a last-bit difference crossing a rounding boundary): only tokens with
  // such a row in context need the fp16-step term of tol_e2e.
  std::vector<uint8_t> row_differs(static_cast<size_t>(n * kSlots), 0);
  for (int64_t i = 0; i < n * kSlots; ++i) {
    for (int64_t e = dim; e < width; ++e) {
      if (fp32_to_fp16(proj_gpu[i * width + e]) != fp32_to_fp16(proj_cpu[i * width + e])) {
        row_differs[i] = 1;
      }
    }
  }
  std::vector<float> scratch;
  std::vector<float> logit_cpu(static_cast<size_t>(n * kSlots));
  std::vector<float> tol_e2e(static_cast<size_t>(n * kSlots));
  const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(sh.head_dim));
  for (int64_t s = 0; s < kSlots; ++s) {
    for (int64_t t = 0; t < n; ++t) {
      // M and S over this token's context (a bound over the whole prompt
      // is looser and still valid: take the prompt).
      float vmax = 0.0f, kmax = 0.0f;
      for (int64_t c = 0; c <= t; ++c) {
        const float* p = proj_gpu.data() + (c * kSlots + s) * width;
        for (int64_t e = 0; e < dim; ++e) {
          kmax = std::max(kmax, std::fabs(p[dim + e]));
          vmax = std::max(vmax, std::fabs(p[2 * dim + e]));
        }
      }
      float m = std::fabs(g.slots[s].bias);
      for (float o : g.slots[s].wo) m += std::fabs(o) * vmax;
      float sbound = 0.0f;  // S
      float dscore = 0.0f;  // largest score change from q's projection difference
      const float* q = proj_gpu.data() + (t * kSlots + s) * width;
      const float* q_cpu = proj_cpu.data() + (t * kSlots + s) * width;
      for (int64_t a = 0; a < sh.heads; ++a) {
        float qa = 0.0f, dqa = 0.0f;
        for (int64_t i = 0; i < sh.head_dim; ++i) {
          qa += std::fabs(q[a * sh.head_dim + i]);
          dqa += std::fabs(q[a * sh.head_dim + i] - q_cpu[a * sh.head_dim + i]);
        }
        sbound = std::max(sbound, qa * kmax * inv_sqrt);
        dscore = std::max(dscore, dqa * kmax * inv_sqrt);
      }
      bool flip = false;
      for (int64_t c = 0; c <= t && !flip; ++c) {
        const bool in_context = c < sh.n_sink || c >= t + 1 - sh.n_window;
        flip = in_context && row_differs[c * kSlots + s];
      }
      const int64_t n_ctx = gate_context_rows(t, sh.n_sink, sh.n_window);
      const float tol = 8.0f * static_cast<float>(n_ctx + sh.head_dim) * kEps * m;
      const float want = cpu_logit(g, proj_gpu, kSlots, t, s, scratch);
      ASSERT_NEAR(logit_gpu[s * n + t], want, tol) << "t=" << t << " s=" << s;
      logit_cpu[s * n + t] = cpu_logit(g, proj_cpu, kSlots, t, s, scratch);
      // Without a K/V rounding flip in context, only q differs: each p
      // moves by a relative <= 2 * dscore (small), so the logit by
      // <= 2 * dscore * M.
      const float flip_term = flip ? std::ldexp(1.0f, -10) * (1.0f + 2.0f * sbound) : 0.0f;
      tol_e2e[s * n + t] = (flip_term + 2.0f * dscore) * m * 1.01f + 2.0f * tol;
      ASSERT_NEAR(logit_gpu[s * n + t], logit_cpu[s * n + t], tol_e2e[s * n + t])
          << "t=" << t << " s=" << s;
    }
  }

  // Flags: thresholds at each slot's median CPU logit (mixed flags), less
  // the offset so threshold + offset is the median.
  const float offset = 0.25f;
  std::vector<float> thr(kSlots);
  for (int64_t s = 0; s < kSlots; ++s) {
    std::vector<float> v(logit_cpu.begin() + s * n, logit_cpu.begin() + (s + 1) * n);
    std::nth_element(v.begin(), v.begin() + n / 2, v.end());
    thr[s] = v[n / 2] - offset;
  }
  auto thr_dev = to_device(thr);
  auto flags_dev = device_zeros<uint8_t>(static_cast<size_t>(n * kSlots));
  ASSERT_TRUE(gate_flags(*plan, static_cast<const float*>(logits_dev.data()),
                         static_cast<const float*>(thr_dev.data()), offset,
                         static_cast<uint8_t*>(flags_dev.data()), nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto flags = to_host<uint8_t>(flags_dev, static_cast<size_t>(n * kSlots));
  int64_t compared = 0;
  for (int64_t s = 0; s < kSlots; ++s) {
    const float t_eff = thr[s] + offset;  // the CPU's fp32 sum
    for (int64_t t = 0; t < n; ++t) {
      const uint8_t on_gpu_logit = (t < sh.n_sink || logit_gpu[s * n + t] >= t_eff) ? 1 : 0;
      EXPECT_EQ(flags[s * n + t], on_gpu_logit) << "t=" << t << " s=" << s;
      // Sinks are 1 whatever the logit; other tokens near the threshold may
      // fall either side of it.
      if (t >= sh.n_sink && std::fabs(logit_cpu[s * n + t] - t_eff) < tol_e2e[s * n + t]) {
        continue;
      }
      const uint8_t cpu = (t < sh.n_sink || logit_cpu[s * n + t] >= t_eff) ? 1 : 0;
      EXPECT_EQ(flags[s * n + t], cpu) << "t=" << t << " s=" << s;
      ++compared;
    }
  }
  // With one token the median threshold sits on its logit: nothing to
  // compare away from it unless it is a sink.
  if (n > 1) {
    EXPECT_GT(compared, 0);
  }
}

TEST(CudaGate, MatchesCpuOverShapes) {
  KVGATE_REQUIRE_GPU();
  for (int64_t n : {1, 7, 300}) {
    for (int64_t window : {16, 256}) {
      for (int64_t sink : {0, 4}) {
        for (auto [h, d] : {std::pair<int64_t, int64_t>{2, 4}, {4, 8}}) {
          run_shape({n, window, sink, h, d});
          if (::testing::Test::HasFatalFailure()) return;
        }
      }
    }
  }
}

// Argument checks return before any CUDA call: runs without a device.
TEST(CudaGate, RejectsBadArguments) {
  auto plan = plan_gate(4, 2, 2, 4, 0, 16, 8);
  ASSERT_TRUE(plan.ok());
  float dummy = 0.0f;
  uint8_t flag = 0;
  Status s = gate_project(*plan, nullptr, &dummy, &dummy, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("gate weights"), std::string::npos) << s.to_string();
  s = gate_logits_window(*plan, &dummy, &dummy, nullptr, &dummy, nullptr);
  EXPECT_NE(s.message().find("gate bias"), std::string::npos) << s.to_string();
  s = gate_flags(*plan, &dummy, &dummy, NAN, &flag, nullptr);
  EXPECT_NE(s.message().find("offset"), std::string::npos) << s.to_string();
  GatePlan forged = *plan;
  forged.logit_blocks = 1000;
  s = gate_logits_window(forged, &dummy, &dummy, &dummy, &dummy, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("plan_gate"), std::string::npos) << s.to_string();
  EXPECT_EQ(gate_flags(GatePlan{}, &dummy, &dummy, 0.0f, &flag, nullptr).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::engine::cuda
