// kvgate: one binary, many roles. See `kvgate --help`.
#include <cstdio>
#include <string>
#include <vector>

#include "cli/commands.h"

namespace {

constexpr const char* kUsage = R"(usage: kvgate <command> [options]

kvgate serves long-context LLM requests with compressed KV caches.

commands:
  generate     generate a completion for a prompt on this machine (CPU engine)
  tokenize     print the token ids of a text as a JSON array
  bench        benchmarks: 'kvgate bench engine' measures prefill and decode speed
               against llama.cpp on the same model and machine
  eval         quality of a KV policy: perplexity of real text and passkey retrieval
  config       the configuration schema: --print-defaults, or check FILE
  calibrate    layer grouping and Attention-Gate training for a model (gate side file)
  serve        the OpenAI-compatible HTTP API with the CPU engine in this process
  coordinator  the cluster's HTTP API: places requests on prefill and decode nodes
  prefill      a prefill node: full-attention prefill, compresses the KV cache, ships it over UCX
  decode       a decode node: holds compressed KV caches, batches decode steps, streams tokens
  up           start a whole cluster from a config file (configs/local.yaml), one process per node

Run 'kvgate <command> --help' for the options of a command.
)";

}  // namespace

namespace kvgate::cli {
void print_error(const std::string& message) {
  std::fprintf(stderr, "kvgate: error: %s\n", message.c_str());
}
}  // namespace kvgate::cli

int main(int argc, char** argv) {
  using namespace kvgate::cli;
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (cmd == "generate") return run_generate(args);
  if (cmd == "tokenize") return run_tokenize(args);
  if (cmd == "bench") return run_bench(args);
  if (cmd == "eval") return run_eval(args);
  if (cmd == "config") return run_config(args);
  if (cmd == "calibrate") return run_calibrate(args);
  if (cmd == "serve") return run_serve(args);
  if (cmd == "up") return run_up(args);
  if (cmd == "coordinator") return run_coordinator(args);
  if (cmd == "decode") return run_decode(args);
  if (cmd == "prefill") return run_prefill(args);
  print_error("unknown command '" + cmd + "' (see 'kvgate --help')");
  return 2;
}
