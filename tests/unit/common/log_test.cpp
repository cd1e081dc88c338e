#include "common/log.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/control_protocol.h"

namespace kvgate::log {
namespace {

using namespace std::chrono_literals;

// Captures lines through the sink; restores stderr and the defaults after.
class LogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    set_sink([this](std::string_view line) {
      std::lock_guard<std::mutex> lock(mu_);
      lines_.emplace_back(line);
    });
  }
  void TearDown() override {
    set_sink(nullptr);
    configure(LoggingConfig{}, "", "");
  }
  std::vector<std::string> lines() {
    std::lock_guard<std::mutex> lock(mu_);
    return lines_;
  }
  static LoggingConfig config(LogLevel level, LogFormat format) {
    LoggingConfig c;
    c.level = level;
    c.format = format;
    return c;
  }

  std::mutex mu_;
  std::vector<std::string> lines_;
};

TEST_F(LogTest, TextLineHasEveryPart) {
  configure(config(LogLevel::kInfo, LogFormat::kText), "decode", "decode-1");
  const Status status(StatusCode::kDataLoss, "segment 2: crc mismatch");
  info("reserve granted", {{"request", RequestId(42)},
                           {"lease", LeaseId(7)},
                           {"bytes", size_t{1024}},
                           {"delta", int64_t{-3}},
                           {"keep_rate", 0.25},
                           {"ok", true},
                           {"reason", "two words"},
                           {"empty", ""},
                           {"status", status},
                           {"wait_ms", 1500us}});
  const auto got = lines();
  ASSERT_EQ(got.size(), 1u);
  const std::string& line = got[0];
  EXPECT_TRUE(std::regex_match(
      line,
      std::regex(
          R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO decode decode-1 reserve granted .*)")))
      << line;
  const std::string fields =
      " request=42 lease=7 bytes=1024 delta=-3 keep_rate=0.25 ok=true reason=\"two words\" "
      "empty=\"\" status=\"DATA_LOSS: segment 2: crc mismatch\" wait_ms=1.5";
  EXPECT_NE(line.find(fields), std::string::npos) << line;
  EXPECT_EQ(line.find('\n'), std::string::npos);
}

TEST_F(LogTest, TextStaysOnOneLine) {
  configure(config(LogLevel::kInfo, LogFormat::kText), "prefill", "p 1");
  warn("bad\nmessage", {{"peer", "a=b\nc"}});
  const auto got = lines();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].find('\n'), std::string::npos) << got[0];
  EXPECT_NE(got[0].find(" WARN prefill \"p 1\" bad\\nmessage peer=\"a=b\\nc\""), std::string::npos)
      << got[0];
}

TEST_F(LogTest, JsonLineParsesWithTypedFields) {
  configure(config(LogLevel::kDebug, LogFormat::kJson), "coordinator", "coord-\"1\"");
  const Status ok;
  debug("placed \"request\"\n\ttab", {{"request", RequestId(42)},
                                      {"bytes", uint64_t{18446744073709551615ull}},
                                      {"delta", -5},
                                      {"keep_rate", 0.125},
                                      {"nan", std::nan("")},
                                      {"ok", false},
                                      {"control", std::string_view("\x01\x1f\x7f", 3)},
                                      {"bad_utf8", "caf\xc3\xa9 \xff\xfe end \xe2\x82"},
                                      {"snowman", "\xe2\x98\x83"},
                                      {"status", ok}});
  const auto got = lines();
  ASSERT_EQ(got.size(), 1u);
  nlohmann::json j;
  ASSERT_NO_THROW(j = nlohmann::json::parse(got[0])) << got[0];
  EXPECT_TRUE(std::regex_match(j["ts"].get<std::string>(),
                               std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)")));
  EXPECT_EQ(j["level"], "debug");
  EXPECT_EQ(j["role"], "coordinator");
  EXPECT_EQ(j["node"], "coord-\"1\"");
  EXPECT_EQ(j["msg"], "placed \"request\"\n\ttab");
  EXPECT_EQ(j["request"], 42);
  EXPECT_EQ(j["bytes"].get<uint64_t>(), 18446744073709551615ull);
  EXPECT_EQ(j["delta"], -5);
  EXPECT_DOUBLE_EQ(j["keep_rate"].get<double>(), 0.125);
  EXPECT_EQ(j["nan"], "nan");
  EXPECT_EQ(j["ok"], false);
  EXPECT_EQ(j["control"], std::string("\x01\x1f\x7f", 3));
  EXPECT_EQ(j["bad_utf8"], "caf\xc3\xa9 \xef\xbf\xbd\xef\xbf\xbd end \xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(j["snowman"], "\xe2\x98\x83");
  EXPECT_EQ(j["status"], "OK");
  EXPECT_EQ(j.size(), 15u);
  EXPECT_EQ(got[0].find('\n'), std::string::npos);
}

TEST_F(LogTest, LevelFiltering) {
  configure(config(LogLevel::kWarn, LogFormat::kJson), "decode", "d");
  EXPECT_FALSE(enabled(LogLevel::kTrace));
  EXPECT_FALSE(enabled(LogLevel::kInfo));
  EXPECT_TRUE(enabled(LogLevel::kWarn));
  EXPECT_TRUE(enabled(LogLevel::kError));
  trace("t");
  debug("d");
  info("i");
  write(LogLevel::kInfo, "direct write is filtered too");
  warn("w");
  error("e");
  auto got = lines();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(nlohmann::json::parse(got[0])["level"], "warn");
  EXPECT_EQ(nlohmann::json::parse(got[1])["level"], "error");

  set_level(LogLevel::kTrace);
  trace("t");
  got = lines();
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(nlohmann::json::parse(got[2])["level"], "trace");
}

TEST_F(LogTest, ConcurrentLinesStayWhole) {
  configure(config(LogLevel::kInfo, LogFormat::kJson), "decode", "d");
  constexpr int kThreads = 4;
  constexpr int kEach = 300;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < kEach; ++i)
        info("step", {{"thread", t}, {"i", i}, {"pad", std::string(200, 'x')}});
    });
  }
  for (auto& t : threads) t.join();
  const auto got = lines();
  ASSERT_EQ(got.size(), size_t{kThreads * kEach});
  std::vector<int> next(kThreads, 0);
  for (const auto& line : got) {
    const auto j = nlohmann::json::parse(line);
    const int t = j["thread"];
    EXPECT_EQ(j["i"].get<int>(), next[t]++);  // one thread's lines keep their order
  }
}

TEST_F(LogTest, FormatLineMatchesWhatIsWritten) {
  configure(config(LogLevel::kInfo, LogFormat::kText), "prefill", "p1");
  // 2024-02-29T23:59:59.007Z
  const auto t = std::chrono::system_clock::time_point(std::chrono::milliseconds(1709251199007));
  EXPECT_EQ(format_line(LogLevel::kError, "boom", {{"n", 3}}, t),
            "2024-02-29T23:59:59.007Z ERROR prefill p1 boom n=3");
}

// The real stderr path: one line, newline-terminated, one write per line.
TEST(LogStderr, WritesOneLinePerEvent) {
  std::FILE* tmp = std::tmpfile();
  ASSERT_NE(tmp, nullptr);
  const int saved = ::dup(STDERR_FILENO);
  ASSERT_GE(saved, 0);
  ASSERT_GE(::dup2(::fileno(tmp), STDERR_FILENO), 0);
  configure(LoggingConfig{}, "coordinator", "c1");
  info("hello", {{"a", 1}});
  info("world");
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  configure(LoggingConfig{}, "", "");

  std::rewind(tmp);
  std::string content;
  char buf[512];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), tmp)) > 0) content.append(buf, n);
  std::fclose(tmp);
  ASSERT_FALSE(content.empty());
  EXPECT_EQ(content.back(), '\n');
  const auto first_end = content.find('\n');
  EXPECT_NE(content.substr(0, first_end).find(" INFO coordinator c1 hello a=1"), std::string::npos)
      << content;
  EXPECT_NE(content.substr(first_end + 1).find(" INFO coordinator c1 world\n"), std::string::npos)
      << content;
  EXPECT_EQ(std::count(content.begin(), content.end(), '\n'), 2);
}

}  // namespace
}  // namespace kvgate::log
