// `kvgate bench prefill` as a user runs it, with tiny settings: the JSON
// report's shape, the batching identity check, the overlap transfer over
// the loopback transport, and one-line usage errors. Never the speed.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "tests/integration/cli_run.h"

namespace {

using kvgate::testing::CliRun;

CliRun run(const std::string& args) { return kvgate::testing::run_cli(args); }
size_t lines(const std::string& s) { return kvgate::testing::count_lines(s); }

// A directory with enough English text for the prompts, so the test does
// not depend on eval-data being fetched.
std::string text_dir() {
  const std::string dir =
      testing::TempDir() + "kvgate_bench_prefill_text_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  std::ofstream out(dir + "/text.txt");
  for (int i = 0; i < 40; ++i) {
    out << "Paragraph " << i
        << ". The harbour town woke slowly; fishermen mended their nets, the baker opened early, "
           "and "
           "the tide carried gulls over the grey water while the bell of the old church counted "
           "the "
           "hours for anyone who cared to listen.\n";
  }
  return dir;
}

TEST(BenchPrefill, TinyRunReportsEveryFigureAndIdenticalResults) {
  if (!std::filesystem::exists(KVGATE_TEST_MODEL))
    GTEST_SKIP() << "model not found (run scripts/fetch-model.sh)";
  const std::string dir = text_dir();
  const CliRun r =
      run(std::string("bench prefill --model ") + KVGATE_TEST_MODEL + " --text-dir " + dir +
          " --prompts 2 --prompt-tokens 32 --batch 1,2 --overlap-tokens 64 --repeat 1"
          " --transport loopback --page-tokens 16 --json");
  std::filesystem::remove_all(dir);
  ASSERT_EQ(r.code, 0) << r.err;
  // Progress on stderr while it runs: one line per measured run at least.
  EXPECT_NE(r.err.find("bench prefill: batch 1, run 1/1"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("bench prefill: batch 2, run 1/1"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("overlap: overlapped"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("overlap: after"), std::string::npos) << r.err;

  const auto j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  // The model's gate side file sits next to it: the default is gate+pod.
  const bool has_gate = std::filesystem::exists(
      std::string(KVGATE_TEST_MODEL).substr(0, std::string(KVGATE_TEST_MODEL).size() - 5) +
      ".gate.gguf");
  EXPECT_EQ(j["policy"], has_gate ? "gate+pod" : "dense");
  EXPECT_EQ(j["page_tokens"], 16);
  EXPECT_EQ(j["repeat"], 1);
  EXPECT_GE(j["threads"].get<int>(), 1);

  const auto& b = j["batching"];
  EXPECT_EQ(b["prompts"], 2);
  EXPECT_EQ(b["prompt_tokens"], 32);
  EXPECT_EQ(b["identical"], true);
  ASSERT_EQ(b["rows"].size(), 2u);
  EXPECT_EQ(b["rows"][0]["batch"], 1);
  EXPECT_EQ(b["rows"][1]["batch"], 2);
  for (const auto& row : b["rows"]) {
    EXPECT_GT(row["seconds"].get<double>(), 0.0);
    // tokens/s is the 64 prompt tokens over the best run's seconds.
    EXPECT_NEAR(row["tokens_per_s"].get<double>() * row["seconds"].get<double>(), 64.0, 1e-6);
  }
  EXPECT_DOUBLE_EQ(b["rows"][0]["vs_batch_1"].get<double>(), 1.0);
  EXPECT_NEAR(
      b["rows"][1]["vs_batch_1"].get<double>(),
      b["rows"][1]["tokens_per_s"].get<double>() / b["rows"][0]["tokens_per_s"].get<double>(),
      1e-9);

  ASSERT_TRUE(j.contains("overlap")) << r.out;
  const auto& o = j["overlap"];
  EXPECT_EQ(o["transport"], "loopback");
  EXPECT_EQ(o["prompt_tokens"], 64);
  EXPECT_EQ(o["identical"], true);
  // Whole pages of 16 tokens x 64 dims x 2 bytes, shipped block by block.
  EXPECT_GT(o["image_bytes"].get<int64_t>(), 0);
  EXPECT_EQ(o["image_bytes"].get<int64_t>() % 2048, 0);
  EXPECT_GE(o["segments"].get<int64_t>(), 2);
  for (const char* mode : {"overlapped", "after"}) {
    const auto& m = o[mode];
    EXPECT_GT(m["prefill_seconds"].get<double>(), 0.0) << mode;
    EXPECT_GE(m["exposed_transfer_seconds"].get<double>(), 0.0) << mode;
    EXPECT_NEAR(m["total_seconds"].get<double>(),
                m["prefill_seconds"].get<double>() + m["exposed_transfer_seconds"].get<double>(),
                1e-9)
        << mode;
  }
  EXPECT_NEAR(
      o["total_vs_after"].get<double>(),
      o["overlapped"]["total_seconds"].get<double>() / o["after"]["total_seconds"].get<double>(),
      1e-9);
}

TEST(BenchPrefill, BadOptionsAreOneClearLine) {
  // Checked before the model loads: no model needed.
  const CliRun batch = run("bench prefill --batch 1,0");
  EXPECT_EQ(batch.code, 2);
  EXPECT_NE(batch.err.find("--batch"), std::string::npos) << batch.err;
  EXPECT_EQ(lines(batch.err), 1u) << batch.err;

  const CliRun policy = run("bench prefill --policy nonsense");
  EXPECT_EQ(policy.code, 2);
  EXPECT_NE(policy.err.find("nonsense"), std::string::npos) << policy.err;
  EXPECT_EQ(lines(policy.err), 1u) << policy.err;

  const CliRun transport = run("bench prefill --transport carrier-pigeon");
  EXPECT_EQ(transport.code, 2);
  EXPECT_NE(transport.err.find("--transport"), std::string::npos) << transport.err;
  EXPECT_EQ(lines(transport.err), 1u) << transport.err;

  const CliRun help = run("bench prefill --help");
  EXPECT_EQ(help.code, 0);
  for (const char* opt : {"--prompts", "--prompt-tokens", "--batch", "--overlap-tokens", "--repeat",
                          "--policy", "--transport", "--tls", "--json"}) {
    EXPECT_NE(help.out.find(opt), std::string::npos) << opt;
  }
}

}  // namespace
