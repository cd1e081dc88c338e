#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

namespace kvgate::engine {
namespace {

TEST(Sampler, GreedyPicksArgmaxLowestIdOnTies) {
  Sampler s(SamplingParams{});
  std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(s.sample(logits, {}), 1);
  EXPECT_EQ(argmax(std::vector<float>{-5.0f, -2.0f, -3.0f}), 1);
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegative) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  Sampler s(p);
  // Token 0 (logit 4) was seen: becomes 2, so token 1 (logit 3) wins.
  std::vector<int32_t> hist = {0, 0};
  EXPECT_EQ(s.sample(std::vector<float>{4.0f, 3.0f, 1.0f}, hist), 1);
  // Negative logits are multiplied: token 0 at -1 becomes -2, token 1 (-1.5) wins.
  EXPECT_EQ(s.sample(std::vector<float>{-1.0f, -1.5f, -3.0f}, hist), 1);
}

// Empirical distribution of many draws.
std::map<int32_t, int> draw(const SamplingParams& p, const std::vector<float>& logits, int n) {
  Sampler s(p);
  std::map<int32_t, int> counts;
  for (int i = 0; i < n; ++i) counts[s.sample(logits, {})]++;
  return counts;
}

TEST(Sampler, TemperatureFollowsSoftmax) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 7;
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  auto c = draw(p, logits, 20000);
  EXPECT_NEAR(c[0] / 20000.0, 0.5, 0.02);
  EXPECT_NEAR(c[1] / 20000.0, 0.3, 0.02);
  EXPECT_NEAR(c[2] / 20000.0, 0.2, 0.02);
}

TEST(Sampler, TopKTopPMinPRestrictTheSupport) {
  const std::vector<float> logits = {std::log(0.4f), std::log(0.3f), std::log(0.2f), std::log(0.1f)};
  SamplingParams k;
  k.temperature = 1.0f;
  k.top_k = 2;
  auto ck = draw(k, logits, 5000);
  EXPECT_EQ(ck.count(2) + ck.count(3), 0u);
  EXPECT_NEAR(ck[0] / 5000.0, 0.4 / 0.7, 0.03);

  SamplingParams tp;
  tp.temperature = 1.0f;
  tp.top_p = 0.75f;  // 0.4 + 0.3 = 0.7 < 0.75, so the third token is needed too
  auto cp = draw(tp, logits, 5000);
  EXPECT_GT(cp[2], 0);
  EXPECT_EQ(cp.count(3), 0u);

  SamplingParams mp;
  mp.temperature = 1.0f;
  mp.min_p = 0.6f;  // floor 0.24: keeps 0.4 and 0.3 only
  auto cm = draw(mp, logits, 5000);
  EXPECT_EQ(cm.count(2) + cm.count(3), 0u);
  EXPECT_GT(cm[1], 0);
}

TEST(Sampler, SameSeedSameSequence) {
  SamplingParams p;
  p.temperature = 0.8f;
  p.seed = 1234;
  std::vector<float> logits(100);
  for (int i = 0; i < 100; ++i) logits[i] = std::sin(i * 0.37f) * 3;
  Sampler a(p), b(p);
  std::vector<int32_t> sa, sb;
  for (int i = 0; i < 50; ++i) {
    sa.push_back(a.sample(logits, {}));
    sb.push_back(b.sample(logits, {}));
  }
  EXPECT_EQ(sa, sb);
  p.seed = 4321;
  Sampler c(p);
  std::vector<int32_t> sc;
  for (int i = 0; i < 50; ++i) sc.push_back(c.sample(logits, {}));
  EXPECT_NE(sa, sc);
}

TEST(Sampler, ValidateNamesTheField) {
  SamplingParams p;
  p.top_p = 0.0f;
  EXPECT_NE(p.validate().message().find("top_p"), std::string::npos);
  p = {};
  p.temperature = -1.0f;
  EXPECT_NE(p.validate().message().find("temperature"), std::string::npos);
  p = {};
  p.repetition_penalty = 0.0f;
  EXPECT_FALSE(p.validate().ok());
  EXPECT_TRUE(SamplingParams{}.validate().ok());
}

TEST(StopMatcher, HoldsBackPrefixesAndCutsAtStop) {
  StopMatcher m({"END", "\n\n"});
  EXPECT_EQ(m.feed("hello E"), "hello ");
  EXPECT_EQ(m.feed("N"), "");
  EXPECT_EQ(m.feed("X more"), "ENX more");
  EXPECT_EQ(m.feed(" and\n"), " and");
  EXPECT_EQ(m.feed("\nignored"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.feed("anything"), "");
  EXPECT_EQ(m.flush(), "");
}

TEST(StopMatcher, FlushReleasesHeldText) {
  StopMatcher m({"STOP"});
  EXPECT_EQ(m.feed("abcST"), "abc");
  EXPECT_FALSE(m.stopped());
  EXPECT_EQ(m.flush(), "ST");
}

}  // namespace
}  // namespace kvgate::engine
