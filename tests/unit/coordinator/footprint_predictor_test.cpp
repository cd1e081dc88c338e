// FootprintPredictor: priors per policy, the bucketed running keep-rate,
// exact budget mode, and equality with kvstore's page-granular prediction.
#include "coordinator/footprint_predictor.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kvstore/footprint.h"
#include "tests/unit/coordinator/cluster_test_util.h"

namespace kvgate::coordinator {
namespace {

using engine::KvPolicy;
using testing::small_plan;
using testing::small_policy;

constexpr int64_t kPageTokens = 4;
constexpr int64_t kPageBytes = kPageTokens * 8 * 2;  // head_dim 8, fp16

FootprintPredictor make(const engine::KvPolicyConfig& policy) {
  auto plan = small_plan(policy);
  EXPECT_NE(plan, nullptr);
  auto p = FootprintPredictor::create(*plan, kPageTokens);
  EXPECT_TRUE(p.ok()) << p.status().to_string();
  return std::move(*p);
}

TEST(FootprintPredictor, BucketsArePowersOfTwo) {
  EXPECT_EQ(FootprintPredictor::bucket_index(1), 0);
  EXPECT_EQ(FootprintPredictor::bucket_index(2), 1);
  EXPECT_EQ(FootprintPredictor::bucket_index(3), 1);
  EXPECT_EQ(FootprintPredictor::bucket_index(4), 2);
  EXPECT_EQ(FootprintPredictor::bucket_index(1023), 9);
  EXPECT_EQ(FootprintPredictor::bucket_index(1024), 10);
  EXPECT_EQ(FootprintPredictor::bucket_index(int64_t{1} << 40), FootprintPredictor::kBuckets - 1);
}

TEST(FootprintPredictor, PriorsPerPolicy) {
  EXPECT_DOUBLE_EQ(make(small_policy(KvPolicy::kDense)).prior_keep_rate(), 1.0);
  EXPECT_DOUBLE_EQ(make(small_policy(KvPolicy::kPod)).prior_keep_rate(), 1.0);
  EXPECT_DOUBLE_EQ(make(small_policy(KvPolicy::kWindow)).prior_keep_rate(), 0.0);
  EXPECT_DOUBLE_EQ(make(small_policy(KvPolicy::kH2o, 0.25)).prior_keep_rate(), 0.25);
  EXPECT_DOUBLE_EQ(make(small_policy(KvPolicy::kSnapKv, 0.4)).prior_keep_rate(), 0.4);
}

TEST(FootprintPredictor, EqualsKvstorePredictionForFixedPolicies) {
  for (KvPolicy policy : {KvPolicy::kDense, KvPolicy::kPod, KvPolicy::kWindow}) {
    auto plan = small_plan(small_policy(policy));
    auto p = make(small_policy(policy));
    const double rate = policy == KvPolicy::kWindow ? 0.0 : 1.0;
    for (int64_t prompt : {1, 7, 30, 100, 1000}) {
      auto got = p.predict(prompt, 50);
      ASSERT_TRUE(got.ok());
      auto want = kvstore::predict_capacity_bytes(plan->layout, kPageBytes, prompt, 50, rate);
      ASSERT_TRUE(want.ok());
      EXPECT_EQ(got->capacity_bytes, *want) << engine::kv_policy_name(policy) << " " << prompt;
      EXPECT_EQ(got->prompt_capacity_bytes,
                *kvstore::predict_capacity_bytes(plan->layout, kPageBytes, prompt, 0, rate));
      EXPECT_EQ(got->dense_prompt_bytes, kvstore::dense_bytes(plan->layout, prompt));
      EXPECT_TRUE(got->exact);
    }
    // Reports do not move a fixed policy's prediction.
    const int64_t before = p.predict(100, 50)->capacity_bytes;
    ASSERT_TRUE(p.observe(100, 0.5).ok());
    EXPECT_EQ(p.predict(100, 50)->capacity_bytes, before);
  }
  // Page granularity: the dense prediction is whole pages and at least the
  // exact footprint.
  auto plan = small_plan(small_policy(KvPolicy::kDense));
  auto p = make(small_policy(KvPolicy::kDense));
  const int64_t cap = p.predict(33, 7)->capacity_bytes;
  EXPECT_EQ(cap % kPageBytes, 0);
  EXPECT_GE(cap, *kvstore::predict_bytes(plan->layout, 33, 7, 1.0));
}

TEST(FootprintPredictor, RunningKeepRatePerBucket) {
  auto p = make(small_policy(KvPolicy::kH2o, 0.3));
  // Prior counts as one observation: 0.3 and 0.5 average to 0.4.
  ASSERT_TRUE(p.observe(100, 0.5).ok());
  EXPECT_NEAR(p.bucket_keep_rate(100), 0.4, 1e-12);
  EXPECT_EQ(p.bucket_observations(100), 1);
  // Same bucket [64, 128): weight 1/3 -> 0.4 + (0.7 - 0.4) / 3 = 0.5.
  ASSERT_TRUE(p.observe(64, 0.7).ok());
  EXPECT_NEAR(p.bucket_keep_rate(127), 0.5, 1e-12);
  // Other buckets keep the prior.
  EXPECT_DOUBLE_EQ(p.bucket_keep_rate(128), 0.3);
  EXPECT_DOUBLE_EQ(p.bucket_keep_rate(63), 0.3);
  // After many observations the weight bottoms out at alpha = 0.1 (EWMA).
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(p.observe(100, 0.2).ok());
  const double settled = p.bucket_keep_rate(100);
  EXPECT_NEAR(settled, 0.2, 0.01);
  ASSERT_TRUE(p.observe(100, 1.0).ok());
  EXPECT_NEAR(p.bucket_keep_rate(100), settled + 0.1 * (1.0 - settled), 1e-12);
  // Peer values outside [0, 1] are refused and change nothing.
  const double now = p.bucket_keep_rate(100);
  EXPECT_EQ(p.observe(100, 1.5).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(p.observe(100, -0.1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(p.observe(100, std::nan("")).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(p.observe(0, 0.5).code(), StatusCode::kInvalidArgument);
  EXPECT_DOUBLE_EQ(p.bucket_keep_rate(100), now);
}

TEST(FootprintPredictor, KeepRatePolicyUsesBucketRateAndKeepsGeneratedTokens) {
  auto plan = small_plan(small_policy(KvPolicy::kH2o, 0.3));
  auto p = make(small_policy(KvPolicy::kH2o, 0.3));
  ASSERT_TRUE(p.observe(200, 0.5).ok());  // bucket [128, 256) now 0.4
  const int64_t prompt = 200, max_new = 100;
  auto got = p.predict(prompt, max_new);
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(got->exact);
  // At t = 300 with 2 sinks and a window of 8: distant = [2, 292);
  // prompt tokens 2..199 (198) keep 0.4, generated 200..291 (92) are kept.
  const double effective = (0.4 * 198 + 92) / 290;
  EXPECT_NEAR(got->keep_rate, effective, 1e-12);
  EXPECT_EQ(got->capacity_bytes, *kvstore::predict_capacity_bytes(plan->layout, kPageBytes, prompt,
                                                                   max_new, got->keep_rate));
  // At the prompt's length only the prompt rate applies.
  EXPECT_EQ(got->prompt_capacity_bytes,
            *kvstore::predict_capacity_bytes(plan->layout, kPageBytes, prompt, 0, 0.4));
  // A higher keep-rate predicts more bytes.
  ASSERT_TRUE(p.observe(200, 1.0).ok());
  EXPECT_GT(p.predict(prompt, max_new)->capacity_bytes, got->capacity_bytes);
}

TEST(FootprintPredictor, BudgetModeIsExact) {
  auto policy = small_policy(KvPolicy::kSnapKv, 0.3);
  policy.budget_tokens = 16;
  auto plan = small_plan(policy);
  auto p = make(policy);
  EXPECT_TRUE(p.budget_mode());
  const std::vector<int64_t> budget(static_cast<size_t>(plan->layout.blocks.n_slots()), 16);
  for (int64_t prompt : {5, 20, 300}) {
    auto got = p.predict(prompt, 40);
    ASSERT_TRUE(got.ok());
    EXPECT_TRUE(got->exact);
    EXPECT_EQ(got->capacity_bytes,
              *kvstore::predict_capacity_bytes(plan->layout, kPageBytes, prompt, 40, budget));
  }
  // Observations do not change an exact prediction.
  const int64_t before = p.predict(300, 40)->capacity_bytes;
  ASSERT_TRUE(p.observe(300, 0.9).ok());
  EXPECT_EQ(p.predict(300, 40)->capacity_bytes, before);
}

TEST(FootprintPredictor, RejectsBadArguments) {
  auto plan = small_plan(small_policy(KvPolicy::kDense));
  EXPECT_EQ(FootprintPredictor::create(*plan, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(FootprintPredictor::create(*plan, 4, 0.0).status().code(),
            StatusCode::kInvalidArgument);
  auto p = make(small_policy(KvPolicy::kDense));
  EXPECT_EQ(p.predict(0, 10).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(p.predict(10, -1).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::coordinator
