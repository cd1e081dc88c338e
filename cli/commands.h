// Subcommands of the kvgate binary. Each returns the process exit code:
// 0 success, 1 runtime error, 2 usage error. Errors are printed as one line.
#pragma once

#include <string>
#include <vector>

namespace kvgate::cli {

int run_generate(const std::vector<std::string>& args);
int run_tokenize(const std::vector<std::string>& args);
int run_bench(const std::vector<std::string>& args);
int run_bench_load(const std::vector<std::string>& args);      // `kvgate bench load`
int run_bench_capacity(const std::vector<std::string>& args);  // `kvgate bench capacity`
int run_bench_prefill(const std::vector<std::string>& args);   // `kvgate bench prefill`
int run_eval(const std::vector<std::string>& args);
int run_config(const std::vector<std::string>& args);
int run_calibrate(const std::vector<std::string>& args);
int run_serve(const std::vector<std::string>& args);
int run_up(const std::vector<std::string>& args);
int run_coordinator(const std::vector<std::string>& args);
int run_decode(const std::vector<std::string>& args);
int run_prefill(const std::vector<std::string>& args);

// Prints "kvgate: error: <message>" to stderr.
void print_error(const std::string& message);

inline constexpr const char* kDefaultModel = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

}  // namespace kvgate::cli
