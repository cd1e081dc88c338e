// The kvgate binary as a user runs it: exit codes, one-line errors, help,
// plain and JSON output.
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

bool have_model() { return std::filesystem::exists(KVGATE_TEST_MODEL); }
const std::string kModel = std::string("--model ") + KVGATE_TEST_MODEL;

TEST(Cli, HelpDescribesEveryCommandAndOption) {
  CliRun top = run("--help");
  EXPECT_EQ(top.code, 0);
  for (const char* c : {"generate", "tokenize", "bench"}) EXPECT_NE(top.out.find(c), std::string::npos) << c;
  CliRun gen = run("generate --help");
  EXPECT_EQ(gen.code, 0);
  for (const char* o : {"--model", "--prompt", "--max-tokens", "--temperature", "--seed", "--chat",
                        "--ignore-eos", "--json", "--top-k", "--top-p", "--min-p", "--stop"}) {
    EXPECT_NE(gen.out.find(o), std::string::npos) << o;
  }
  EXPECT_EQ(run("tokenize --help").code, 0);
  EXPECT_EQ(run("bench engine --help").code, 0);
}

TEST(Cli, BadInvocationsGiveOneClearLineAndNonZeroExit) {
  CliRun unknown_cmd = run("frobnicate");
  EXPECT_EQ(unknown_cmd.code, 2);
  EXPECT_NE(unknown_cmd.err.find("frobnicate"), std::string::npos);
  EXPECT_EQ(lines(unknown_cmd.err), 1u);

  CliRun bad_flag = run("generate --prompt hi --bogus");
  EXPECT_EQ(bad_flag.code, 2);
  EXPECT_NE(bad_flag.err.find("--bogus"), std::string::npos);
  EXPECT_EQ(lines(bad_flag.err), 1u);

  CliRun bad_value = run("generate --prompt hi --max-tokens lots");
  EXPECT_EQ(bad_value.code, 2);
  EXPECT_NE(bad_value.err.find("max-tokens"), std::string::npos);

  CliRun no_prompt = run("generate");
  EXPECT_EQ(no_prompt.code, 2);
  EXPECT_NE(no_prompt.err.find("--prompt"), std::string::npos);

  CliRun missing = run("generate --model /nonexistent/model.gguf --prompt hi");
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE(missing.err.find("/nonexistent/model.gguf"), std::string::npos);
  EXPECT_EQ(lines(missing.err), 1u);
  EXPECT_TRUE(missing.out.empty());
}

TEST(Cli, UnsupportedArchitectureIsOneClearLine) {
  if (!have_model()) GTEST_SKIP() << "model not found (run scripts/fetch-model.sh)";
  std::ifstream in(KVGATE_TEST_MODEL, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string key = std::string("general.architecture") + std::string("\x08\x00\x00\x00", 4) +
                          std::string("\x05\x00\x00\x00\x00\x00\x00\x00", 8);
  const size_t at = bytes.find(key + "llama");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at + key.size(), 5, "gemma");
  const std::string path = testing::TempDir() + "kvgate_gemma_" + std::to_string(::getpid()) + ".gguf";
  std::ofstream(path, std::ios::binary) << bytes;
  CliRun r = run("generate --model " + path + " --prompt hi");
  std::filesystem::remove(path);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("unsupported model architecture 'gemma'"), std::string::npos) << r.err;
  EXPECT_EQ(lines(r.err), 1u);
}

TEST(Cli, TokenizePrintsIdsAsJson) {
  if (!have_model()) GTEST_SKIP() << "model not found";
  CliRun r = run("tokenize " + kModel + " 'Hello, world! 123'");
  ASSERT_EQ(r.code, 0) << r.err;
  auto ids = nlohmann::json::parse(r.out);
  // llama.cpp's ids for this text (smollm splits digits one by one).
  EXPECT_EQ(ids, nlohmann::json::parse("[19556, 28, 905, 17, 216, 33, 34, 35]"));
}

TEST(Cli, GenerateJsonAndPlainOutputAgree) {
  if (!have_model()) GTEST_SKIP() << "model not found";
  CliRun j = run("generate " + kModel + " --prompt 'The capital of France is' --max-tokens 8 --ignore-eos --json");
  ASSERT_EQ(j.code, 0) << j.err;
  auto doc = nlohmann::json::parse(j.out);
  ASSERT_EQ(doc["tokens"].size(), 8u);
  EXPECT_EQ(doc["prompt_tokens"], 5);
  EXPECT_EQ(doc["finish_reason"], "length");
  EXPECT_GT(doc["prefill_tokens_per_s"].get<double>(), 0.0);
  EXPECT_GT(doc["decode_tokens_per_s"].get<double>(), 0.0);
  // Greedy: llama.cpp continues with " Paris." (tests/data/golden_generate.json).
  EXPECT_EQ(doc["text"].get<std::string>().rfind(" Paris.", 0), 0u) << doc["text"];
  CliRun plain = run("generate " + kModel + " --prompt 'The capital of France is' --max-tokens 8 --ignore-eos");
  ASSERT_EQ(plain.code, 0);
  EXPECT_EQ(plain.out, doc["text"].get<std::string>() + "\n");
}

// A private copy of the model's path (a symlink in a temp dir), so no gate
// file that a calibration run left next to the real model changes what the
// eval tests see: its default gate path does not exist.
class EvalCli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_model()) GTEST_SKIP() << "model not found (run scripts/fetch-model.sh)";
    dir_ = testing::TempDir() + "kvgate_eval_cli_" + std::to_string(::getpid());
    std::filesystem::create_directories(dir_);
    model_ = dir_ + "/model.gguf";
    std::filesystem::remove(model_);
    std::filesystem::create_symlink(std::filesystem::absolute(KVGATE_TEST_MODEL), model_);
    text_ = dir_ + "/text.txt";
    std::ofstream(text_) << "The river rose slowly through the night, and by morning the lower road "
                            "was under water. The farmers drove their cattle up to the high pasture, "
                            "where the grass was still dry, and the children watched from the hill "
                            "as the bridge disappeared beneath the brown current.";
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::string eval(const std::string& args) const {
    return "eval --model " + model_ + " --text " + text_ + " --context 24 --score 8 --no-progress " +
           args;
  }
  std::string dir_, model_, text_;
};

TEST_F(EvalCli, SinglePolicyJsonKeepsTheScriptableSchema) {
  CliRun r = run(eval("--policy window --n-sink 2 --n-window 8 --json"));
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_TRUE(j.is_object());
  for (const char* k : {"policy", "context", "perplexity", "kv_dense_bytes", "kv_bytes", "kv_saving",
                        "keep_rate", "blocks", "n_sink", "n_window"}) {
    EXPECT_TRUE(j.contains(k)) << k;
  }
  EXPECT_EQ(j["policy"], "window");
  EXPECT_EQ(j["context"], 24);
  EXPECT_EQ(j["n_window"], 8);
  // 30 layers x 3 KV heads x (2 + 8) rows x 64 x 2 bytes, K and V.
  EXPECT_EQ(j["kv_bytes"], 2 * 30 * 3 * 10 * 64 * 2);
  EXPECT_EQ(j["kv_dense_bytes"], 23040 * (24 + 8 - 1));
  EXPECT_TRUE(j["gate"].is_null());
}

TEST_F(EvalCli, CommaListAndAllShareOnePrefill) {
  CliRun list = run(eval("--policy dense,window,h2o --n-window 8 --json"));
  ASSERT_EQ(list.code, 0) << list.err;
  auto j = nlohmann::json::parse(list.out);
  ASSERT_TRUE(j.contains("results"));
  ASSERT_EQ(j["results"].size(), 3u);
  EXPECT_EQ(j["policies"], nlohmann::json::parse(R"(["dense", "window", "h2o"])"));
  const auto& res = j["results"];
  EXPECT_EQ(res[0]["policy"], "dense");
  EXPECT_EQ(res[1]["policy"], "window");
  EXPECT_EQ(res[2]["policy"], "h2o");
  EXPECT_EQ(res[0]["kv_saving"], 0.0);
  EXPECT_GT(res[1]["kv_saving"].get<double>(), 0.5);
  EXPECT_EQ(res[0]["prefill_seconds"], res[2]["prefill_seconds"]) << "one shared prefill";
  // The same dense numbers as a dense-only run.
  CliRun dense = run(eval("--policy dense --json"));
  ASSERT_EQ(dense.code, 0) << dense.err;
  EXPECT_EQ(nlohmann::json::parse(dense.out)["perplexity"], res[0]["perplexity"]);

  // all: every policy but the gate ones, which need a gate file: a note says so.
  CliRun all = run(eval("--policy all --n-window 8 --json"));
  ASSERT_EQ(all.code, 0) << all.err;
  auto a = nlohmann::json::parse(all.out);
  EXPECT_EQ(a["policies"], nlohmann::json::parse(R"(["dense", "window", "pod", "h2o", "snapkv"])"));
  EXPECT_NE(all.err.find("skipping gate, gate+pod"), std::string::npos) << all.err;
  EXPECT_NE(all.err.find("model.gate.gguf"), std::string::npos) << all.err;

  // Plain output: one line per policy under a header.
  CliRun plain = run(eval("--policy dense,pod"));
  ASSERT_EQ(plain.code, 0) << plain.err;
  EXPECT_EQ(lines(plain.out), 3u) << plain.out;
  EXPECT_NE(plain.out.find("uniform-2"), std::string::npos) << plain.out;
}

TEST_F(EvalCli, BadPolicyListsAndMissingGatesAreOneClearLine) {
  CliRun bogus = run(eval("--policy dense,bogus"));
  EXPECT_EQ(bogus.code, 2);
  EXPECT_NE(bogus.err.find("'bogus'"), std::string::npos) << bogus.err;
  EXPECT_EQ(lines(bogus.err), 1u);
  CliRun twice = run(eval("--policy dense,window,dense"));
  EXPECT_EQ(twice.code, 2);
  EXPECT_NE(twice.err.find("twice"), std::string::npos) << twice.err;
  CliRun empty = run(eval("--policy dense,"));
  EXPECT_EQ(empty.code, 2);

  // A gate policy without a gate file: says how to get one, before any work.
  CliRun no_gate = run(eval("--policy dense,gate+pod"));
  EXPECT_EQ(no_gate.code, 1);
  EXPECT_NE(no_gate.err.find("gate+pod"), std::string::npos) << no_gate.err;
  EXPECT_NE(no_gate.err.find("--gate"), std::string::npos) << no_gate.err;
  EXPECT_NE(no_gate.err.find("kvgate calibrate"), std::string::npos) << no_gate.err;
  EXPECT_EQ(lines(no_gate.err), 1u);
  EXPECT_TRUE(no_gate.out.empty());

  // An explicit gate file that does not exist: named, before the model loads.
  const std::string missing = dir_ + "/missing.gate.gguf";
  CliRun gone = run(eval("--policy gate --gate " + missing));
  EXPECT_EQ(gone.code, 1);
  EXPECT_NE(gone.err.find(missing), std::string::npos) << gone.err;
  EXPECT_EQ(lines(gone.err), 1u);
  // Not a gate file (the model itself): the loader's error names it.
  CliRun wrong = run(eval("--policy gate --gate " + model_));
  EXPECT_EQ(wrong.code, 1);
  EXPECT_NE(wrong.err.find(model_), std::string::npos) << wrong.err;

  CliRun gen = run("generate --model " + model_ + " --prompt hi --max-tokens 2 --policy gate");
  EXPECT_EQ(gen.code, 1);
  EXPECT_NE(gen.err.find("kvgate calibrate"), std::string::npos) << gen.err;
}

TEST_F(EvalCli, GenerateRunsEveryGatelessPolicyWithKvBytes) {
  for (const char* policy : {"dense", "window", "pod", "h2o", "snapkv"}) {
    CliRun r = run("generate --model " + model_ +
                   " --prompt 'The capital of France is Paris. The capital of Italy is' "
                   "--max-tokens 6 --ignore-eos --n-sink 2 --n-window 4 --json --policy " +
                   policy);
    ASSERT_EQ(r.code, 0) << policy << ": " << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["policy"], policy);
    EXPECT_EQ(j["tokens"].size(), 6u);
    EXPECT_EQ(j["kv_dense_bytes"], 23040 * (j["prompt_tokens"].get<int64_t>() + 5));
    if (std::string(policy) == "dense") {
      EXPECT_EQ(j["kv_bytes"], j["kv_dense_bytes"]);
    } else {
      EXPECT_LT(j["kv_bytes"].get<int64_t>(), j["kv_dense_bytes"].get<int64_t>()) << policy;
    }
  }
}

}  // namespace
