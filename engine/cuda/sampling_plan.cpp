#include "engine/cuda/sampling_plan.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace kvgate::engine::cuda {

double sampling_uniform(std::mt19937_64& rng) {
  return std::generate_canonical<double, std::numeric_limits<double>::digits>(rng);
}

Status check_sample_row(const SampleRow& row) {
  if (!(row.temperature >= 0.0f) || !std::isfinite(row.temperature)) {
    return invalid_argument("sampling: temperature must be a finite number >= 0");
  }
  if (row.top_k < 0) return invalid_argument("sampling: top_k must be >= 0");
  if (!(row.top_p > 0.0f && row.top_p <= 1.0f)) {
    return invalid_argument("sampling: top_p must be in (0, 1]");
  }
  if (!(row.min_p >= 0.0f && row.min_p <= 1.0f)) {
    return invalid_argument("sampling: min_p must be in [0, 1]");
  }
  if (!(row.u >= 0.0 && row.u < 1.0)) return invalid_argument("sampling: u must be in [0, 1)");
  return Status();
}

Status check_sampling_shape(int64_t n_rows, int64_t vocab) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (n_rows < 1 || n_rows > kMax || vocab < 1 || vocab > kMax) {
    return invalid_argument("sampling: rows (" + std::to_string(n_rows) + ") and vocab (" +
                            std::to_string(vocab) + ") must be in [1, 2^31 - 1]");
  }
  return Status();
}

size_t sampling_shared_bytes() {
  // keys u64 + probabilities float per candidate, 256-bin histogram,
  // per-warp reduction scratch (doubles) and a few scalars.
  return static_cast<size_t>(kSampleMaxCandidates) * (8 + 4) + 256 * 4 +
         (kSampleThreads / kWarpSize) * 8 + 64;
}

int32_t sample_reference(std::span<const float> logits, const SampleRow& row) {
  const int64_t vocab = static_cast<int64_t>(logits.size());
  // Greedy: engine::argmax, NaN never chosen.
  if (row.temperature <= 0.0f) {
    int32_t best = 0;
    float best_v = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < vocab; ++i) {
      if (logits[i] > best_v) {
        best_v = logits[i];
        best = static_cast<int32_t>(i);
      }
    }
    return best;
  }
  struct Cand {
    int32_t id;
    float logit;
  };
  std::vector<Cand> c;
  c.reserve(vocab);
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(logits[i])) continue;
    c.push_back({static_cast<int32_t>(i), logits[i] / row.temperature});
  }
  if (c.empty()) return 0;
  std::sort(c.begin(), c.end(), [](const Cand& a, const Cand& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  });
  const int64_t n_keep = row.top_k > 0
                             ? std::min<int64_t>(row.top_k, static_cast<int64_t>(c.size()))
                             : static_cast<int64_t>(c.size());
  const float max_logit = c[0].logit;
  double sum = 0.0;
  for (int64_t i = 0; i < n_keep; ++i) sum += std::exp(c[i].logit - max_logit);
  const int64_t n_cand = std::min<int64_t>(n_keep, kSampleMaxCandidates);
  std::vector<float> p(n_cand);
  for (int64_t i = 0; i < n_cand; ++i) {
    p[i] = static_cast<float>(std::exp(c[i].logit - max_logit) / sum);
  }
  int64_t n = n_cand;
  if (row.top_p < 1.0f) {
    double cum = 0.0;
    for (int64_t i = 0; i < n_cand; ++i) {
      cum += p[i];
      if (cum >= row.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  if (row.min_p > 0.0f) {
    const float floor_p = row.min_p * p[0];
    int64_t keep = 1;
    while (keep < n && p[keep] >= floor_p) ++keep;
    n = keep;
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += p[i];
  double r = row.u * total;
  for (int64_t i = 0; i < n; ++i) {
    r -= p[i];
    if (r <= 0.0) return c[i].id;
  }
  return c[n - 1].id;
}

}  // namespace kvgate::engine::cuda
