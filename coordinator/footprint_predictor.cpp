#include "coordinator/footprint_predictor.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <string>
#include <vector>

#include "kvstore/footprint.h"

namespace kvgate::coordinator {

Result<FootprintPredictor> FootprintPredictor::create(const engine::PolicyPlan& plan,
                                                      int64_t page_tokens, double ewma_alpha) {
  if (page_tokens < 1) {
    return invalid_argument("footprint predictor: decode.page_tokens must be >= 1, got " +
                            std::to_string(page_tokens));
  }
  if (!(ewma_alpha > 0.0 && ewma_alpha <= 1.0)) {
    return invalid_argument("footprint predictor: ewma_alpha must be in (0, 1]");
  }
  KVGATE_RETURN_IF_ERROR(kvstore::validate_layout(plan.layout));
  FootprintPredictor p;
  p.layout_ = plan.layout;
  p.policy_ = plan.config.policy;
  p.page_bytes_ = page_tokens * plan.layout.head_dim * kvstore::kKvElementBytes;
  p.ewma_alpha_ = ewma_alpha;
  using engine::KvPolicy;
  switch (plan.config.policy) {
    case KvPolicy::kDense:
    case KvPolicy::kPod:
      p.fixed_rate_ = true;
      p.prior_ = 1.0;
      break;
    case KvPolicy::kWindow:
      p.fixed_rate_ = true;
      p.prior_ = 0.0;
      break;
    case KvPolicy::kH2o:
    case KvPolicy::kSnapKv:
      p.generated_kept_ = true;
      p.prior_ = plan.config.keep_rate;
      p.budget_tokens_ = plan.config.budget_tokens;
      break;
    case KvPolicy::kGate:
    case KvPolicy::kGatePod:
      // The thresholds were calibrated to keep this share on the
      // calibration text; without a gate model the plan would have failed.
      p.prior_ = plan.config.gate ? plan.config.gate->target_keep_rate : plan.config.keep_rate;
      p.budget_tokens_ = plan.config.budget_tokens;
      break;
  }
  p.prior_ = std::clamp(p.prior_, 0.0, 1.0);
  for (Bucket& b : p.buckets_) b = Bucket{p.prior_, 0};
  // The page geometry must exist for this layout (fails early, at start-up).
  KVGATE_RETURN_IF_ERROR(kvstore::page_geometry(p.layout_, p.page_bytes_).status());
  return p;
}

int FootprintPredictor::bucket_index(int64_t prompt_tokens) {
  if (prompt_tokens < 1) return 0;
  const int k = std::bit_width(static_cast<uint64_t>(prompt_tokens)) - 1;
  return std::min(k, kBuckets - 1);
}

double FootprintPredictor::bucket_keep_rate(int64_t prompt_tokens) const {
  return buckets_[bucket_index(prompt_tokens)].keep_rate;
}

int64_t FootprintPredictor::bucket_observations(int64_t prompt_tokens) const {
  return buckets_[bucket_index(prompt_tokens)].observations;
}

double FootprintPredictor::effective_rate(double prompt_rate, int64_t prompt_tokens,
                                          int64_t final_tokens) const {
  if (!generated_kept_) return prompt_rate;
  // At the final length t the distant positions are [S, t - W); prompt
  // tokens among them keep prompt_rate, generated ones are all kept.
  const int64_t s = layout_.n_sink_tokens;
  const int64_t end = final_tokens - layout_.n_window_tokens;
  const int64_t distant_prompt = std::max<int64_t>(0, std::min(prompt_tokens, end) - s);
  const int64_t distant_generated = std::max<int64_t>(0, end - std::max(prompt_tokens, s));
  const int64_t distant = distant_prompt + distant_generated;
  if (distant == 0) return prompt_rate;
  return std::clamp(
      (prompt_rate * static_cast<double>(distant_prompt) + static_cast<double>(distant_generated)) /
          static_cast<double>(distant),
      0.0, 1.0);
}

Result<FootprintPrediction> FootprintPredictor::predict(int64_t prompt_tokens,
                                                        int64_t max_new_tokens) const {
  if (prompt_tokens < 1) return invalid_argument("footprint predictor: empty prompt");
  if (max_new_tokens < 0) return invalid_argument("footprint predictor: max_new_tokens < 0");
  FootprintPrediction out;
  out.bucket = bucket_index(prompt_tokens);
  out.dense_prompt_bytes = kvstore::dense_bytes(layout_, prompt_tokens);
  if (budget_tokens_ > 0) {
    const std::vector<int64_t> budget(static_cast<size_t>(layout_.blocks.n_slots()),
                                      budget_tokens_);
    KVGATE_ASSIGN_OR_RETURN(out.capacity_bytes,
                            kvstore::predict_capacity_bytes(layout_, page_bytes_, prompt_tokens,
                                                            max_new_tokens, budget));
    KVGATE_ASSIGN_OR_RETURN(
        out.prompt_capacity_bytes,
        kvstore::predict_capacity_bytes(layout_, page_bytes_, prompt_tokens, 0, budget));
    const int64_t distant = layout_.distant_tokens(prompt_tokens + max_new_tokens);
    out.keep_rate =
        distant > 0 ? std::min(1.0, static_cast<double>(budget_tokens_) / distant) : 1.0;
    out.exact = true;
    return out;
  }
  // Fixed-rate policies keep what the policy says whatever nodes report.
  const double prompt_rate = fixed_rate_ ? prior_ : buckets_[out.bucket].keep_rate;
  out.keep_rate = effective_rate(prompt_rate, prompt_tokens, prompt_tokens + max_new_tokens);
  out.exact = fixed_rate_;
  KVGATE_ASSIGN_OR_RETURN(out.capacity_bytes,
                          kvstore::predict_capacity_bytes(layout_, page_bytes_, prompt_tokens,
                                                          max_new_tokens, out.keep_rate));
  KVGATE_ASSIGN_OR_RETURN(
      out.prompt_capacity_bytes,
      kvstore::predict_capacity_bytes(layout_, page_bytes_, prompt_tokens, 0, prompt_rate));
  return out;
}

Status FootprintPredictor::observe(int64_t prompt_tokens, double keep_rate) {
  if (prompt_tokens < 1) {
    return invalid_argument("footprint predictor: keep-rate of an empty prompt");
  }
  if (!std::isfinite(keep_rate) || keep_rate < 0.0 || keep_rate > 1.0) {
    return invalid_argument("footprint predictor: keep_rate " + std::to_string(keep_rate) +
                            " is not in [0, 1]");
  }
  Bucket& b = buckets_[bucket_index(prompt_tokens)];
  const double weight =
      std::max(1.0 / static_cast<double>(b.observations + 2), ewma_alpha_);
  b.keep_rate += weight * (keep_rate - b.keep_rate);
  b.keep_rate = std::clamp(b.keep_rate, 0.0, 1.0);
  ++b.observations;
  return Status();
}

}  // namespace kvgate::coordinator
