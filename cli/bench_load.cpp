// kvgate bench load: an end-to-end load generator against any kvgate (or
// OpenAI-compatible) HTTP API — the disaggregated cluster (`kvgate up`) or
// a single colocated node (`kvgate serve`) — reporting what users feel:
// time to first token, inter-token latency and end-to-end latency
// percentiles, throughput and goodput (requests meeting a latency SLO).
//
// Closed loop: for each concurrency level C, C workers each send streaming
// /v1/completions requests back to back until --requests have been sent.
// Prompts are drawn from --prompt-tokens (a mix, chosen at random with
// --seed) and built from filler text so the server's own token count
// (usage.prompt_tokens) is close to the asked length; --output-tokens
// tokens are generated with ignore_eos, so every request does the same
// decode work. Progress is printed per request; the result is a table,
// and JSON with --json / --out.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/http_client.h"

namespace kvgate::cli {

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// ~1.25 tokens per word for SmolLM2's tokenizer on this kind of text.
constexpr const char* kFiller[] = {
    "The", "river", "carried", "old", "leaves", "past", "the", "mill,", "and", "the",
    "miller", "counted", "each", "one", "as", "a", "day", "gone", "by.", "Clouds",
    "gathered", "over", "the", "hills", "while", "children", "ran", "home", "for", "supper."};

std::string make_prompt(int64_t tokens, std::mt19937_64& rng) {
  const int64_t words = std::max<int64_t>(1, tokens * 4 / 5);
  std::string s = "Document " + std::to_string(rng() % 100000) + ": ";
  const size_t n = std::size(kFiller);
  size_t at = rng() % n;
  for (int64_t i = 0; i < words; ++i) {
    s += kFiller[at];
    s += ' ';
    at = (at + 1 + (rng() % 3 == 0 ? 1 : 0)) % n;
  }
  return s;
}

struct Sample {
  bool ok = false;
  std::string error;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double ttft_s = 0;                 // request sent -> first token
  double e2e_s = 0;                  // request sent -> last byte
  std::vector<double> itl_s;         // gaps between token events
};

// Splits SSE "data: ..." events out of the streamed body and timestamps the
// ones carrying text.
class SseTimer {
 public:
  explicit SseTimer(Clock::time_point start) : start_(start) {}
  void feed(std::string_view piece) {
    buf_.append(piece);
    size_t end;
    while ((end = buf_.find("\n\n")) != std::string::npos) {
      const std::string event = buf_.substr(0, end);
      buf_.erase(0, end + 2);
      if (event.rfind("data: ", 0) != 0) continue;
      const std::string payload = event.substr(6);
      if (payload == "[DONE]") continue;
      auto j = json::parse(payload, nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("usage") && j["usage"].is_object()) {
        prompt_tokens_ = j["usage"].value("prompt_tokens", int64_t{0});
        completion_tokens_ = j["usage"].value("completion_tokens", int64_t{0});
      }
      if (j.contains("error")) error_ = j["error"].value("message", "error event");
      if (!j.contains("choices") || j["choices"].empty()) continue;
      const std::string text = j["choices"][0].value("text", "");
      if (text.empty()) continue;
      const auto now = Clock::now();
      if (!first_) {
        first_ = true;
        ttft_s_ = std::chrono::duration<double>(now - start_).count();
      } else {
        itl_s_.push_back(std::chrono::duration<double>(now - last_).count());
      }
      last_ = now;
    }
  }
  bool first_ = false;
  double ttft_s_ = 0;
  std::vector<double> itl_s_;
  int64_t prompt_tokens_ = 0, completion_tokens_ = 0;
  std::string error_;

 private:
  Clock::time_point start_, last_;
  std::string buf_;
};

Sample run_one(const HostPort& at, const std::string& key, const std::string& model,
               const std::string& prompt, int64_t output_tokens) {
  json body = {{"model", model},     {"prompt", prompt},       {"max_tokens", output_tokens},
               {"temperature", 0},   {"stream", true},         {"ignore_eos", true},
               {"stream_options", {{"include_usage", true}}}};
  const auto t0 = Clock::now();
  SseTimer timer(t0);
  auto r = http_exchange(at, http_request("POST", at, "/v1/completions", key, body.dump()),
                         std::chrono::minutes(30), [&](std::string_view p) { timer.feed(p); });
  Sample s;
  s.e2e_s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!r.ok()) {
    s.error = r.status().message();
    return s;
  }
  if (r->status != 200) {
    s.error = "HTTP " + std::to_string(r->status) + ": " + r->body.substr(0, 200);
    return s;
  }
  if (!timer.error_.empty()) {
    s.error = timer.error_;
    return s;
  }
  s.ok = timer.first_;
  if (!s.ok) s.error = "no token in the stream";
  s.ttft_s = timer.ttft_s_;
  s.itl_s = std::move(timer.itl_s_);
  s.prompt_tokens = timer.prompt_tokens_;
  s.completion_tokens = timer.completion_tokens_;
  return s;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const double rank = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - static_cast<double>(lo));
}

json summarize(const std::vector<Sample>& samples, double wall_s, double slo_ttft_s,
               double slo_itl_s) {
  std::vector<double> ttft, itl, e2e;
  int64_t ok = 0, good = 0, out_tokens = 0, in_tokens = 0;
  std::vector<std::string> errors;
  for (const auto& s : samples) {
    if (!s.ok) {
      if (errors.size() < 5) errors.push_back(s.error);
      continue;
    }
    ++ok;
    ttft.push_back(s.ttft_s);
    e2e.push_back(s.e2e_s);
    itl.insert(itl.end(), s.itl_s.begin(), s.itl_s.end());
    out_tokens += s.completion_tokens;
    in_tokens += s.prompt_tokens;
    double mean_itl = 0;
    for (double x : s.itl_s) mean_itl += x;
    if (!s.itl_s.empty()) mean_itl /= static_cast<double>(s.itl_s.size());
    if (s.ttft_s <= slo_ttft_s && mean_itl <= slo_itl_s) ++good;
  }
  auto pcts = [](const std::vector<double>& v) {
    return json{{"p50_ms", percentile(v, 50) * 1e3},
                {"p90_ms", percentile(v, 90) * 1e3},
                {"p99_ms", percentile(v, 99) * 1e3}};
  };
  return json{{"requests", samples.size()},
              {"ok", ok},
              {"failed", static_cast<int64_t>(samples.size()) - ok},
              {"errors", errors},
              {"wall_s", wall_s},
              {"ttft", pcts(ttft)},
              {"itl", pcts(itl)},
              {"e2e", pcts(e2e)},
              {"prompt_tokens", in_tokens},
              {"completion_tokens", out_tokens},
              {"throughput_tokens_per_s", static_cast<double>(out_tokens) / wall_s},
              {"requests_per_s", static_cast<double>(ok) / wall_s},
              {"goodput_requests_per_s", static_cast<double>(good) / wall_s}};
}

Result<std::vector<int64_t>> int_list(const std::string& text, const char* what) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v <= 0) {
      return invalid_argument(std::string("option '--") + what +
                              "' must be a comma-separated list of positive integers, got '" +
                              text + "'");
    }
    out.push_back(v);
  }
  if (out.empty()) return invalid_argument(std::string("option '--") + what + "' is empty");
  return out;
}

}  // namespace

int run_bench_load(const std::vector<std::string>& args) {
  ArgParser p("kvgate bench load",
              "End-to-end load against a running kvgate HTTP API (kvgate up or kvgate serve):\n"
              "streaming /v1/completions from --concurrency workers in a closed loop; prints\n"
              "TTFT, inter-token and end-to-end latency percentiles, throughput and goodput\n"
              "(requests with TTFT <= --slo-ttft-ms and mean inter-token latency <=\n"
              "--slo-itl-ms) per concurrency level.");
  p.add_option("url", "HOST:PORT", "the API's address", "127.0.0.1:8000");
  p.add_option("api-key", "KEY", "bearer key (none when the API runs with auth disabled)");
  p.add_option("model", "NAME", "model name in the requests", "SmolLM2-135M-Instruct");
  p.add_option("concurrency", "LIST", "concurrency levels, e.g. 1,2,4", "1,2,4");
  p.add_option("requests", "N", "requests per concurrency level", "16");
  p.add_option("prompt-tokens", "LIST", "prompt lengths drawn at random, e.g. 256,1024", "256,1024");
  p.add_option("output-tokens", "N", "tokens generated per request (ignore_eos)", "32");
  p.add_option("slo-ttft-ms", "MS", "goodput: largest time to first token", "2000");
  p.add_option("slo-itl-ms", "MS", "goodput: largest mean inter-token latency", "200");
  p.add_option("seed", "S", "prompt mix seed", "1");
  p.add_option("label", "TEXT", "name of this run in the JSON (e.g. cluster, colocated)", "run");
  p.add_option("out", "FILE", "also write the JSON result here");
  p.add_flag("json", "print the JSON result instead of the table");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto at = parse_host_port(p.get("url"));
  auto levels = int_list(p.get("concurrency"), "concurrency");
  auto lengths = int_list(p.get("prompt-tokens"), "prompt-tokens");
  auto n_requests = p.get_int("requests", 1, 1 << 20);
  auto output_tokens = p.get_int("output-tokens", 1, 1 << 20);
  auto slo_ttft = p.get_double("slo-ttft-ms", 0, 1e9);
  auto slo_itl = p.get_double("slo-itl-ms", 0, 1e9);
  auto seed = p.get_int("seed", 0, int64_t{1} << 62);
  for (const Status& s : {at.status(), levels.status(), lengths.status(), n_requests.status(),
                          output_tokens.status(), slo_ttft.status(), slo_itl.status(),
                          seed.status()}) {
    if (!s.ok()) {
      print_error(s.message());
      return 2;
    }
  }
  const HostPort api{reachable_host(at->host), at->port};
  const std::string key = p.get("api-key");
  const std::string model = p.get("model");

  json result = {{"label", p.get("label")},
                 {"url", api.to_string()},
                 {"model", model},
                 {"prompt_tokens_mix", *lengths},
                 {"output_tokens", *output_tokens},
                 {"slo", {{"ttft_ms", *slo_ttft}, {"itl_ms", *slo_itl}}},
                 {"levels", json::array()}};
  for (int64_t level : *levels) {
    std::mt19937_64 rng(static_cast<uint64_t>(*seed) * 7919 + static_cast<uint64_t>(level));
    std::vector<std::string> prompts;
    for (int64_t i = 0; i < *n_requests; ++i) {
      prompts.push_back(make_prompt((*lengths)[rng() % lengths->size()], rng));
    }
    std::vector<Sample> samples(prompts.size());
    std::atomic<int64_t> next{0}, done{0};
    std::mutex print_mu;
    const auto t0 = Clock::now();
    std::vector<std::thread> workers;
    for (int64_t w = 0; w < level; ++w) {
      workers.emplace_back([&] {
        while (true) {
          const int64_t i = next.fetch_add(1);
          if (i >= static_cast<int64_t>(prompts.size())) return;
          samples[i] = run_one(api, key, model, prompts[i], *output_tokens);
          const int64_t d = done.fetch_add(1) + 1;
          std::lock_guard<std::mutex> lock(print_mu);
          std::fprintf(stderr, "\r[kvgate] load c=%lld: %lld/%zu requests%s",
                       static_cast<long long>(level), static_cast<long long>(d), prompts.size(),
                       samples[i].ok ? "" : (" (failed: " + samples[i].error + ")").c_str());
          if (!samples[i].ok) std::fputc('\n', stderr);
        }
      });
    }
    for (auto& t : workers) t.join();
    std::fputc('\n', stderr);
    const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
    json level_json = summarize(samples, wall, *slo_ttft / 1e3, *slo_itl / 1e3);
    level_json["concurrency"] = level;
    result["levels"].push_back(level_json);
  }

  if (p.has("out")) {
    std::ofstream out(p.get("out"));
    out << result.dump(2) << "\n";
    if (!out) {
      print_error("cannot write " + p.get("out"));
      return 1;
    }
  }
  if (p.flag("json")) {
    std::printf("%s\n", result.dump(2).c_str());
  } else {
    std::printf("%s @ %s, prompts %s tokens, %lld output tokens\n", p.get("label").c_str(),
                api.to_string().c_str(), p.get("prompt-tokens").c_str(),
                static_cast<long long>(*output_tokens));
    std::printf("%5s %5s %6s | %9s %9s | %9s %9s | %9s | %9s %8s %8s\n", "conc", "ok", "fail",
                "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p99", "tok/s", "req/s",
                "good/s");
    auto num = [](const json& v) { return v.is_number() ? v.get<double>() : NAN; };
    for (const auto& l : result["levels"]) {
      std::printf("%5lld %5lld %6lld | %7.0fms %7.0fms | %7.1fms %7.1fms | %7.0fms | %9.1f %8.2f %8.2f\n",
                  static_cast<long long>(l["concurrency"].get<int64_t>()),
                  static_cast<long long>(l["ok"].get<int64_t>()),
                  static_cast<long long>(l["failed"].get<int64_t>()),
                  num(l["ttft"]["p50_ms"]), num(l["ttft"]["p99_ms"]),
                  num(l["itl"]["p50_ms"]), num(l["itl"]["p99_ms"]),
                  num(l["e2e"]["p99_ms"]), num(l["throughput_tokens_per_s"]),
                  num(l["requests_per_s"]), num(l["goodput_requests_per_s"]));
    }
  }
  int failed = 0;
  for (const auto& l : result["levels"]) failed += l["failed"].get<int>();
  return failed == 0 ? 0 : 1;
}

}  // namespace kvgate::cli
