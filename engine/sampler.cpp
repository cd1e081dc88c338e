#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kvgate::engine {

Status SamplingParams::validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    return invalid_argument("temperature must be a finite number >= 0");
  }
  if (top_k < 0) return invalid_argument("top_k must be >= 0");
  if (!(top_p > 0.0f && top_p <= 1.0f)) return invalid_argument("top_p must be in (0, 1]");
  if (!(min_p >= 0.0f && min_p <= 1.0f)) return invalid_argument("min_p must be in [0, 1]");
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty)) {
    return invalid_argument("repetition_penalty must be a finite number > 0");
  }
  if (repetition_window < 0) return invalid_argument("repetition_window must be >= 0");
  return Status();
}

int32_t argmax(std::span<const float> logits) {
  int32_t best = 0;
  float best_v = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] > best_v) {
      best_v = logits[i];
      best = static_cast<int32_t>(i);
    }
  }
  return best;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::sample(std::span<const float> logits, std::span<const int32_t> history) {
  std::span<const float> src = logits;
  if (params_.repetition_penalty != 1.0f && params_.repetition_window > 0 && !history.empty()) {
    penalized_.assign(logits.begin(), logits.end());
    const size_t n = std::min<size_t>(history.size(), params_.repetition_window);
    // Each distinct recent token is penalized once, whatever its count.
    for (size_t i = history.size() - n; i < history.size(); ++i) {
      const int32_t id = history[i];
      if (id < 0 || static_cast<size_t>(id) >= penalized_.size()) continue;
      bool seen = false;
      for (size_t j = history.size() - n; j < i; ++j) seen |= history[j] == id;
      if (seen) continue;
      float& l = penalized_[id];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
    src = penalized_;
  }
  if (params_.temperature <= 0.0f) return argmax(src);

  cand_.resize(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    cand_[i] = {static_cast<int32_t>(i), src[i] / params_.temperature, 0.0f};
  }
  auto by_logit = [](const Candidate& a, const Candidate& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  };
  size_t n = cand_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) {
    n = params_.top_k;
    std::partial_sort(cand_.begin(), cand_.begin() + n, cand_.end(), by_logit);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  // Softmax over the kept candidates (sorted, so cand_[0] is the max).
  const float max_logit = cand_[0].logit;
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    cand_[i].p = std::exp(cand_[i].logit - max_logit);
    sum += cand_[i].p;
  }
  for (size_t i = 0; i < n; ++i) cand_[i].p = static_cast<float>(cand_[i].p / sum);

  if (params_.top_p < 1.0f) {
    double cum = 0.0;
    size_t keep = n;
    for (size_t i = 0; i < n; ++i) {
      cum += cand_[i].p;
      if (cum >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
  }
  if (params_.min_p > 0.0f) {
    const float floor_p = params_.min_p * cand_[0].p;
    size_t keep = 1;
    while (keep < n && cand_[keep].p >= floor_p) ++keep;
    n = keep;
  }
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) total += cand_[i].p;
  std::uniform_real_distribution<double> uni(0.0, total);
  double r = uni(rng_);
  for (size_t i = 0; i < n; ++i) {
    r -= cand_[i].p;
    if (r <= 0.0) return cand_[i].id;
  }
  return cand_[n - 1].id;
}

void Sampler::advance(int64_t samples) {
  if (params_.temperature <= 0.0f) return;  // greedy draws nothing
  for (int64_t i = 0; i < samples; ++i) {
    // The same distribution type consumes the engine exactly as sample() does.
    std::uniform_real_distribution<double> uni(0.0, 1.0);
    (void)uni(rng_);
  }
}

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
}

std::string StopMatcher::feed(std::string_view text) {
  if (stopped_) return {};
  pending_.append(text);
  // A complete stop string: emit what precedes the earliest one, then stop.
  size_t first = std::string::npos;
  for (const auto& s : stops_) first = std::min(first, pending_.find(s));
  if (first != std::string::npos) {
    std::string out = pending_.substr(0, first);
    pending_.clear();
    stopped_ = true;
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const auto& s : stops_) {
    const size_t max_len = std::min(s.size() - 1, pending_.size());
    for (size_t len = max_len; len > hold; --len) {
      if (pending_.compare(pending_.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StopMatcher::flush() {
  if (stopped_) return {};
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace kvgate::engine
