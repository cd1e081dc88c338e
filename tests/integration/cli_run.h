// Runs the kvgate binary (KVGATE_BIN) as a user does and collects its exit
// code, stdout and stderr, for the integration tests of the CLI.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace kvgate::testing {

struct CliRun {
  int code = -1;
  std::string out;
  std::string err;
};

// `kvgate ARGS` through the shell (ARGS may hold redirections); blocks until
// it exits.
inline CliRun run_cli(const std::string& args) {
  static int counter = 0;
  const std::string err_path = ::testing::TempDir() + "kvgate_cli_err_" + std::to_string(::getpid()) +
                               "_" + std::to_string(counter++);
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

inline size_t count_lines(const std::string& s) {
  return static_cast<size_t>(std::count(s.begin(), s.end(), '\n'));
}

}  // namespace kvgate::testing
