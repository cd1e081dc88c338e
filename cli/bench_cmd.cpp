// kvgate bench engine: prefill and decode speed of the CPU engine, and the
// same measurements of llama.cpp (llama-cpp-python) on the same GGUF, token
// ids, threads and machine, in the same run, printed as ratios.
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/model_loading.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"

#ifndef KVGATE_SOURCE_DIR
#define KVGATE_SOURCE_DIR "."
#endif

namespace kvgate::cli {

namespace {

constexpr const char* kBenchText =
    "The history of astronomy is a story of patient observation and bold ideas. Early "
    "sky-watchers tracked the motions of the Sun, the Moon and the planets, and built calendars "
    "that told farmers when to plant. Later, instruments such as the telescope revealed moons "
    "around Jupiter, phases of Venus and countless faint stars in the Milky Way. In the "
    "twentieth century, astronomers measured the distances to other galaxies, discovered that "
    "the universe is expanding, and detected the faint afterglow of the Big Bang. ";

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void progress(const std::string& msg) { std::fprintf(stderr, "[kvgate] %s\n", msg.c_str()); }

struct Figures {
  double prefill = 0, decode_b1 = 0, decode_bn = 0;
};

Result<Figures> bench_kvgate(const engine::LlamaModel& model, const std::vector<int32_t>& prefill_ids,
                             const std::vector<int32_t>& decode_prompt, int threads, int batch,
                             int decode_tokens, int reps) {
  using namespace engine;
  ForwardOptions fo;
  fo.n_threads = threads;
  fo.max_batch_tokens = std::max<int64_t>(prefill_ids.size(), decode_prompt.size() * batch);
  CpuForward fwd(model, fo);
  const auto& c = model.config();
  std::vector<float> logits(static_cast<size_t>(c.n_vocab) * batch);
  Figures f;
  double best = 1e30;
  for (int rep = 0; rep <= reps; ++rep) {
    KvCache cache(c, static_cast<int64_t>(prefill_ids.size()));
    const auto t0 = Clock::now();
    KVGATE_RETURN_IF_ERROR(fwd.prefill(cache, prefill_ids, logits.data()));
    const double dt = seconds_since(t0);
    if (rep > 0) best = std::min(best, dt);
    progress("prefill " + std::to_string(prefill_ids.size()) + " tokens: " +
             std::to_string(dt * 1e3) + " ms");
  }
  f.prefill = prefill_ids.size() / best;

  auto decode_run = [&](int n_seq) -> Result<double> {
    std::vector<std::unique_ptr<KvCache>> caches;
    std::vector<BatchItem> items;
    for (int s = 0; s < n_seq; ++s) {
      caches.push_back(std::make_unique<KvCache>(c, decode_prompt.size() + decode_tokens));
      items.push_back({caches.back().get(), decode_prompt, true});
    }
    KVGATE_RETURN_IF_ERROR(fwd.forward(items, logits.data()));
    std::vector<int32_t> last(n_seq);
    for (int s = 0; s < n_seq; ++s) last[s] = argmax({logits.data() + s * c.n_vocab, (size_t)c.n_vocab});
    const auto t0 = Clock::now();
    for (int step = 0; step < decode_tokens; ++step) {
      for (int s = 0; s < n_seq; ++s) items[s].tokens = std::span<const int32_t>(&last[s], 1);
      KVGATE_RETURN_IF_ERROR(fwd.forward(items, logits.data()));
      for (int s = 0; s < n_seq; ++s) last[s] = argmax({logits.data() + s * c.n_vocab, (size_t)c.n_vocab});
    }
    return seconds_since(t0);
  };
  for (int n_seq : {1, batch}) {
    double best_d = 1e30;
    for (int rep = 0; rep < reps; ++rep) {
      KVGATE_ASSIGN_OR_RETURN(double dt, decode_run(n_seq));
      best_d = std::min(best_d, dt);
    }
    const double tps = static_cast<double>(n_seq) * decode_tokens / best_d;
    progress("decode batch " + std::to_string(n_seq) + ": " + std::to_string(tps) + " tokens/s");
    (n_seq == 1 ? f.decode_b1 : f.decode_bn) = tps;
  }
  return f;
}

// Runs the llama.cpp peer; nullopt (with a note) when llama-cpp-python is missing.
std::optional<nlohmann::json> bench_peer(const std::string& model, const std::vector<int32_t>& prefill_ids,
                                         const std::vector<int32_t>& decode_prompt, int threads,
                                         int batch, int decode_tokens, int reps) {
  if (std::system("python3 -c 'import llama_cpp, numpy' >/dev/null 2>&1") != 0) {
    progress("llama-cpp-python not installed: no peer figures (pip install llama-cpp-python numpy)");
    return std::nullopt;
  }
  char tmpl[] = "/tmp/kvgate-bench-XXXXXX";
  const int fd = mkstemp(tmpl);
  if (fd < 0) return std::nullopt;
  close(fd);
  {
    std::ofstream out(tmpl);
    out << nlohmann::json{{"prefill", prefill_ids}, {"decode_prompt", decode_prompt}}.dump();
  }
  const std::string cmd = "python3 '" KVGATE_SOURCE_DIR "/bench/llama_cpp_peer.py' --model '" + model +
                          "' --tokens " + tmpl + " --threads " + std::to_string(threads) +
                          " --decode-tokens " + std::to_string(decode_tokens) + " --batch " +
                          std::to_string(batch) + " --reps " + std::to_string(reps);
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string output;
  if (pipe != nullptr) {
    std::array<char, 4096> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) output.append(buf.data(), n);
    const int rc = pclose(pipe);
    if (rc != 0) output.clear();
  }
  std::remove(tmpl);
  auto j = nlohmann::json::parse(output, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    progress("llama.cpp peer failed; no peer figures");
    return std::nullopt;
  }
  return j;
}

}  // namespace

int run_bench(const std::vector<std::string>& args) {
  if (!args.empty() && args[0] == "load") {
    return run_bench_load(std::vector<std::string>(args.begin() + 1, args.end()));
  }
  if (!args.empty() && args[0] == "capacity") {
    return run_bench_capacity(std::vector<std::string>(args.begin() + 1, args.end()));
  }
  if (!args.empty() && args[0] == "prefill") {
    return run_bench_prefill(std::vector<std::string>(args.begin() + 1, args.end()));
  }
  if (args.empty() || args[0] != "engine") {
    if (!args.empty() && (args[0] == "--help" || args[0] == "-h")) {
      std::puts("usage: kvgate bench engine|load|capacity|prefill [options]\n\nBenchmarks. 'engine': "
                "prefill and decode tokens/s of the CPU engine vs llama.cpp.\n'load': TTFT / "
                "inter-token latency / throughput of a running kvgate API under concurrent "
                "requests.\n'capacity': concurrent long requests one decode pool holds per "
                "policy.\n'prefill': the prefill node's batched pass vs one prompt at a time, and "
                "per-block shipping vs shipping after the prefill.\nRun 'kvgate bench NAME --help' "
                "for options.");
      return 0;
    }
    print_error("unknown benchmark (available: engine, load, capacity, prefill; see 'kvgate bench --help')");
    return 2;
  }
  ArgParser p("kvgate bench engine",
              "Measures prefill tokens/s on a long prompt and greedy decode tokens/s at batch 1 and\n"
              "batch N, for kvgate's CPU engine and (when llama-cpp-python is installed) llama.cpp\n"
              "on the same model, token ids and threads, and prints the ratios. Best of --reps.");
  p.add_option("model", "PATH", "GGUF model file", kDefaultModel);
  p.add_option("threads", "N", "CPU threads for both engines; 0 = all cores", "0");
  p.add_option("prompt-tokens", "N", "prefill prompt length", "512");
  p.add_option("decode-tokens", "N", "tokens generated per decode measurement", "64");
  p.add_option("batch", "N", "sequences in the batched decode measurement", "8");
  p.add_option("reps", "N", "repetitions (best is kept)", "3");
  p.add_flag("no-peer", "skip the llama.cpp measurements");
  p.add_flag("json", "print the figures as one JSON object");
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (Status s = p.parse(rest); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto threads = p.get_int("threads", 0, 1024);
  auto prompt_tokens = p.get_int("prompt-tokens", 1, 8192);
  auto decode_tokens = p.get_int("decode-tokens", 1, 4096);
  auto batch = p.get_int("batch", 1, 256);
  auto reps = p.get_int("reps", 1, 100);
  for (const Status* s : {&threads.status(), &prompt_tokens.status(), &decode_tokens.status(),
                          &batch.status(), &reps.status()}) {
    if (!s->ok()) {
      print_error(s->message());
      return 2;
    }
  }
  progress("loading " + p.get("model"));
  auto loaded = load_model_and_tokenizer(p.get("model"));
  if (!loaded.ok()) {
    print_error(loaded.status().message());
    return 1;
  }
  const engine::LlamaModel& model = *loaded->model;
  const engine::Tokenizer* tok = loaded->tokenizer.get();
  std::string text;
  std::vector<int32_t> ids;
  while (static_cast<int64_t>(ids.size()) < *prompt_tokens) {
    text += kBenchText;
    ids = tok->encode(text, false, false);
  }
  ids.resize(*prompt_tokens);
  std::vector<int32_t> decode_prompt(ids.begin(), ids.begin() + std::min<int64_t>(32, ids.size()));
  const int n_threads = *threads > 0 ? static_cast<int>(*threads)
                                      : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  auto mine = bench_kvgate(model, ids, decode_prompt, n_threads, static_cast<int>(*batch),
                           static_cast<int>(*decode_tokens), static_cast<int>(*reps));
  if (!mine.ok()) {
    print_error(mine.status().message());
    return 1;
  }
  std::optional<nlohmann::json> peer;
  if (!p.flag("no-peer")) {
    peer = bench_peer(p.get("model"), ids, decode_prompt, n_threads, static_cast<int>(*batch),
                      static_cast<int>(*decode_tokens), static_cast<int>(*reps));
  }
  const std::string bn = "decode_b" + std::to_string(*batch) + "_tokens_per_s";
  nlohmann::json j;
  j["threads"] = n_threads;
  j["isa"] = engine::cpu::isa_name(engine::cpu::best_isa());
  j["prompt_tokens"] = *prompt_tokens;
  j["kvgate"] = {{"prefill_tokens_per_s", mine->prefill},
                 {"decode_b1_tokens_per_s", mine->decode_b1},
                 {bn, mine->decode_bn}};
  if (peer) {
    j["llama_cpp"] = *peer;
    j["ratio"] = {{"prefill", mine->prefill / (*peer)["prefill_tokens_per_s"].get<double>()},
                  {"decode_b1", mine->decode_b1 / (*peer)["decode_b1_tokens_per_s"].get<double>()},
                  {"decode_b" + std::to_string(*batch), mine->decode_bn / (*peer)[bn].get<double>()}};
  }
  if (p.flag("json")) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%-28s %12s %12s %8s\n", "measure (tokens/s)", "kvgate", "llama.cpp", "ratio");
  auto row = [&](const char* name, double a, const char* key) {
    if (peer) {
      const double b = (*peer)[key].get<double>();
      std::printf("%-28s %12.1f %12.1f %7.2fx\n", name, a, b, a / b);
    } else {
      std::printf("%-28s %12.1f %12s %8s\n", name, a, "-", "-");
    }
  };
  const std::string pf = "prefill (" + std::to_string(*prompt_tokens) + " tokens)";
  const std::string dn = "decode batch " + std::to_string(*batch);
  row(pf.c_str(), mine->prefill, "prefill_tokens_per_s");
  row("decode batch 1", mine->decode_b1, "decode_b1_tokens_per_s");
  row(dn.c_str(), mine->decode_bn, bn.c_str());
  std::printf("threads %d, isa %s\n", n_threads, engine::cpu::isa_name(engine::cpu::best_isa()));
  return 0;
}

}  // namespace kvgate::cli
