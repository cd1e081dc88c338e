// The threshold fit (engine/threshold_fit.h): the keep-budget allocation
// against brute force and hand-worked cases, the teacher importance, and a
// fit on the real model with a random gate (skipped without the model).
#include "engine/threshold_fit.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "engine/calibrate.h"
#include "engine/gate_runtime.h"
#include "tests/unit/engine/gate_test_util.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::engine {
namespace {

double kept_value(const std::vector<std::vector<float>>& values, const std::vector<int64_t>& keep) {
  double v = 0.0;
  for (size_t s = 0; s < values.size(); ++s) {
    for (int64_t i = 0; i < keep[s]; ++i) v += values[s][i];
  }
  return v;
}

TEST(AllocateKeep, HandWorkedExample) {
  // Equal bytes: the budget of 4 tokens goes to the 4 largest values.
  const std::vector<std::vector<float>> values = {{10, 9, 8, 1, 1}, {5, 4, 0, 0, 0}};
  const std::vector<int64_t> bytes = {1, 1};
  const auto keep = allocate_keep(values, bytes, 4.0, 0.0);
  EXPECT_EQ(keep, (std::vector<int64_t>{3, 1}));
  // A floor of 40% (2 of 5) is met first, then the rest of the budget.
  const auto floored = allocate_keep(values, bytes, 5.0, 0.4);
  EXPECT_EQ(floored, (std::vector<int64_t>{3, 2}));
}

TEST(AllocateKeep, EqualBytesKeepsTheGloballyLargestValues) {
  // With non-increasing values per slot (a concave curve) and equal bytes,
  // the greedy allocation keeps exactly the K largest values overall.
  std::mt19937 rng(3);
  std::exponential_distribution<float> ex(1.0f);
  for (int trial = 0; trial < 50; ++trial) {
    const int n_slots = 1 + trial % 7;
    std::vector<std::vector<float>> values(n_slots);
    std::vector<float> all;
    for (auto& v : values) {
      const int n = 1 + static_cast<int>(rng() % 40);
      for (int i = 0; i < n; ++i) v.push_back(ex(rng) * (1 + trial % 3));
      std::sort(v.begin(), v.end(), std::greater<>());
      all.insert(all.end(), v.begin(), v.end());
    }
    std::sort(all.begin(), all.end(), std::greater<>());
    const int64_t k = static_cast<int64_t>(rng() % (all.size() + 1));
    const std::vector<int64_t> bytes(n_slots, 3);
    const auto keep = allocate_keep(values, bytes, 3.0 * k, 0.0);
    const int64_t total = std::accumulate(keep.begin(), keep.end(), int64_t{0});
    EXPECT_EQ(total, k) << "trial " << trial;
    const double best = std::accumulate(all.begin(), all.begin() + k, 0.0);
    EXPECT_NEAR(kept_value(values, keep), best, 1e-3 * (1.0 + best)) << "trial " << trial;
  }
}

TEST(AllocateKeep, NeverOverspendsAndMeetsEveryFloor) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int trial = 0; trial < 50; ++trial) {
    const int n_slots = 2 + trial % 5;
    std::vector<std::vector<float>> values(n_slots);
    std::vector<int64_t> bytes(n_slots);
    double full = 0.0;
    for (int s = 0; s < n_slots; ++s) {
      const int n = 10 + static_cast<int>(rng() % 300);
      for (int i = 0; i < n; ++i) values[s].push_back(u(rng));  // not sorted: a noisy ranking
      bytes[s] = 100 + static_cast<int64_t>(rng() % 300);
      full += static_cast<double>(n * bytes[s]);
    }
    const double budget = full * 0.3;
    const auto keep = allocate_keep(values, bytes, budget, 0.1);
    double spent = 0.0;
    for (int s = 0; s < n_slots; ++s) {
      const auto n = static_cast<int64_t>(values[s].size());
      EXPECT_GE(keep[s], static_cast<int64_t>(std::ceil(0.1 * n)));
      EXPECT_LE(keep[s], n);
      spent += static_cast<double>(keep[s] * bytes[s]);
    }
    EXPECT_LE(spent, budget) << "trial " << trial;
    // Nearly all of the budget is used (at most one hull segment short).
    EXPECT_GT(spent, budget * 0.9) << "trial " << trial;
  }
}

TEST(AllocateKeep, CheaperBytesAndWorthlessHeads) {
  // Same values, slot 1 twice as expensive: slot 0 keeps more.
  const std::vector<float> v = {8, 7, 6, 5, 4, 3, 2, 1};
  const auto keep = allocate_keep(std::vector<std::vector<float>>{v, v}, std::vector<int64_t>{1, 2}, 8.0, 0.0);
  EXPECT_GT(keep[0], keep[1]);
  EXPECT_LE(keep[0] * 1 + keep[1] * 2, 8);
  // A head whose distant tokens get no attention keeps only its floor.
  const std::vector<std::vector<float>> zero = {{0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1}};
  const auto k2 = allocate_keep(zero, std::vector<int64_t>{1, 1}, 10.0, 0.2);
  EXPECT_EQ(k2, (std::vector<int64_t>{2, 8}));
  // A value late in the ranking (a non-concave curve) is reached through the
  // hull: the budget takes the whole run up to it.
  const std::vector<std::vector<float>> late = {{0, 0, 9}, {1, 1, 1}};
  const auto k3 = allocate_keep(late, std::vector<int64_t>{1, 1}, 3.0, 0.0);
  EXPECT_EQ(k3, (std::vector<int64_t>{3, 0}));
}

TEST(TeacherImportance, MeanAttentionPerDistantQueryOverTheBlock) {
  // 2 layers, 1 KV head with 3 query heads, 10 tokens, window 4; block of
  // both layers: imp[t] = (r0[t] + r1[t]) / (n_queries(t) · 3 · 2).
  AttentionStats st;
  st.reset(2, 1, 10, 10);
  st.enable_distant(4);
  for (int64_t t = 0; t < 10; ++t) {
    st.received_distant_row(0, 0)[t] = static_cast<float>(t + 1);
    st.received_distant_row(1, 0)[t] = 2.0f;
  }
  auto map = kvstore::BlockMap::create(2, {{{0, 2}}});
  ASSERT_TRUE(map.ok());
  const auto imp = teacher_importance(st, *map, 3, 4);
  ASSERT_EQ(imp.size(), 10u);
  for (int64_t t = 0; t < 10; ++t) {
    const int64_t nq = 10 - t - 4;
    const float want = nq > 0 ? (static_cast<float>(t + 1) + 2.0f) / static_cast<float>(nq * 3 * 2) : 0.0f;
    EXPECT_FLOAT_EQ(imp[t], want) << t;
  }
}

TEST(ThresholdFitOptions, ValidateNamesTheField) {
  ThresholdFitOptions o;
  EXPECT_TRUE(o.validate().ok());
  o.min_keep_rate = 0.5;  // above the 0.3 target
  EXPECT_NE(o.validate().message().find("min_keep_rate"), std::string::npos);
  o = ThresholdFitOptions();
  o.rounds = 0;
  EXPECT_NE(o.validate().message().find("rounds"), std::string::npos);
  EXPECT_FALSE(parse_keep_allocation("greedy").ok());
  EXPECT_EQ(*parse_keep_allocation("mass"), KeepAllocation::kMass);
}

TEST(CapturedImportance, SoftmaxAttentionOfTheLastQueriesOnDistantTokens) {
  // 2 layers in one block, 1 KV head with 2 query heads, 10 tokens, sink 1,
  // window 3; queries 8 and 9 captured. Query 9 sees keys 0..9; distant are
  // [1, 7). Query 8: distant [1, 6).
  AttentionStats st;
  st.reset(2, 1, 10, 10);
  st.enable_capture(2, 8);
  ASSERT_EQ(st.n_captured(), 2);
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (float& x : st.captured) x = nd(rng);
  auto map = kvstore::BlockMap::create(2, {{{0, 2}}});
  ASSERT_TRUE(map.ok());
  const auto imp = captured_importance(st, *map, 2, 1, 3);
  std::vector<double> want(10, 0.0);
  for (int qi = 0; qi < 2; ++qi) {
    const int pos = 8 + qi;
    for (int l = 0; l < 2; ++l) {
      for (int qh = 0; qh < 2; ++qh) {
        const float* row = st.captured_row(l, qh, qi);
        double z = 0.0;
        for (int j = 0; j <= pos; ++j) z += std::exp(static_cast<double>(row[j]));
        for (int j = 1; j < pos + 1 - 3; ++j) want[j] += std::exp(static_cast<double>(row[j])) / z / (2 * 2 * 2);
      }
    }
  }
  for (int j = 0; j < 10; ++j) EXPECT_NEAR(imp[j], want[j], 1e-6) << j;
  EXPECT_EQ(imp[0], 0.0f);  // the sink
  EXPECT_EQ(imp[7], 0.0f);  // in the window of both queries
  EXPECT_GT(imp[6], 0.0f);  // distant for query 9 only
}

// ---------------------------------------------------------------- real model

std::vector<std::vector<int32_t>> book_documents(const Tokenizer& tok) {
  std::vector<std::vector<int32_t>> docs;
  const std::filesystem::path dir =
      std::filesystem::path(KVGATE_TEST_MODEL).parent_path().parent_path() / "eval-data" / "calib";
  std::ifstream in(dir / "emma.txt", std::ios::binary);
  if (!in) return docs;
  std::string text(20 * 1024, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  docs.push_back(tok.encode(text, false, false));
  return docs;
}

TEST(FitThresholds, ServedKeepRateMeetsTheTargetAndMassAllocationKeepsMore) {
  KVGATE_REQUIRE_MODEL();
  const auto docs = book_documents(*L->tokenizer);
  if (docs.empty()) GTEST_SKIP() << "no calibration texts in eval-data/calib";
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  ForwardOptions fo;
  fo.n_threads = 2;
  CpuForward fwd(*L->model, fo);

  ThresholdFitOptions opt;
  opt.sequences = 2;
  opt.tokens = 384;
  opt.target_keep_rate = 0.3;
  opt.rounds = 8;  // random gates swing harder with their retained set than calibrated ones
  opt.min_distant_queries = 16;

  // Uniform: every slot keeps the target share of its eligible tokens, as
  // the served runtime computes the flags with the fitted thresholds.
  GateModel uniform = random_gate(*fp, GateKind::kAttention, 11);
  opt.allocation = KeepAllocation::kUniform;
  ThresholdFitReport ru;
  ASSERT_TRUE(fit_thresholds(fwd, docs, uniform, opt, {}, &ru).ok());
  EXPECT_EQ(ru.tokens_seen, 2 * 384);
  EXPECT_NEAR(ru.keep_rate, 0.3, 0.03);
  ASSERT_EQ(static_cast<int64_t>(ru.slot_keep_rate.size()), uniform.blocks.n_slots());
  for (double r : ru.slot_keep_rate) EXPECT_NEAR(r, 0.3, 0.08);

  // The report's rates are those of the served runtime: recount one
  // sequence's flags from a fresh GatePrefill with the fitted thresholds.
  {
    const auto windows = shuffled_windows(docs, opt.tokens, opt.seed);
    auto layout = make_gate_layout(L->model->config(), uniform, true, uniform.n_sink_tokens,
                                   uniform.n_window_tokens);
    ASSERT_TRUE(layout.ok());
    GatePrefill gp(uniform, *layout, opt.tokens, fo.isa);
    KvCache cache(L->model->config(), opt.tokens);
    std::vector<float> logits(L->model->config().n_vocab);
    fwd.set_layer_observer(&gp);
    const Status st = fwd.prefill(
        cache, std::span<const int32_t>(docs[windows[0].document].data() + windows[0].start, opt.tokens),
        logits.data());
    fwd.set_layer_observer(nullptr);
    ASSERT_TRUE(st.ok()) << st.to_string();
    std::vector<uint8_t> flags;
    std::vector<fp16_t> rows;
    ASSERT_TRUE(gp.finish(GateDecision{}, flags, rows).ok());
    const int64_t first = uniform.n_sink_tokens;
    const int64_t last = opt.tokens - uniform.n_window_tokens - opt.min_distant_queries;
    double kept = 0.0;
    for (int64_t s = 0; s < uniform.blocks.n_slots(); ++s) {
      for (int64_t t = first; t < last; ++t) kept += flags[s * opt.tokens + t];
    }
    const double rate = kept / static_cast<double>(uniform.blocks.n_slots() * (last - first));
    EXPECT_NEAR(rate, 0.3, 0.08);
  }

  // Mass: the same bytes, more of the teacher's attention mass kept, and a
  // spread of per-slot rates with the floor respected.
  GateModel mass = random_gate(*fp, GateKind::kAttention, 11);
  opt.allocation = KeepAllocation::kMass;
  opt.min_keep_rate = 0.05;
  ThresholdFitReport rm;
  ASSERT_TRUE(fit_thresholds(fwd, docs, mass, opt, {}, &rm).ok());
  EXPECT_NEAR(rm.bytes_share, 0.3, 0.03);
  EXPECT_GT(rm.mass_kept, ru.mass_kept);
  const auto [lo, hi] = std::minmax_element(rm.slot_keep_rate.begin(), rm.slot_keep_rate.end());
  EXPECT_GE(*lo, 0.05 - 0.03);
  EXPECT_GT(*hi - *lo, 0.2);
  std::printf("uniform: keep %.3f mass %.3f; mass: keep %.3f bytes %.3f mass %.3f (slot rates %.2f-%.2f)\n",
              ru.keep_rate, ru.mass_kept, rm.keep_rate, rm.bytes_share, rm.mass_kept, *lo, *hi);

  // Probes join the fit: their tokens are counted, and one too short for
  // its window and queries is named.
  opt.probes = {std::vector<int32_t>(docs[0].begin() + 1000, docs[0].begin() + 1200)};
  opt.probe_queries = 8;
  GateModel probed = random_gate(*fp, GateKind::kAttention, 11);
  ThresholdFitReport rp;
  ASSERT_TRUE(fit_thresholds(fwd, docs, probed, opt, {}, &rp).ok());
  EXPECT_EQ(rp.tokens_seen, 2 * 384 + 200);
  EXPECT_NEAR(rp.bytes_share, 0.3, 0.03);
  opt.probes = {std::vector<int32_t>(docs[0].begin(), docs[0].begin() + 20)};
  const Status short_probe = fit_thresholds(fwd, docs, probed, opt);
  EXPECT_EQ(short_probe.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(short_probe.message().find("retrieval probe 0"), std::string::npos) << short_probe.to_string();
  opt.probes.clear();

  // Errors name the problem.
  opt.tokens = 4096;  // longer than the text
  GateModel g = random_gate(*fp, GateKind::kAttention, 11);
  const Status st = fit_thresholds(fwd, docs, g, opt);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("windows"), std::string::npos) << st.to_string();
}

}  // namespace
}  // namespace kvgate::engine
