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

namespace {

struct CliRun {
  int code = -1;
  std::string out;
  std::string err;
};

CliRun run(const std::string& args) {
  static int counter = 0;
  const std::string err_path =
      testing::TempDir() + "kvgate_cli_err_" + std::to_string(::getpid()) + "_" + std::to_string(counter++);
  const std::string cmd = std::string(KVGATE_BIN) + " " + args + " 2>" + err_path;
  CliRun r;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(err_path);
  r.err.assign(std::istreambuf_iterator<char>(e), std::istreambuf_iterator<char>());
  std::filesystem::remove(err_path);
  return r;
}

size_t lines(const std::string& s) { return std::count(s.begin(), s.end(), '\n'); }

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

}  // namespace
