// kvgate generate / kvgate tokenize.
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/model_loading.h"
#include "cli/policy_options.h"
#include "engine/chat_template.h"
#include "engine/generate.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

namespace kvgate::cli {

namespace {

// Parses --isa; empty means the best this CPU has.
Result<engine::cpu::Isa> parse_isa(const std::string& s) {
  using engine::cpu::Isa;
  if (s.empty() || s == "auto") return engine::cpu::best_isa();
  Isa isa;
  if (s == "scalar") isa = Isa::kScalar;
  else if (s == "avx2") isa = Isa::kAvx2;
  else if (s == "avx512") isa = Isa::kAvx512;
  else return invalid_argument("option '--isa' must be auto, scalar, avx2 or avx512, got '" + s + "'");
  if (!engine::cpu::isa_supported(isa)) {
    return invalid_argument("option '--isa': this CPU does not support " + s);
  }
  return isa;
}

int usage_error(const ArgParser& p, const Status& s) {
  print_error(s.message());
  return 2;
}

}  // namespace

int run_generate(const std::vector<std::string>& args) {
  ArgParser p("kvgate generate",
              "Generates a completion for --prompt with the CPU engine and prints only the\n"
              "completion (streamed), or one JSON object with --json.");
  p.add_option("model", "PATH", "GGUF model file", kDefaultModel);
  p.add_option("prompt", "TEXT", "prompt text (required)");
  p.add_option("max-tokens", "N", "maximum number of tokens to generate", "128");
  p.add_option("temperature", "T", "sampling temperature; 0 = greedy", "0");
  p.add_option("top-k", "K", "keep the K most likely tokens; 0 = off", "0");
  p.add_option("top-p", "P", "nucleus sampling: keep tokens up to cumulative probability P", "1");
  p.add_option("min-p", "P", "keep tokens with probability >= P * the top probability; 0 = off", "0");
  p.add_option("repeat-penalty", "R", "penalty for tokens seen in the last 64; 1 = off", "1");
  p.add_option("seed", "S", "random seed for sampling", "0");
  p.add_option("stop", "TEXT", "stop when this text is generated (not included in the output)");
  p.add_flag("chat", "wrap the prompt in the model's chat template as a user message");
  p.add_option("system", "TEXT", "system message for --chat (default: the template's own)");
  p.add_flag("ignore-eos", "keep generating past end-of-sequence tokens");
  p.add_flag("json", "print one JSON object with tokens, text, counts and timings");
  p.add_option("policy", "P",
               "KV cache policy after prefill: dense, window, pod, h2o, snapkv, gate, gate+pod "
               "(gate and gate+pod need a calibrated gate file), or auto: gate+pod when the "
               "model has a gate file (--gate, or MODEL.gate.gguf), else dense",
               "auto");
  add_kv_policy_options(p);
  p.add_option("threads", "N", "CPU threads; 0 = all cores", "0");
  p.add_option("isa", "NAME", "kernel instruction set: auto, scalar (reference), avx2, avx512", "auto");
  if (Status s = p.parse(args); !s.ok()) return usage_error(p, s);
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  if (!p.has("prompt")) return usage_error(p, invalid_argument("option '--prompt' is required"));

  engine::GenerateOptions opt;
  auto max_tokens = p.get_int("max-tokens", 0, 1 << 20);
  auto temperature = p.get_double("temperature", 0, 100);
  auto top_k = p.get_int("top-k", 0, 1 << 30);
  auto top_p = p.get_double("top-p", 1e-9, 1);
  auto min_p = p.get_double("min-p", 0, 1);
  auto rep = p.get_double("repeat-penalty", 1e-6, 100);
  auto seed = p.get_int("seed", 0, INT64_MAX);
  auto threads = p.get_int("threads", 0, 1024);
  auto isa = parse_isa(p.get("isa"));
  for (const Status* s : {&max_tokens.status(), &temperature.status(), &top_k.status(),
                          &top_p.status(), &min_p.status(), &rep.status(), &seed.status(),
                          &threads.status(), &isa.status()}) {
    if (!s->ok()) return usage_error(p, *s);
  }
  opt.max_tokens = static_cast<int32_t>(*max_tokens);
  opt.sampling.temperature = static_cast<float>(*temperature);
  opt.sampling.top_k = static_cast<int32_t>(*top_k);
  opt.sampling.top_p = static_cast<float>(*top_p);
  opt.sampling.min_p = static_cast<float>(*min_p);
  opt.sampling.repetition_penalty = static_cast<float>(*rep);
  opt.sampling.seed = static_cast<uint64_t>(*seed);
  opt.ignore_eos = p.flag("ignore-eos");
  std::string policy_name = p.get("policy");
  if (policy_name == "auto") {
    // The calibrated compression is the default once a gate file exists.
    policy_name = find_gate_file(p.get("gate"), p.get("model")).path.empty() ? "dense" : "gate+pod";
  }
  {
    auto policy = engine::parse_kv_policy(policy_name);
    if (!policy.ok()) return usage_error(p, invalid_argument("option '--policy': " + policy.status().message()));
    auto config = parse_kv_policy_options(p);
    if (!config.ok()) return usage_error(p, config.status());
    opt.kv_policy = *config;
    opt.kv_policy.policy = *policy;
  }
  // A gate file is used by every compressed policy (it supplies the
  // calibrated sinks, window and blocks); dense skips the default one, but
  // an explicit --gate is always checked.
  GateSource gate_source = find_gate_file(p.get("gate"), p.get("model"));
  if (opt.kv_policy.policy == engine::KvPolicy::kDense && !gate_source.from_option) gate_source = {};
  if (Status s = check_gate_file_exists(gate_source); !s.ok()) {
    print_error(s.message());
    return 1;
  }
  if (p.has("stop")) opt.stop.push_back(p.get("stop"));

  auto loaded = load_model_and_tokenizer(p.get("model"));
  if (!loaded.ok()) {
    print_error(loaded.status().message());
    return 1;
  }
  const engine::LlamaModel& model = *loaded->model;
  const engine::Tokenizer& tok = *loaded->tokenizer;
  {
    auto gate = load_gate(gate_source, model);
    if (!gate.ok()) {
      print_error(gate.status().message());
      return 1;
    }
    opt.kv_policy.gate = *gate;
  }
  auto layout = engine::make_kv_layout(model.config(), opt.kv_policy);
  if (!layout.ok()) {
    print_error(layout.status().message());
    return 1;
  }
  std::string prompt = p.get("prompt");
  if (p.flag("chat")) {
    std::vector<engine::ChatMessage> msgs;
    if (p.has("system")) msgs.push_back({"system", p.get("system")});
    msgs.push_back({"user", prompt});
    auto rendered = engine::apply_chat_template(tok, msgs, true);
    if (!rendered.ok()) {
      print_error(rendered.status().message());
      return 1;
    }
    prompt = *rendered;
  }
  // Chat prompts carry control tokens; plain prompts are text only.
  std::vector<int32_t> ids = tok.encode(prompt, /*add_special=*/true, p.flag("chat"));

  engine::ForwardOptions fopt;
  fopt.n_threads = static_cast<int>(*threads);
  fopt.isa = *isa;
  engine::CpuForward forward(model, fopt);
  const bool json = p.flag("json");
  auto res = engine::generate(forward, tok, ids, opt, [&](std::string_view text) {
    if (!json) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
    }
  });
  if (!res.ok()) {
    if (!json) std::fputc('\n', stdout);
    print_error(res.status().message());
    return 1;
  }
  if (json) {
    nlohmann::json j;
    j["model"] = p.get("model");
    j["tokens"] = res->tokens;
    j["text"] = res->text;
    j["prompt_tokens"] = res->prompt_tokens;
    j["completion_tokens"] = res->tokens.size();
    j["finish_reason"] = res->finish_reason;
    j["prefill_seconds"] = res->prefill_seconds;
    j["decode_seconds"] = res->decode_seconds;
    j["prefill_tokens_per_s"] =
        res->prefill_seconds > 0 ? res->prompt_tokens / res->prefill_seconds : 0.0;
    const double decoded = res->tokens.size() > 1 ? static_cast<double>(res->tokens.size() - 1) : 0.0;
    j["decode_tokens_per_s"] = res->decode_seconds > 0 ? decoded / res->decode_seconds : 0.0;
    j["policy"] = engine::kv_policy_name(opt.kv_policy.policy);
    j["blocks"] = engine::kv_policy_blocks(opt.kv_policy);
    j["n_sink"] = layout->n_sink_tokens;
    j["n_window"] = layout->n_window_tokens;
    j["gate"] = gate_source.path.empty() ? nlohmann::json(nullptr) : nlohmann::json(gate_source.path);
    j["compress_seconds"] = res->compress_seconds;
    j["keep_rate"] = res->keep_rate;
    j["kv_dense_bytes"] = res->kv_dense_bytes;
    j["kv_bytes"] = res->kv_bytes;
    j["kv_saving"] = res->kv_dense_bytes > 0
                         ? 1.0 - static_cast<double>(res->kv_bytes) / res->kv_dense_bytes
                         : 0.0;
    j["threads"] = forward.n_threads();
    j["isa"] = engine::cpu::isa_name(fopt.isa);
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::fputc('\n', stdout);
  }
  return 0;
}

int run_tokenize(const std::vector<std::string>& args) {
  ArgParser p("kvgate tokenize", "Prints the token ids of TEXT as a JSON array.");
  p.add_positional("TEXT", "the text to tokenize");
  p.add_option("model", "PATH", "GGUF model file (its tokenizer is used)", kDefaultModel);
  p.add_flag("add-bos", "prepend the BOS token");
  p.add_flag("no-parse-special", "treat special-token text such as <|im_start|> as plain text");
  if (Status s = p.parse(args); !s.ok()) return usage_error(p, s);
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto file = engine::GgufFile::open(p.get("model"));
  if (!file.ok()) {
    print_error(p.get("model") + ": " + file.status().message());
    return 1;
  }
  auto spec = engine::tokenizer_spec_from_gguf(*file);
  if (!spec.ok()) {
    print_error(p.get("model") + ": " + spec.status().message());
    return 1;
  }
  auto tok = engine::Tokenizer::create(std::move(*spec));
  if (!tok.ok()) {
    print_error(p.get("model") + ": " + tok.status().message());
    return 1;
  }
  auto ids = tok->encode(p.positionals()[0], p.flag("add-bos"), !p.flag("no-parse-special"));
  std::printf("%s\n", nlohmann::json(ids).dump().c_str());
  return 0;
}

}  // namespace kvgate::cli
