// Evaluation library (engine/eval.h): NLL arithmetic, window planning, the
// passkey generator and scorer, and perplexity through the decode path
// against per-position prefill. Tests that need the model skip without it.
#include "engine/eval.h"

#include <gtest/gtest.h>

#include "tests/unit/engine/test_model.h"

#include <cmath>
#include <filesystem>
#include <random>
#include <set>

namespace kvgate::engine {
namespace {

// ------------------------------------------------------- pure arithmetic

// The plain textbook formula, in long double, for logits small enough that
// exp() does not overflow.
double direct_nll(const std::vector<float>& logits, int32_t target) {
  long double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<long double>(l));
  return static_cast<double>(-std::log(std::exp(static_cast<long double>(logits[target])) / sum));
}

TEST(TokenNll, EqualsDirectComputation) {
  const std::vector<float> logits{0.5f, -1.25f, 3.0f, 2.75f, -7.0f, 0.0f, 11.5f};
  for (int32_t t = 0; t < static_cast<int32_t>(logits.size()); ++t) {
    EXPECT_NEAR(token_nll(logits, t), direct_nll(logits, t), 1e-12) << "target " << t;
  }
}

TEST(TokenNll, StableForHugeLogits) {
  // exp(1000) overflows a double; the shifted form does not.
  EXPECT_NEAR(token_nll(std::vector<float>{1000.0f, 1000.0f}, 0), std::log(2.0), 1e-12);
  EXPECT_NEAR(token_nll(std::vector<float>{-1000.0f, -1000.0f, -1000.0f}, 2), std::log(3.0), 1e-12);
  EXPECT_NEAR(token_nll(std::vector<float>{1e4f, 0.0f}, 1), 1e4, 1e-9);
  EXPECT_NEAR(token_nll(std::vector<float>{1e4f, 0.0f}, 0), 0.0, 1e-12);
}

TEST(TokenNll, PerplexityIsExpOfMeanNll) {
  EXPECT_NEAR(perplexity_from_nll(std::log(5.0)), 5.0, 1e-12);
  EXPECT_DOUBLE_EQ(perplexity_from_nll(0.0), 1.0);
}

TEST(PlanWindows, EvenNonOverlappingInsideDocuments) {
  const std::vector<int64_t> sizes{100, 35, 250};
  // Candidates of 30 tokens: doc 0 at 0, 30, 60; doc 1 at 0; doc 2 at 0..210: 12 in all.
  auto w = plan_windows(sizes, 30, 5);
  ASSERT_TRUE(w.ok()) << w.status().to_string();
  ASSERT_EQ(w->size(), 5u);
  std::set<std::pair<int64_t, int64_t>> seen;
  for (const auto& x : *w) {
    ASSERT_GE(x.document, 0);
    ASSERT_LT(x.document, 3);
    EXPECT_EQ(x.start % 30, 0);
    EXPECT_LE(x.start + 30, sizes[x.document]);
    EXPECT_TRUE(seen.insert({x.document, x.start}).second) << "window used twice";
  }
  // floor((i + 0.5) * 12 / 5) = 1, 3, 6, 8, 10
  EXPECT_EQ((*w)[0].document, 0);
  EXPECT_EQ((*w)[0].start, 30);
  EXPECT_EQ((*w)[1].document, 1);
  EXPECT_EQ((*w)[4].document, 2);
  EXPECT_EQ((*w)[4].start, 180);
  // Deterministic.
  auto again = plan_windows(sizes, 30, 5);
  ASSERT_TRUE(again.ok());
  for (size_t i = 0; i < w->size(); ++i) EXPECT_EQ((*again)[i].start, (*w)[i].start);

  EXPECT_EQ(plan_windows(sizes, 30, 13).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan_windows(sizes, 0, 1).status().code(), StatusCode::kInvalidArgument);
}

TEST(PasskeyScorer, AcceptsTheWholeNumberOnly) {
  EXPECT_TRUE(passkey_found("12345", "12345"));
  EXPECT_TRUE(passkey_found(" 12345.", "12345"));
  EXPECT_TRUE(passkey_found("The pass key is 12345, I think", "12345"));
  EXPECT_TRUE(passkey_found("12344 or 12345", "12345"));
  EXPECT_FALSE(passkey_found("", "12345"));
  EXPECT_FALSE(passkey_found("1234", "12345"));
  EXPECT_FALSE(passkey_found("12344", "12345"));
  EXPECT_FALSE(passkey_found("123456", "12345"));
  EXPECT_FALSE(passkey_found("912345", "12345"));
  EXPECT_FALSE(passkey_found("1 2 3 4 5", "12345"));
  EXPECT_FALSE(passkey_found("anything", ""));
}

TEST(PasskeyScorer, RandomKeysHaveFiveDigitsAndFollowTheSeed) {
  std::mt19937_64 a(7), b(7);
  for (int i = 0; i < 1000; ++i) {
    const std::string k = PasskeyGenerator::random_passkey(a);
    ASSERT_EQ(k.size(), 5u) << k;
    EXPECT_EQ(k, PasskeyGenerator::random_passkey(b));
  }
}

// ------------------------------------------------------------ with the model

#define REQUIRE_MODEL() KVGATE_REQUIRE_MODEL()

TEST(PasskeyGenerator, ExactLengthAndKeyAtDepth) {
  REQUIRE_MODEL();
  for (PasskeyFormat format : {PasskeyFormat::kChat, PasskeyFormat::kPlain}) {
    auto gen = PasskeyGenerator::create(*L->tokenizer, format);
    ASSERT_TRUE(gen.ok()) << gen.status().to_string();
    EXPECT_LT(gen->fixed_tokens(), 100) << "the task text should be a small part of a 1k prompt";
    for (int64_t len : {1024, 2048, 4096, 8192}) {
      for (double depth : {0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0}) {
        SCOPED_TRACE(std::string(passkey_format_name(format)) + " length " + std::to_string(len) +
                     " depth " + std::to_string(depth));
        auto p = gen->make(len, depth, "48213");
        ASSERT_TRUE(p.ok()) << p.status().to_string();
        EXPECT_EQ(static_cast<int64_t>(p->tokens.size()), len);
        // The key sentence is where the prompt says, once, and the question ends it.
        const std::string key_text =
            L->tokenizer->decode(std::span(p->tokens).subspan(p->key_position, 24));
        EXPECT_EQ(key_text.rfind("\n\nThe pass key is 48213. Remember it. 48213", 0), 0u)
            << key_text;
        const std::string all = L->tokenizer->decode(p->tokens, true);
        EXPECT_EQ(all.rfind("48213") - all.find("48213"),
                  std::string("48213. Remember it. ").size());
        EXPECT_EQ(all.substr(all.size() - std::string("The pass key is").size()),
                  "The pass key is");
        // The key sentence starts at the filler-sentence boundary nearest to
        // depth · length: within one sentence (<= 6 tokens) of it where that
        // lies inside the filler. Depths 0 and 1 put the key right after the
        // instruction and right before the question; that fixed text (about 40
        // tokens on each side) is under 2% of the length from 4096 tokens on.
        const double target = depth * static_cast<double>(len);
        if (depth == 0.0) {
          EXPECT_EQ(p->key_position, gen->head_tokens());
        } else if (depth == 1.0) {
          EXPECT_EQ(p->key_position, len - (gen->fixed_tokens() - gen->head_tokens()));
        } else {
          EXPECT_NEAR(static_cast<double>(p->key_position), target, 6.0);
        }
        if (len >= 4096) {
          EXPECT_NEAR(static_cast<double>(p->key_position), target, 0.02 * len);
        }
      }
    }
    EXPECT_EQ(gen->make(1024, 1.5, "12345").status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(gen->make(1024, 0.5, "12a45").status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(gen->make(1024, 0.5, "123456").status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(gen->make(gen->fixed_tokens(), 0.5, "12345").status().code(),
              StatusCode::kInvalidArgument);
  }
}

// Text of our own, so the test needs no corpus.
constexpr const char* kText =
    "The river rose slowly through the night, and by morning the lower road was under water. "
    "The farmers drove their cattle up to the high pasture, where the grass was still dry, and "
    "the children watched from the hill as the bridge disappeared beneath the brown current.";

TEST(Perplexity, DecodePathAgreesWithPrefillOfEveryPrefix) {
  REQUIRE_MODEL();
  const auto ids = L->tokenizer->encode(kText, true, false);
  const int64_t n = 16, m = 32;
  ASSERT_GE(static_cast<int64_t>(ids.size()), n + m);
  ForwardOptions fo;
  CpuForward forward(*L->model, fo);
  auto r = score_perplexity(forward, ids, {"dense", n, m});
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(static_cast<int64_t>(r->token_nll.size()), m);

  // Reference: the logits that predict token n + j from one prefill pass over
  // tokens [0, n + j) in a fresh cache (the multi-row prefill kernels only).
  const LlamaConfig& c = L->model->config();
  std::vector<float> logits(c.n_vocab);
  double ref_sum = 0, worst = 0;
  for (int64_t j = 0; j < m; ++j) {
    KvCache cache(c, n + j);
    ASSERT_TRUE(forward.prefill(cache, std::span(ids).first(n + j), logits.data()).ok());
    const double ref = token_nll(logits, ids[n + j]);
    ref_sum += ref;
    worst = std::max(worst, std::abs(ref - r->token_nll[j]));
  }
  const double ref_ppl = std::exp(ref_sum / m);
  // The decode kernel sums in a different order than the prefill kernels, and
  // Q8 activation quantization amplifies that to logit differences of up to
  // ~0.5 (tests/unit/engine/model_test.cpp). A token's NLL moves by at most
  // twice the largest logit change and usually far less; the mean over 32
  // tokens averages the noise. Measured (AVX-512): worst token 0.20 nats,
  // perplexity ratio 0.994. Bounds with ~2.5x and ~3.5x margin: every
  // token's NLL within 0.5, perplexities within 2%.
  EXPECT_LT(worst, 0.5);
  EXPECT_NEAR(r->perplexity / ref_ppl, 1.0, 2e-2)
      << "decode path " << r->perplexity << " vs prefill " << ref_ppl;
  EXPECT_NEAR(r->perplexity, std::exp(r->nll_mean), 1e-9);

  // Dense: the KV held is the dense cache of the N + M - 1 tokens fed.
  EXPECT_EQ(r->kv.kv_dense_bytes, L->model->kv_bytes_per_token() * (n + m - 1));
  EXPECT_EQ(r->kv.kv_bytes, r->kv.kv_dense_bytes);
  EXPECT_EQ(r->kv.kv_saving(), 0.0);
  EXPECT_EQ(r->kv.keep_rate, 1.0);
}

TEST(Perplexity, ClearErrors) {
  REQUIRE_MODEL();
  const auto ids = L->tokenizer->encode(kText, true, false);
  CpuForward forward(*L->model, ForwardOptions{});
  const auto n_text = static_cast<int64_t>(ids.size());
  auto too_long = score_perplexity(forward, ids, {"dense", n_text, 1});
  EXPECT_EQ(too_long.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("fewer than"), std::string::npos);
  auto past_ctx = score_perplexity(forward, ids, {"dense", 8000, 256});
  EXPECT_EQ(past_ctx.status().code(), StatusCode::kOutOfRange);
  auto policy = score_perplexity(forward, ids, {"h2o", 8, 8});
  EXPECT_EQ(policy.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(policy.status().message().find("supported: dense"), std::string::npos);
  EXPECT_EQ(score_perplexity(forward, ids, {"dense", 0, 8}).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(Perplexity, CorpusWindowsScoreTheSameTokensAtEveryContext) {
  REQUIRE_MODEL();
  CpuForward forward(*L->model, ForwardOptions{});
  const auto ids = L->tokenizer->encode(kText, true, false);
  ASSERT_GE(ids.size(), 40u);
  // Two documents of 2 and 1 slots of 40 tokens.
  std::vector<std::vector<int32_t>> docs{std::vector<int32_t>(ids.begin(), ids.end()),
                                         std::vector<int32_t>(ids.begin(), ids.begin() + 40)};
  docs[0].insert(docs[0].end(), ids.begin(), ids.end());
  auto a = score_corpus_perplexity(forward, docs, {"dense", 8, 8}, 2, 40);
  auto b = score_corpus_perplexity(forward, docs, {"dense", 24, 8}, 2, 40);
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  ASSERT_TRUE(b.ok()) << b.status().to_string();
  ASSERT_EQ(a->windows.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(a->windows[i].document, b->windows[i].document);
    EXPECT_EQ(a->windows[i].start + 16, b->windows[i].start + 32) << "same scored tokens";
    EXPECT_EQ((a->windows[i].start + 16) % 40, 0) << "windows end where their slot ends";
  }
  EXPECT_EQ(a->total.token_nll.size(), 16u);
  EXPECT_GT(a->total.perplexity, 1.0);
  EXPECT_EQ(score_corpus_perplexity(forward, docs, {"dense", 36, 8}, 2, 40).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(Passkey, DenseAnswersAShortPrompt) {
  REQUIRE_MODEL();
  CpuForward forward(*L->model, ForwardOptions{});
  PasskeyOptions o;
  o.lengths_tokens = {256};
  o.depths = {0.5};
  o.trials = 2;
  o.seed = 3;
  int64_t calls = 0;
  auto r = run_passkey(forward, *L->tokenizer, o, [&](const EvalProgress&) { ++calls; });
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(r->cells.size(), 1u);
  ASSERT_EQ(r->samples.size(), 2u);
  EXPECT_EQ(calls, 3);  // 0/2, 1/2, 2/2
  EXPECT_EQ(r->cells[0].trials, 2);
  EXPECT_EQ(r->cells[0].kv.kv_dense_bytes, L->model->kv_bytes_per_token() * 256);
  // Greedy and deterministic; the dense model finds the key at this length.
  for (const auto& s : r->samples)
    EXPECT_TRUE(s.correct) << s.passkey << " vs '" << s.answer << "'";
  EXPECT_NE(r->samples[0].passkey, r->samples[1].passkey);

  o.lengths_tokens = {9000};
  EXPECT_EQ(run_passkey(forward, *L->tokenizer, o).status().code(), StatusCode::kOutOfRange);
  o.lengths_tokens = {256};
  o.policy = "window";
  EXPECT_EQ(run_passkey(forward, *L->tokenizer, o).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::engine
