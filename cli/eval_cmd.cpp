// kvgate eval: quality of a KV policy (engine/eval.h) as perplexity of real
// text and passkey retrieval, printed as one JSON object with --json.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/model_loading.h"
#include "cli/policy_options.h"
#include "engine/eval.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "engine/tokenizer.h"

namespace kvgate::cli {

namespace {

using nlohmann::json;

Result<std::string> read_text(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return not_found(path + ": no such file");
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (!in && !in.eof()) return invalid_argument(path + ": cannot read");
  return ss.str();
}

Result<std::vector<int64_t>> parse_int_list(const std::string& name, const std::string& s,
                                            int64_t min, int64_t max) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    errno = 0;
    char* end = nullptr;
    const long long x = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || errno == ERANGE || x < min || x > max) {
      return invalid_argument(
          "option '--" + name + "' must be a comma-separated list of integers in [" +
          std::to_string(min) + ", " + std::to_string(max) + "], got '" + s + "'");
    }
    out.push_back(x);
  }
  if (out.empty()) return invalid_argument("option '--" + name + "' must not be empty");
  return out;
}

Result<std::vector<double>> parse_depths(const std::string& s) {
  std::vector<double> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    errno = 0;
    char* end = nullptr;
    const double x = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0' || errno == ERANGE || !(x >= 0.0 && x <= 1.0)) {
      return invalid_argument(
          "option '--depths' must be a comma-separated list of numbers in [0, 1], got '" + s + "'");
    }
    out.push_back(x);
  }
  if (out.empty()) return invalid_argument("option '--depths' must not be empty");
  return out;
}

// Progress on stderr: one line rewritten in place on a terminal; on a pipe or
// file, one line per finished window or prompt (not per scored token).
class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled), tty_(isatty(STDERR_FILENO) == 1) {}
  ~ProgressBar() { finish(); }

  void operator()(const engine::EvalProgress& p) {
    if (!enabled_) return;
    if (!tty_ && p.what == "scoring") return;
    char line[160];
    if (p.what == "passkey") {
      std::snprintf(line, sizeof(line), "[eval] passkey %lld tokens: %lld/%lld",
                    static_cast<long long>(p.length_tokens), static_cast<long long>(p.done),
                    static_cast<long long>(p.total));
    } else {
      std::snprintf(line, sizeof(line), "[eval] perplexity context %lld: %s %lld/%lld",
                    static_cast<long long>(p.length_tokens), std::string(p.what).c_str(),
                    static_cast<long long>(p.done), static_cast<long long>(p.total));
    }
    const auto elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    if (tty_) {
      std::fprintf(stderr, "\r%s  (%.0f s)\033[K", line, elapsed);
      open_ = true;
    } else {
      std::fprintf(stderr, "%s  (%.0f s)\n", line, elapsed);
    }
    std::fflush(stderr);
  }

  void finish() {
    if (open_) std::fputc('\n', stderr);
    open_ = false;
  }

 private:
  bool enabled_, tty_;
  bool open_ = false;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

void put_kv(json& j, const engine::KvMeasure& kv) {
  j["kv_dense_bytes"] = kv.kv_dense_bytes;
  j["kv_bytes"] = kv.kv_bytes;
  j["kv_saving"] = kv.kv_saving();
  j["keep_rate"] = kv.keep_rate;
}

// How the policy ran: its resolved layout parameters and the gate file.
void put_policy(json& j, const engine::EvalPolicyInfo& info, const std::string& gate_path) {
  j["policy"] = info.name;
  j["blocks"] = info.blocks;
  j["n_sink"] = info.n_sink_tokens;
  j["n_window"] = info.n_window_tokens;
  if (info.target_keep_rate > 0.0) j["target_keep_rate"] = info.target_keep_rate;
  if (info.budget_tokens > 0) j["budget_tokens"] = info.budget_tokens;
  j["gate"] = gate_path.empty() ? json(nullptr) : json(gate_path);
}

json perplexity_json(const engine::PerplexityResult& r, const std::string& gate_path) {
  json j;
  j["task"] = "perplexity";
  put_policy(j, r.policy, gate_path);
  j["context"] = r.context_tokens;
  j["score_tokens"] = r.score_tokens;
  j["perplexity"] = r.perplexity;
  j["nll_mean"] = r.nll_mean;
  put_kv(j, r.kv);
  j["prefill_seconds"] = r.prefill_seconds;
  j["compress_seconds"] = r.compress_seconds;
  j["decode_seconds"] = r.decode_seconds;
  const auto steps = static_cast<double>(r.token_nll.size()) - (r.token_nll.empty() ? 0 : 1);
  j["decode_ms_per_token"] = steps > 0 ? 1000.0 * r.decode_seconds / steps : 0.0;
  return j;
}

json passkey_json(const engine::PasskeyResult& r, const engine::PasskeyOptions& kopt,
                  const std::string& gate_path) {
  json j;
  j["task"] = "passkey";
  put_policy(j, r.policy, gate_path);
  j["format"] = engine::passkey_format_name(kopt.format);
  j["trials"] = kopt.trials;
  j["seed"] = kopt.seed;
  json cells = json::array();
  std::map<int64_t, std::pair<int64_t, int64_t>> by_length;  // length -> (correct, trials)
  std::map<int64_t, std::vector<engine::KvMeasure>> kv_by_length;
  std::vector<engine::KvMeasure> kv_all;
  int64_t correct = 0, trials = 0;
  for (const auto& c : r.cells) {
    json cj{{"length", c.length_tokens},
            {"depth", c.depth},
            {"trials", c.trials},
            {"correct", c.correct},
            {"accuracy", c.accuracy()}};
    put_kv(cj, c.kv);
    cells.push_back(cj);
    by_length[c.length_tokens].first += c.correct;
    by_length[c.length_tokens].second += c.trials;
    kv_by_length[c.length_tokens].push_back(c.kv);
    kv_all.push_back(c.kv);
    correct += c.correct;
    trials += c.trials;
  }
  json lengths = json::array();
  for (const auto& [len, ct] : by_length) {
    json lj{{"length", len},
            {"trials", ct.second},
            {"correct", ct.first},
            {"accuracy", static_cast<double>(ct.first) / ct.second}};
    double saving = 0, keep = 0;
    for (const auto& kv : kv_by_length[len]) {
      saving += kv.kv_saving();
      keep += kv.keep_rate;
    }
    lj["kv_saving"] = saving / kv_by_length[len].size();
    lj["keep_rate"] = keep / kv_by_length[len].size();
    lengths.push_back(lj);
  }
  double saving = 0, keep = 0;
  for (const auto& kv : kv_all) {
    saving += kv.kv_saving();
    keep += kv.keep_rate;
  }
  j["accuracy"] = trials > 0 ? static_cast<double>(correct) / trials : 0.0;
  j["kv_saving"] = kv_all.empty() ? 0.0 : saving / kv_all.size();
  j["keep_rate"] = kv_all.empty() ? 1.0 : keep / kv_all.size();
  j["by_length"] = lengths;
  j["cells"] = cells;
  json samples = json::array();
  for (const auto& s : r.samples) {
    samples.push_back({{"length", s.length_tokens},
                       {"depth", s.depth},
                       {"passkey", s.passkey},
                       {"answer", s.answer},
                       {"correct", s.correct}});
  }
  j["samples"] = samples;
  j["prefill_seconds"] = r.prefill_seconds;
  j["compress_seconds"] = r.compress_seconds;
  j["decode_seconds"] = r.decode_seconds;
  return j;
}

// --policy: one name, a comma list, or `all` (every policy; `all_given`
// tells the caller so it can skip gate policies when there is no gate).
Result<std::vector<engine::KvPolicy>> parse_policy_list(const std::string& s, bool& all_given) {
  all_given = s == "all";
  if (all_given) {
    auto all = engine::all_kv_policies();
    return std::vector<engine::KvPolicy>(all.begin(), all.end());
  }
  std::vector<engine::KvPolicy> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    auto p = engine::parse_kv_policy(item);
    if (!p.ok()) {
      return invalid_argument("option '--policy': " + p.status().message() + ", or all");
    }
    if (std::find(out.begin(), out.end(), *p) != out.end()) {
      return invalid_argument("option '--policy': '" + item + "' is listed twice");
    }
    out.push_back(*p);
  }
  if (out.empty() || s.back() == ',') {
    return invalid_argument("option '--policy' must be a policy, a comma-separated list or all, got '" +
                            s + "'");
  }
  return out;
}

void print_json(const json& j) {
  std::printf("%s\n", j.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
}

// Every *.txt directly in `dir`, sorted by name.
Result<std::vector<std::string>> corpus_files(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return not_found(dir + ": no such directory (run scripts/fetch-eval-data.sh)");
  }
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.is_regular_file() && e.path().extension() == ".txt") files.push_back(e.path().string());
  }
  if (ec) return invalid_argument(dir + ": " + ec.message());
  if (files.empty()) return not_found(dir + ": no .txt files (run scripts/fetch-eval-data.sh)");
  std::sort(files.begin(), files.end());
  return files;
}

int fail(const Status& s) {
  print_error(s.message());
  return 1;
}

int usage(const Status& s) {
  print_error(s.message());
  return 2;
}

}  // namespace

int run_eval(const std::vector<std::string>& args) {
  ArgParser p("kvgate eval",
              "Measures the quality of KV policies against their KV saving. Several policies\n"
              "(--policy a,b,... or all) are compared in one run: each context or prompt is\n"
              "prefilled once with full attention and every policy compresses its own copy.\n"
              "  --text FILE --context N: prefill the first N tokens of FILE with full attention,\n"
              "      compress with each --policy, then score the next --score tokens one decode\n"
              "      step at a time (teacher-forced); prints perplexity and KV bytes.\n"
              "  --task perplexity --context N[,N...]: the same over --windows windows of the\n"
              "      evaluation corpus (--data, from scripts/fetch-eval-data.sh).\n"
              "  --task passkey: passkey retrieval at --lengths x --depths, --trials each,\n"
              "      answered greedily; prints accuracy per (length, depth).\n"
              "Progress goes to stderr; results to stdout. --json prints one JSON object for one\n"
              "policy and one context, else {\"results\": [one object per (context, policy)]}.");
  p.add_option("model", "PATH", "GGUF model file", kDefaultModel);
  p.add_option("policy", "P[,P...]",
               "KV policies: dense, window, pod, h2o, snapkv, gate, gate+pod, a comma list, or all "
               "(all skips gate and gate+pod when there is no gate file)",
               "dense");
  add_kv_policy_options(p);
  p.add_option("task", "T", "perplexity or passkey", "perplexity");
  p.add_option("text", "FILE", "score this text file (perplexity, one window at its start)");
  p.add_option("data", "DIR", "evaluation corpus: every *.txt in DIR", "eval-data/eval");
  p.add_option("context", "N[,N...]", "tokens prefilled before scoring (perplexity); a list runs each");
  p.add_option("score", "M", "tokens scored through the decode path (perplexity)", "256");
  p.add_option("windows", "W",
               "windows of the corpus to average (perplexity over --data; the same scored tokens "
               "at every --context)",
               "8");
  p.add_option("lengths", "L,...", "passkey prompt lengths in tokens", "1024,2048,4096,8192");
  p.add_option("depths", "D,...", "passkey depths: key position as a fraction of the prompt length",
               "0,0.25,0.5,0.75,1");
  p.add_option("trials", "K", "passkey prompts per (length, depth)", "2");
  p.add_option("seed", "S", "passkey random seed", "0");
  p.add_option("format", "F", "passkey prompt: chat (the model's chat template) or plain", "chat");
  p.add_option("max-answer-tokens", "N", "passkey answer length cap", "16");
  p.add_flag("json", "print JSON (one object, or {\"results\": [...]} for several)");
  p.add_flag("no-progress", "no progress on stderr");
  p.add_option("threads", "N", "CPU threads; 0 = all cores", "0");
  if (Status s = p.parse(args); !s.ok()) return usage(s);
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  const std::string task = p.get("task");
  if (task != "perplexity" && task != "passkey") {
    return usage(
        invalid_argument("option '--task' must be perplexity or passkey, got '" + task + "'"));
  }
  bool all_policies = false;
  auto policy_list = parse_policy_list(p.get("policy"), all_policies);
  if (!policy_list.ok()) return usage(policy_list.status());
  auto policy_template = parse_kv_policy_options(p);
  if (!policy_template.ok()) return usage(policy_template.status());
  auto threads = p.get_int("threads", 0, 1024);
  if (!threads.ok()) return usage(threads.status());
  const bool as_json = p.flag("json");

  // Options of the task, checked before the model loads.
  engine::PerplexityOptions popt;
  engine::PasskeyOptions kopt;
  std::vector<int64_t> contexts;
  int64_t n_windows = 0;
  if (task == "perplexity") {
    if (!p.has("context"))
      return usage(invalid_argument("option '--context' is required for perplexity"));
    auto context = parse_int_list("context", p.get("context"), 1, 1 << 20);
    auto score = p.get_int("score", 1, 1 << 20);
    auto windows = p.get_int("windows", 1, 100000);
    for (const Status* s : {&context.status(), &score.status(), &windows.status()}) {
      if (!s->ok()) return usage(*s);
    }
    if (p.has("text") && p.has("windows")) {
      return usage(
          invalid_argument("option '--windows' applies to the corpus (--data), not to --text"));
    }
    contexts = *context;
    popt.score_tokens = *score;
    n_windows = *windows;
  } else {
    if (p.has("text") || p.has("context")) {
      return usage(
          invalid_argument("options '--text' and '--context' apply to perplexity, not passkey"));
    }
    auto lengths = parse_int_list("lengths", p.get("lengths"), 1, 1 << 20);
    auto depths = parse_depths(p.get("depths"));
    auto trials = p.get_int("trials", 1, 100000);
    auto seed = p.get_int("seed", 0, INT64_MAX);
    auto format = engine::parse_passkey_format(p.get("format"));
    auto max_answer = p.get_int("max-answer-tokens", 1, 256);
    for (const Status* s : {&lengths.status(), &depths.status(), &trials.status(), &seed.status(),
                            &format.status(), &max_answer.status()}) {
      if (!s->ok()) return usage(*s);
    }
    kopt.lengths_tokens = *lengths;
    kopt.depths = *depths;
    kopt.trials = *trials;
    kopt.seed = static_cast<uint64_t>(*seed);
    kopt.format = *format;
    kopt.max_answer_tokens = static_cast<int32_t>(*max_answer);
  }

  // Input text and an explicit gate file before the model, so a missing
  // file is reported at once.
  const GateSource gate_source = find_gate_file(p.get("gate"), p.get("model"));
  if (Status s = check_gate_file_exists(gate_source); !s.ok()) return fail(s);
  std::vector<std::string> files;
  if (task == "perplexity") {
    if (p.has("text")) {
      files.push_back(p.get("text"));
    } else {
      auto f = corpus_files(p.get("data"));
      if (!f.ok()) return fail(f.status());
      files = std::move(*f);
    }
  }
  std::vector<std::string> texts;
  for (const auto& f : files) {
    auto t = read_text(f);
    if (!t.ok()) return fail(t.status());
    texts.push_back(std::move(*t));
  }

  auto loaded = load_model_and_tokenizer(p.get("model"));
  if (!loaded.ok()) return fail(invalid_argument(loaded.status().message()));
  const engine::LlamaModel& model = *loaded->model;
  const engine::Tokenizer* tok = loaded->tokenizer.get();
  const int64_t n_ctx = model.config().n_ctx_train;
  for (int64_t n : contexts) {
    if (n + popt.score_tokens > n_ctx) {
      return fail(out_of_range("context + score (" + std::to_string(n + popt.score_tokens) +
                               " tokens) exceeds the model context of " + std::to_string(n_ctx) +
                               " tokens"));
    }
  }

  // The gate, then every policy checked against the model before any work.
  auto gate = load_gate(gate_source, model);
  if (!gate.ok()) return fail(gate.status());
  std::vector<engine::KvPolicyConfig> policies;
  std::vector<std::string> skipped;
  for (engine::KvPolicy kind : *policy_list) {
    engine::KvPolicyConfig c = *policy_template;
    c.policy = kind;
    c.gate = *gate;
    if (all_policies && !*gate && engine::policy_uses_gate(c)) {
      skipped.push_back(engine::kv_policy_name(kind));
      continue;
    }
    auto plan = engine::plan_kv_policy(model.config(), c);
    if (!plan.ok()) return fail(plan.status());
    policies.push_back(std::move(c));
  }
  if (!skipped.empty()) {
    std::string names;
    for (const auto& n : skipped) names += (names.empty() ? "" : ", ") + n;
    std::fprintf(stderr,
                 "kvgate eval: note: no gate file (%s not found); skipping %s. Pass --gate FILE "
                 "or make one with `kvgate calibrate`.\n",
                 gate_path_for_model(p.get("model")).c_str(), names.c_str());
  }
  popt.policies = policies;
  kopt.policies = policies;

  engine::ForwardOptions fopt;
  fopt.n_threads = static_cast<int>(*threads);
  engine::CpuForward forward(model, fopt);
  ProgressBar bar(!p.flag("no-progress"));
  auto progress = [&bar](const engine::EvalProgress& e) { bar(e); };

  json results = json::array();
  auto add_common = [&](json& j) {
    j["model"] = p.get("model");
    j["threads"] = forward.n_threads();
  };
  if (task == "perplexity" && p.has("text")) {
    const auto ids = tok->encode(texts[0], /*add_special=*/true, /*parse_special=*/false);
    for (int64_t n : contexts) {
      popt.context_tokens = n;
      auto r = engine::score_perplexity(forward, ids, popt, progress);
      bar.finish();
      if (!r.ok()) return fail(invalid_argument(files[0] + ": " + r.status().message()));
      for (const auto& pr : *r) {
        json j = perplexity_json(pr, gate_source.path);
        j["text"] = files[0];
        j["text_tokens"] = ids.size();
        add_common(j);
        results.push_back(std::move(j));
      }
    }
  } else if (task == "perplexity") {
    std::vector<std::vector<int32_t>> docs;
    int64_t corpus_tokens = 0;
    for (const auto& t : texts) {
      docs.push_back(tok->encode(t, true, false));
      corpus_tokens += static_cast<int64_t>(docs.back().size());
    }
    for (int64_t n : contexts) {
      popt.context_tokens = n;
      auto r = engine::score_corpus_perplexity(forward, docs, popt, n_windows,
                                               /*slot_tokens=*/n_ctx, progress);
      bar.finish();
      if (!r.ok()) return fail(invalid_argument(p.get("data") + ": " + r.status().message()));
      for (const auto& cr : *r) {
        json j = perplexity_json(cr.total, gate_source.path);
        j["data"] = p.get("data");
        j["documents"] = files;
        j["corpus_tokens"] = corpus_tokens;
        j["windows"] = n_windows;
        j["window_perplexity"] = cr.window_perplexity;
        json starts = json::array();
        for (const auto& w : cr.windows)
          starts.push_back({{"document", w.document}, {"start", w.start}});
        j["window_starts"] = starts;
        j["slot_tokens"] = n_ctx;
        add_common(j);
        results.push_back(std::move(j));
      }
    }
  } else {
    auto r = engine::run_passkey(forward, *tok, kopt, progress);
    bar.finish();
    if (!r.ok()) return fail(r.status());
    for (const auto& pr : *r) {
      json j = passkey_json(pr, kopt, gate_source.path);
      add_common(j);
      results.push_back(std::move(j));
    }
  }

  if (as_json) {
    if (results.size() == 1) {
      print_json(results[0]);
    } else {
      json all;
      all["task"] = task;
      json names = json::array();
      for (const auto& c : policies) names.push_back(engine::kv_policy_name(c.policy));
      all["policies"] = names;
      all["results"] = results;
      print_json(all);
    }
    return 0;
  }
  if (task == "passkey") {
    std::printf("passkey, %s format, %lld trials per cell\n", engine::passkey_format_name(kopt.format),
                static_cast<long long>(kopt.trials));
    for (const auto& j : results) {
      std::printf("policy %s (blocks %s, sinks %lld, window %lld)\n",
                  j["policy"].get<std::string>().c_str(), j["blocks"].get<std::string>().c_str(),
                  static_cast<long long>(j["n_sink"].get<int64_t>()),
                  static_cast<long long>(j["n_window"].get<int64_t>()));
      for (const auto& c : j["cells"]) {
        std::printf("  length %6lld  depth %.2f  %lld/%lld correct\n",
                    static_cast<long long>(c["length"].get<int64_t>()), c["depth"].get<double>(),
                    static_cast<long long>(c["correct"].get<int64_t>()),
                    static_cast<long long>(c["trials"].get<int64_t>()));
      }
      for (const auto& l : j["by_length"]) {
        std::printf("  length %6lld  accuracy %.3f  kv saving %.3f  keep rate %.3f\n",
                    static_cast<long long>(l["length"].get<int64_t>()), l["accuracy"].get<double>(),
                    l["kv_saving"].get<double>(), l["keep_rate"].get<double>());
      }
    }
  } else {
    std::printf("%-9s %7s %7s %11s %9s %14s %14s %7s %6s  %s\n", "policy", "context", "scored",
                "perplexity", "vs dense", "kv bytes", "dense bytes", "saving", "keep", "blocks");
    std::map<int64_t, double> dense_ppl;
    for (const auto& j : results) {
      if (j["policy"] == "dense") dense_ppl[j["context"].get<int64_t>()] = j["perplexity"].get<double>();
    }
    for (const auto& j : results) {
      const int64_t ctx = j["context"].get<int64_t>();
      char vs[32] = "n/a";
      if (dense_ppl.count(ctx)) {
        std::snprintf(vs, sizeof vs, "%+.2f%%",
                      100.0 * (j["perplexity"].get<double>() / dense_ppl[ctx] - 1.0));
      }
      std::printf("%-9s %7lld %7lld %11.4f %9s %14lld %14lld %7.3f %6.3f  %s\n",
                  j["policy"].get<std::string>().c_str(), static_cast<long long>(ctx),
                  static_cast<long long>(j["score_tokens"].get<int64_t>()),
                  j["perplexity"].get<double>(), vs,
                  static_cast<long long>(j["kv_bytes"].get<int64_t>()),
                  static_cast<long long>(j["kv_dense_bytes"].get<int64_t>()),
                  j["kv_saving"].get<double>(), j["keep_rate"].get<double>(),
                  j["blocks"].get<std::string>().c_str());
    }
  }
  return 0;
}

}  // namespace kvgate::cli
