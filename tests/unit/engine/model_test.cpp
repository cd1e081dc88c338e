// The engine against llama.cpp (golden file made by tools/make_golden_generate.py)
// and against itself across batching, chunking and instruction sets.
#include "engine/model.h"

#include <gtest/gtest.h>

#include "tests/unit/engine/test_model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/chat_template.h"
#include "engine/generate.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"

namespace kvgate::engine {
namespace {

// Tolerances against llama.cpp.
//
// Both engines quantize activations to Q8_0/Q8_1 and keep K/V in fp16, and
// they differ in float summation order, expf/sinf/cosf and kernel tiling.
// Those ~1e-7 relative differences are amplified: an activation within one
// rounding step of a Q8 boundary flips by a whole quantum (amax/127), and
// across 30 layers such flips move logits by tenths. Measured on the golden
// prompts' first step against an exact float64 forward pass of the same
// weights (tools/reference_forward.py): llama.cpp is 0.09-0.41 away from it,
// kvgate 0.05-0.53 -- the same noise floor. Our own scalar and AVX-512
// kernels differ from each other by the same order. Hence:
// - logits agree within 1.2 (about 3x the largest llama.cpp-vs-exact
//   distance), for logits of magnitude 10-30;
// - where llama.cpp's own top-2 margin is below 0.5 (more than its distance
//   from the exact result), the greedy choice is decided by rounding, not by
//   the model; there llama.cpp's runner-up is accepted.
constexpr float kLogitTolerance = 1.2f;
constexpr float kTieMargin = 0.5f;

using Loaded = testing::TestModel;
#define REQUIRE_MODEL() KVGATE_REQUIRE_MODEL()

nlohmann::json golden() {
  std::ifstream in(std::string(KVGATE_TEST_DATA) + "/golden_generate.json");
  return nlohmann::json::parse(in);
}

TEST(LlamaConfig, ReadsSmolLM2Hyperparameters) {
  REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.n_embd, 576);
  EXPECT_EQ(c.n_ff, 1536);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.n_vocab, 49152);
  EXPECT_FLOAT_EQ(c.rope_freq_base, 100000.0f);
  EXPECT_EQ(L->model->kv_bytes_per_token(), 2 * 30 * 192 * 2);
}

// Greedy continuation and top-5 logits at every step against llama.cpp,
// teacher-forced with llama.cpp's tokens so every step of every prompt is
// compared even after a near-tie.
TEST(Golden, GreedyTokensAndLogitsMatchLlamaCpp) {
  REQUIRE_MODEL();
  const auto g = golden();
  CpuForward fwd(*L->model, ForwardOptions{});
  const int64_t vocab = L->model->config().n_vocab;
  std::vector<float> logits(vocab);
  float worst = 0.0f;
  int steps_total = 0, steps_equal = 0, near_ties = 0;
  for (const auto& c : g["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const std::vector<int32_t> prompt = c["prompt_ids"];
    // Our tokenizer must agree with llama.cpp's on the prompt too.
    EXPECT_EQ(L->tokenizer->encode(c["prompt"].get<std::string>(), false, true), prompt);
    const auto& steps = c["steps"];
    ASSERT_GE(steps.size(), 32u);
    KvCache cache(L->model->config(), static_cast<int64_t>(prompt.size() + steps.size()));
    ASSERT_TRUE(fwd.prefill(cache, prompt, logits.data()).ok());
    for (size_t s = 0; s < steps.size(); ++s) {
      const int32_t want = steps[s]["token"];
      const auto& ids = steps[s]["top5_ids"];
      const auto& ref = steps[s]["top5_logits"];
      const int32_t got = argmax(logits);
      ++steps_total;
      if (got == want) {
        ++steps_equal;
      } else {
        const float margin = ref[0].get<float>() - ref[1].get<float>();
        ++near_ties;
        EXPECT_LT(margin, kTieMargin) << "greedy token differs at step " << s << ": got " << got
                                      << ", llama.cpp " << want << " by a margin of " << margin;
        EXPECT_EQ(got, ids[1].get<int32_t>()) << "step " << s;
      }
      for (size_t k = 0; k < ids.size(); ++k) {
        const float diff = std::fabs(logits[ids[k].get<int32_t>()] - ref[k].get<float>());
        worst = std::max(worst, diff);
        EXPECT_LE(diff, kLogitTolerance) << "step " << s << " rank " << k;
      }
      BatchItem item{&cache, std::span<const int32_t>(&want, 1), true};
      ASSERT_TRUE(fwd.forward(std::span<const BatchItem>(&item, 1), logits.data()).ok());
    }
  }
  std::printf("golden: %d/%d greedy steps identical, %d near-ties (llama.cpp margin < %.2f), "
              "max |logit - llama.cpp| %.4f\n",
              steps_equal, steps_total, near_ties, kTieMargin, worst);
}

// Free-running greedy generation equals llama.cpp's for at least 32 tokens,
// unless llama.cpp itself had a near-tie earlier (then up to that step).
TEST(Golden, FreeRunningGreedyMatchesLlamaCpp) {
  REQUIRE_MODEL();
  const auto g = golden();
  CpuForward fwd(*L->model, ForwardOptions{});
  for (const auto& c : g["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const std::vector<int32_t> prompt = c["prompt_ids"];
    const auto& steps = c["steps"];
    size_t must_match = 32;
    for (size_t s = 0; s < 32; ++s) {
      const auto& ref = steps[s]["top5_logits"];
      if (ref[0].get<float>() - ref[1].get<float>() < kTieMargin) {
        must_match = s;
        break;
      }
    }
    GenerateOptions o;
    o.max_tokens = static_cast<int32_t>(must_match);
    o.ignore_eos = true;
    auto r = generate(fwd, *L->tokenizer, prompt, o);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    for (size_t s = 0; s < must_match; ++s) {
      ASSERT_EQ(r->tokens[s], steps[s]["token"].get<int32_t>()) << "step " << s;
    }
    std::printf("%-14s free-running greedy identical for %zu steps\n",
                c["name"].get<std::string>().c_str(), must_match);
  }
}

// Several sequences of different lengths in one step give the same logits as
// each sequence alone.
TEST(Forward, BatchedDecodeEqualsSeparate) {
  REQUIRE_MODEL();
  const auto& c = L->model->config();
  CpuForward fwd(*L->model, ForwardOptions{});
  const std::vector<std::string> texts = {"The quick brown fox", "In 1492, Columbus sailed",
                                          "Water boils at a temperature of one hundred degrees"};
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& t : texts) prompts.push_back(L->tokenizer->encode(t, false, false));
  ASSERT_NE(prompts[0].size(), prompts[2].size());
  const std::vector<int32_t> next = {11, 257, 1012};

  std::vector<float> alone(3 * c.n_vocab), batched(3 * c.n_vocab), tmp(c.n_vocab);
  for (int i = 0; i < 3; ++i) {
    KvCache cache(c, 64);
    ASSERT_TRUE(fwd.prefill(cache, prompts[i], tmp.data()).ok());
    BatchItem it{&cache, std::span<const int32_t>(&next[i], 1), true};
    ASSERT_TRUE(fwd.forward(std::span<const BatchItem>(&it, 1), alone.data() + i * c.n_vocab).ok());
  }
  std::vector<std::unique_ptr<KvCache>> caches;
  for (int i = 0; i < 3; ++i) {
    caches.push_back(std::make_unique<KvCache>(c, 64));
    ASSERT_TRUE(fwd.prefill(*caches[i], prompts[i], tmp.data()).ok());
  }
  std::vector<BatchItem> items;
  for (int i = 0; i < 3; ++i) items.push_back({caches[i].get(), std::span<const int32_t>(&next[i], 1), true});
  ASSERT_TRUE(fwd.forward(items, batched.data()).ok());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(caches[i]->n_tokens(), static_cast<int64_t>(prompts[i].size() + 1));
    float worst = 0;
    for (int64_t v = 0; v < c.n_vocab; ++v) {
      worst = std::max(worst, std::fabs(alone[i * c.n_vocab + v] - batched[i * c.n_vocab + v]));
    }
    // Same integer dots; only the matmul's float summation tiling may differ.
    EXPECT_LT(worst, 1e-2f) << "sequence " << i;
    EXPECT_EQ(argmax({alone.data() + i * c.n_vocab, (size_t)c.n_vocab}),
              argmax({batched.data() + i * c.n_vocab, (size_t)c.n_vocab}));
  }
}

// Prefill in chunks equals prefill in one step. Chunks of more than 4 tokens
// run the same prefill kernel as the whole prompt, whose per-output summation
// order does not depend on the token count: equal to float rounding. Chunks of
// 3 run the decode kernel (a different summation order): equal to the noise
// floor described above, with the same greedy token.
TEST(Forward, ChunkedPrefillEqualsWholePrefill) {
  REQUIRE_MODEL();
  const auto& c = L->model->config();
  const auto prompt = L->tokenizer->encode(
      "Chunked prefill must give the same result as a single pass over the whole prompt, "
      "because attention is causal and the cache holds every earlier token.", false, false);
  ASSERT_GT(prompt.size(), 20u);
  auto run = [&](int64_t chunk) {
    std::vector<float> logits(c.n_vocab);
    ForwardOptions fo;
    fo.max_batch_tokens = chunk;
    CpuForward fwd(*L->model, fo);
    KvCache cache(c, 128);
    EXPECT_TRUE(fwd.prefill(cache, prompt, logits.data()).ok());
    EXPECT_EQ(cache.n_tokens(), static_cast<int64_t>(prompt.size()));
    return logits;
  };
  const auto whole = run(512);
  auto max_diff = [&](const std::vector<float>& other) {
    float worst = 0;
    for (int64_t v = 0; v < c.n_vocab; ++v) worst = std::max(worst, std::fabs(whole[v] - other[v]));
    return worst;
  };
  const auto by8 = run(8);
  EXPECT_LT(max_diff(by8), 1e-3f);
  EXPECT_EQ(argmax(whole), argmax(by8));
  const auto by3 = run(3);
  EXPECT_LT(max_diff(by3), kLogitTolerance);
  EXPECT_EQ(argmax(whole), argmax(by3));
}

// The scalar reference mode and the SIMD kernels agree end to end.
TEST(Forward, ScalarReferenceAgreesWithSimd) {
  REQUIRE_MODEL();
  const auto& c = L->model->config();
  const auto prompt = L->tokenizer->encode("The three primary colors are", false, false);
  std::vector<float> ref(c.n_vocab), fast(c.n_vocab);
  ForwardOptions scalar;
  scalar.isa = cpu::Isa::kScalar;
  CpuForward a(*L->model, scalar), b(*L->model, ForwardOptions{});
  KvCache ca(c, 64), cb(c, 64);
  ASSERT_TRUE(a.prefill(ca, prompt, ref.data()).ok());
  ASSERT_TRUE(b.prefill(cb, prompt, fast.data()).ok());
  float worst = 0;
  for (int64_t v = 0; v < c.n_vocab; ++v) worst = std::max(worst, std::fabs(ref[v] - fast[v]));
  EXPECT_LT(worst, kLogitTolerance);
  EXPECT_EQ(argmax(ref), argmax(fast));
}

TEST(Forward, RejectsBadTokensAndFullCache) {
  REQUIRE_MODEL();
  const auto& c = L->model->config();
  CpuForward fwd(*L->model, ForwardOptions{});
  std::vector<float> logits(c.n_vocab);
  KvCache cache(c, 4);
  const std::vector<int32_t> bad = {1, 49152};
  auto s = fwd.prefill(cache, bad, logits.data());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("49152"), std::string::npos);
  EXPECT_EQ(cache.n_tokens(), 0);
  const std::vector<int32_t> five = {1, 2, 3, 4, 5};
  EXPECT_EQ(fwd.prefill(cache, five, logits.data()).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(fwd.prefill(cache, std::vector<int32_t>{}, logits.data()).code(),
            StatusCode::kInvalidArgument);
}

// A copy of the model file with bytes patched in memory.
std::vector<uint8_t> patched_model(const std::string& from, const std::string& to) {
  std::ifstream in(KVGATE_TEST_MODEL, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto it = std::search(bytes.begin(), bytes.end(), from.begin(), from.end());
  EXPECT_NE(it, bytes.end());
  std::copy(to.begin(), to.end(), it);
  return bytes;
}

TEST(LlamaModel, UnsupportedArchitectureAndMissingTensorAreClearErrors) {
  REQUIRE_MODEL();
  {
    // The architecture value follows its key; "llama" -> "gemma".
    auto bytes = patched_model(std::string("general.architecture") + std::string("\x08\x00\x00\x00", 4) +
                                   std::string("\x05\x00\x00\x00\x00\x00\x00\x00", 8) + "llama",
                               std::string("general.architecture") + std::string("\x08\x00\x00\x00", 4) +
                                   std::string("\x05\x00\x00\x00\x00\x00\x00\x00", 8) + "gemma");
    auto f = GgufFile::from_memory(bytes.data(), bytes.size());
    ASSERT_TRUE(f.ok()) << f.status().to_string();
    auto m = LlamaModel::from_gguf(std::move(*f));
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), StatusCode::kUnimplemented);
    EXPECT_NE(m.status().message().find("gemma"), std::string::npos);
  }
  {
    auto bytes = patched_model("output_norm.weight", "output_norX.weight");
    auto f = GgufFile::from_memory(bytes.data(), bytes.size());
    ASSERT_TRUE(f.ok()) << f.status().to_string();
    auto m = LlamaModel::from_gguf(std::move(*f));
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
    EXPECT_NE(m.status().message().find("output_norm.weight"), std::string::npos);
  }
}

TEST(Generate, StopsAtMaxTokensStopStringAndEos) {
  REQUIRE_MODEL();
  CpuForward fwd(*L->model, ForwardOptions{});
  const auto prompt = L->tokenizer->encode("1, 2, 3, 4, 5, 6,", false, false);
  GenerateOptions o;
  o.max_tokens = 6;
  auto r = generate(fwd, *L->tokenizer, prompt, o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->tokens.size(), 6u);
  EXPECT_EQ(r->finish_reason, "length");
  EXPECT_EQ(r->text, L->tokenizer->decode(r->tokens));
  EXPECT_EQ(r->prompt_tokens, static_cast<int64_t>(prompt.size()));

  // Stop at " 9": the text must end before it and generation must stop.
  o.max_tokens = 20;
  o.stop = {" 9"};
  std::string streamed;
  auto s = generate(fwd, *L->tokenizer, prompt, o, [&](std::string_view t) { streamed += t; });
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->finish_reason, "stop");
  EXPECT_EQ(s->text, " 7, 8,");
  EXPECT_EQ(streamed, s->text);

  // A chat reply ends with an end-of-generation token unless told to ignore it.
  std::vector<ChatMessage> msgs = {{"user", "Say hello."}};
  auto chat = apply_chat_template(*L->tokenizer, msgs, true);
  ASSERT_TRUE(chat.ok());
  const auto chat_ids = L->tokenizer->encode(*chat, false, true);
  GenerateOptions co;
  co.max_tokens = 200;
  auto cr = generate(fwd, *L->tokenizer, chat_ids, co);
  ASSERT_TRUE(cr.ok());
  EXPECT_EQ(cr->finish_reason, "stop");
  EXPECT_LT(cr->tokens.size(), 200u);
  for (int32_t t : cr->tokens) EXPECT_FALSE(L->tokenizer->is_eog(t));
}

}  // namespace
}  // namespace kvgate::engine
