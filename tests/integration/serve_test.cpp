// `kvgate serve` as a real process: it prints its URL (port 0 -> the bound
// port), answers HTTP, and shuts down cleanly on SIGTERM. No sleeps: reads
// and the exit are waited for with deadlines.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "tests/unit/coordinator/http_test_client.h"

namespace {

using Clock = std::chrono::steady_clock;
using kvgate::coordinator::testing::http_call;

struct Child {
  pid_t pid = -1;
  int out_fd = -1;  // the child's stdout
  int err_fd = -1;  // the child's stderr
};

Child spawn(const std::vector<std::string>& args) {
  int out[2], err[2];
  if (pipe(out) != 0 || pipe(err) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    dup2(err[1], 2);
    close(out[0]);
    close(err[0]);
    std::vector<char*> argv;
    std::string bin = KVGATE_BIN;
    argv.push_back(bin.data());
    std::vector<std::string> copy = args;
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  close(out[1]);
  close(err[1]);
  return {pid, out[0], err[0]};
}

// Reads `fd` until `pattern` matches or the deadline passes.
std::string read_until(int fd, const std::regex& pattern, std::chrono::seconds timeout) {
  std::string got;
  const auto deadline = Clock::now() + timeout;
  while (!std::regex_search(got, pattern)) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) break;
    char buf[4096];
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  return got;
}

// The exit status, or -1 (and the process killed) if it has not exited by
// the deadline. Waits for EOF on the child's stderr (it closes when the
// process exits), then reaps it.
int wait_exit(const Child& c, std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd p{c.err_fd, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0) {
      kill(c.pid, SIGKILL);
      waitpid(c.pid, nullptr, 0);
      return -1;
    }
    char buf[4096];
    if (read(c.err_fd, buf, sizeof(buf)) <= 0) break;  // EOF: the process is gone
  }
  int status = 0;
  waitpid(c.pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(Serve, AnswersHttpAndStopsOnSigterm) {
  if (!std::filesystem::exists(KVGATE_TEST_MODEL)) GTEST_SKIP() << "model not found";
  Child c = spawn({"serve", "--model", KVGATE_TEST_MODEL, "--port", "0", "--auth", "disabled",
                   "--threads", "1"});
  ASSERT_GT(c.pid, 0);
  const std::regex url_re("http://127\\.0\\.0\\.1:([0-9]+)/v1");
  const std::string out = read_until(c.out_fd, url_re, std::chrono::seconds(60));
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, url_re)) << out;
  const uint16_t port = static_cast<uint16_t>(std::stoi(m[1]));

  auto health = http_call(port, "GET", "/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  auto r = http_call(port, "POST", "/v1/completions",
                     R"({"model":"SmolLM2-135M-Instruct.Q4_1","prompt":"Hello","max_tokens":3})");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(nlohmann::json::parse(r->body)["usage"]["completion_tokens"].get<int>() <= 3, true);

  ASSERT_EQ(kill(c.pid, SIGTERM), 0);
  EXPECT_EQ(wait_exit(c, std::chrono::seconds(30)), 0);
  close(c.out_fd);
  close(c.err_fd);
}

TEST(Serve, AuthWithoutKeysIsAUsageError) {
  Child c = spawn({"serve", "--model", KVGATE_TEST_MODEL, "--port", "0"});
  ASSERT_GT(c.pid, 0);
  const std::string err = read_until(c.err_fd, std::regex("api-keys"), std::chrono::seconds(30));
  EXPECT_NE(err.find("--api-keys"), std::string::npos) << err;
  EXPECT_EQ(wait_exit(c, std::chrono::seconds(30)), 2);
  close(c.out_fd);
  close(c.err_fd);
}

}  // namespace
