// kvgate bench capacity: how many concurrent long requests one decode node's
// KV pool holds under each policy — measured with the real pieces, not
// computed from the formula:
//
//   per policy: one real prefill of a --prompt-tokens prompt of real English
//   text (engine::prefill_compressed, the prefill node's code), its wire
//   image (kvstore::export_wire_image); then, against one decode pool of
//   --pool-bytes (kvstore::PagePool + LeaseManager, the decode node's
//   accounting), admit requests the way the cluster does — the coordinator's
//   FootprintPredictor gives the reservation for prompt + --max-new-tokens
//   (its running keep-rate fed by each commit, as Commit messages feed it),
//   LeaseManager::grant reserves it, the image's pages land in the lease's
//   pages and are adopted in place (adopt_wire_image), the lease is
//   committed — until a grant is refused. The count of requests then held
//   is the measurement.
//
// Every admitted request holds a real adopted cache whose pages sit in the
// pool, and its lease keeps room for its decode growth (what the decode node
// needs to generate --max-new-tokens).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "cli/args.h"
#include "cli/bench_common.h"
#include "cli/commands.h"
#include "cli/model_loading.h"
#include "coordinator/footprint_predictor.h"
#include "engine/kv_policy_spec.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "engine/tokenizer.h"
#include "kvstore/lease_manager.h"
#include "kvstore/page_pool.h"
#include "kvstore/wire_image.h"

#ifndef KVGATE_SOURCE_DIR
#define KVGATE_SOURCE_DIR "."
#endif

namespace kvgate::cli {

namespace {

using nlohmann::json;

// The first --prompt-tokens tokens of the evaluation texts (fetched by
// scripts/fetch-eval-data.sh; text no calibration saw), else of a built-in
// paragraph repeated.
std::string prompt_text(const std::string& dir) {
  std::string text = read_text_files(dir, 400000);
  if (!text.empty()) return text;
  std::string s;
  for (int i = 0; i < 400; ++i) {
    s += "The harbour town woke slowly; fishermen mended nets, the baker opened early, and the "
         "tide carried gulls over the grey water while the bell of the old church counted hours. ";
  }
  return s;
}

struct PolicyResult {
  std::string policy;
  int64_t held = 0;
  int64_t reserve_bytes_first = 0;
  int64_t reserve_bytes_last = 0;
  int64_t image_bytes = 0;  // wire pages
  int64_t kv_bytes = 0;     // the formula
  int64_t dense_bytes = 0;
  double keep_rate = 0;
  double prefill_seconds = 0;
  int64_t extends = 0;  // reservations the image outgrew (the prefill node's Extend)
  std::string stop_reason;
};

Result<PolicyResult> measure(const engine::LlamaModel& model, const std::string& model_path,
                             const std::string& policy_name, std::span<const int32_t> prompt,
                             int64_t max_new, int64_t pool_bytes, int64_t page_tokens,
                             int threads, KvConfig kv) {
  auto choice = policy_choice_by_name(policy_name);
  if (!choice.ok()) return choice.status();
  kv.policy = *choice;
  auto policy = engine::kv_policy_from_config(kv, model_path, model);
  if (!policy.ok()) return policy.status();
  auto plan = engine::plan_kv_policy(model.config(), *policy);
  if (!plan.ok()) return plan.status();
  const int64_t page_bytes = page_tokens * model.config().head_dim * 2;

  // The prefill node's side: one real prefill and the wire image.
  engine::ForwardOptions fo;
  fo.n_threads = threads;
  engine::CpuForward forward(model, fo);
  auto src_bytes = engine::compressed_pool_bytes((*plan)->layout,
                                                 static_cast<int64_t>(prompt.size()), page_bytes);
  if (!src_bytes.ok()) return src_bytes.status();
  auto src_pool = kvstore::PagePool::create(page_bytes, *src_bytes);
  if (!src_pool.ok()) return src_pool.status();
  std::vector<float> logits(model.config().n_vocab);
  std::fprintf(stderr, "[kvgate] capacity: %s: prefill of %zu tokens...\n", policy_name.c_str(),
               prompt.size());
  auto pre = engine::prefill_compressed(forward, *plan, prompt, src_pool->get(), logits);
  if (!pre.ok()) return pre.status();
  auto image = kvstore::export_wire_image(pre->cache);
  if (!image.ok()) return image.status();

  PolicyResult out;
  out.policy = policy_name;
  out.image_bytes = image->total_bytes();
  out.kv_bytes = pre->cache.bytes();
  out.dense_bytes = kvstore::dense_bytes((*plan)->layout, static_cast<int64_t>(prompt.size()));
  out.keep_rate = engine::cache_keep_rate(pre->cache);
  out.prefill_seconds = pre->prefill_seconds + pre->compress_seconds;

  // The decode node's side, with the coordinator's predictor.
  auto predictor = coordinator::FootprintPredictor::create(**plan, page_tokens);
  if (!predictor.ok()) return predictor.status();
  auto pool = kvstore::PagePool::create(page_bytes, pool_bytes);
  if (!pool.ok()) return pool.status();
  auto leases = kvstore::LeaseManager::create(pool->get());
  if (!leases.ok()) return leases.status();
  struct Held {
    std::unique_ptr<kvstore::LeasePages> pages;
    std::optional<kvstore::CompressedKvCache> cache;
  };
  std::vector<Held> held;
  const auto now = kvstore::LeaseClock::now();
  for (int64_t i = 1;; ++i) {
    auto prediction = predictor->predict(static_cast<int64_t>(prompt.size()), max_new);
    if (!prediction.ok()) return prediction.status();
    if (i == 1) out.reserve_bytes_first = prediction->capacity_bytes;
    out.reserve_bytes_last = prediction->capacity_bytes;
    auto lease = (*leases)->grant(RequestId(static_cast<uint64_t>(i)), prediction->capacity_bytes,
                                  std::chrono::seconds(60), now);
    if (!lease.ok()) {
      out.stop_reason = lease.status().message();
      break;
    }
    const auto n_pages = static_cast<int64_t>(image->pages.size());
    auto pages = (*leases)->take_pages(*lease, (*leases)->pages_left(*lease));
    if (!pages.ok()) return pages.status();
    if (static_cast<int64_t>(pages->size()) < n_pages) {
      // The reservation is smaller than the image: the prefill node asks the
      // decode node to extend the lease (never truncates); refused when the
      // pool has no room left.
      ++out.extends;
      const int64_t missing = n_pages - static_cast<int64_t>(pages->size());
      auto grown = (*leases)->extend(*lease, missing * page_bytes, now);
      if (!grown.ok()) {
        out.stop_reason = "extend refused: " + grown.status().message();
        (void)(*leases)->release(*lease);
        break;
      }
      auto more = (*leases)->take_pages(*lease, missing);
      if (!more.ok()) return more.status();
      pages->insert(pages->end(), more->begin(), more->end());
    }
    for (int64_t p = 0; p < n_pages; ++p) {
      std::memcpy(pool->get()->data((*pages)[p]), src_pool->get()->data(image->pages[p]),
                  static_cast<size_t>(page_bytes));
    }
    Held h;
    h.pages = std::make_unique<kvstore::LeasePages>(leases->get(), *lease);
    auto cache = kvstore::adopt_wire_image((*plan)->layout, h.pages.get(), image->descriptor,
                                           *pages);
    if (!cache.ok()) return cache.status();
    h.cache.emplace(std::move(*cache));
    auto info = (*leases)->info(*lease);
    if (Status s = (*leases)->commit(*lease, info->granted_bytes, now); !s.ok()) return s;
    (void)predictor->observe(static_cast<int64_t>(prompt.size()), out.keep_rate);
    held.push_back(std::move(h));
    out.held = static_cast<int64_t>(held.size());
  }
  // Caches go before their page views, views before the leases (LeasePages).
  for (auto& h : held) h.cache.reset();
  held.clear();
  return out;
}

}  // namespace

int run_bench_capacity(const std::vector<std::string>& args) {
  ArgParser p("kvgate bench capacity",
              "How many concurrent requests of --prompt-tokens (+ --max-new-tokens) one decode\n"
              "node's pool of --pool-bytes holds under each policy, measured with a real prefill,\n"
              "its wire image, the coordinator's footprint predictor and the decode node's lease\n"
              "accounting (see cli/bench_capacity.cpp). Prints a table, or JSON with --json.");
  p.add_option("model", "PATH", "GGUF model file", kDefaultModel);
  p.add_option("policy", "LIST", "policies to compare", "dense,gate+pod");
  p.add_option("prompt-tokens", "N", "prompt length", "4096");
  p.add_option("max-new-tokens", "N", "completion budget reserved with each prompt", "128");
  p.add_option("pool-bytes", "SIZE", "the decode node's KV pool", "512MiB");
  p.add_option("page-tokens", "N", "tokens per KV page (decode.page_tokens)", "16");
  p.add_option("threads", "N", "CPU threads for the prefills; 0 = all cores", "0");
  p.add_option("text-dir", "DIR", "prompt text (default: eval-data/eval)");
  p.add_option("config", "FILE",
               "take the kv section (sinks, window, gate file, threshold offset, budget...) from "
               "this cluster config, as its nodes would (default: the kv defaults)");
  p.add_option("gate-threshold-offset", "X",
               "gate, gate+pod: added to every calibrated threshold (default: the config's "
               "kv.gate_threshold_offset)");
  p.add_flag("json", "print JSON");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto prompt_tokens = p.get_int("prompt-tokens", 1, 1 << 20);
  auto max_new = p.get_int("max-new-tokens", 0, 1 << 20);
  auto pool_bytes = parse_byte_size(p.get("pool-bytes"));
  auto page_tokens = p.get_int("page-tokens", 1, 4096);
  auto threads = p.get_int("threads", 0, 1024);
  for (const Status& s : {prompt_tokens.status(), max_new.status(), pool_bytes.status(),
                          page_tokens.status(), threads.status()}) {
    if (!s.ok()) {
      print_error(s.message());
      return 2;
    }
  }
  KvConfig kv;
  if (p.has("config")) {
    auto cfg = load_config_file(p.get("config"));
    if (!cfg.ok()) {
      print_error(cfg.status().message());
      return 1;
    }
    kv = cfg->base.kv;
  }
  if (p.has("gate-threshold-offset")) {
    auto off = p.get_double("gate-threshold-offset", -1e6, 1e6);
    if (!off.ok()) {
      print_error(off.status().message());
      return 2;
    }
    kv.gate_threshold_offset = *off;
  }
  const std::string model_path = p.get("model");
  auto model = engine::LlamaModel::load(model_path);
  if (!model.ok()) {
    print_error(model.status().message());
    return 1;
  }
  auto spec = engine::tokenizer_spec_from_gguf((*model)->gguf());
  if (!spec.ok()) {
    print_error(spec.status().message());
    return 1;
  }
  auto tok = engine::Tokenizer::create(std::move(*spec));
  if (!tok.ok()) {
    print_error(tok.status().message());
    return 1;
  }
  const std::string dir =
      p.has("text-dir") ? p.get("text-dir") : std::string(KVGATE_SOURCE_DIR) + "/eval-data/eval";
  std::vector<int32_t> ids = tok->encode(prompt_text(dir), true, false);
  if (static_cast<int64_t>(ids.size()) < *prompt_tokens) {
    print_error("the prompt text has only " + std::to_string(ids.size()) + " tokens");
    return 1;
  }
  ids.resize(static_cast<size_t>(*prompt_tokens));

  std::vector<PolicyResult> results;
  std::stringstream policies(p.get("policy"));
  std::string name;
  while (std::getline(policies, name, ',')) {
    auto r = measure(**model, model_path, name, ids, *max_new, *pool_bytes, *page_tokens,
                     static_cast<int>(*threads), kv);
    if (!r.ok()) {
      print_error(name + ": " + r.status().message());
      return 1;
    }
    results.push_back(*r);
  }
  const double base = results.empty() || results[0].held == 0 ? 0.0 : results[0].held;
  json j = {{"model", model_path},         {"prompt_tokens", *prompt_tokens},
            {"max_new_tokens", *max_new},  {"pool_bytes", *pool_bytes},
            {"page_tokens", *page_tokens}, {"gate_threshold_offset", kv.gate_threshold_offset},
            {"policies", json::array()}};
  for (const auto& r : results) {
    j["policies"].push_back({{"policy", r.policy},
                             {"requests_held", r.held},
                             {"vs_first", base > 0 ? r.held / base : 0.0},
                             {"reserve_bytes_first", r.reserve_bytes_first},
                             {"reserve_bytes_last", r.reserve_bytes_last},
                             {"image_bytes", r.image_bytes},
                             {"kv_bytes", r.kv_bytes},
                             {"dense_bytes", r.dense_bytes},
                             {"keep_rate", r.keep_rate},
                             {"prefill_seconds", r.prefill_seconds},
                             {"extends", r.extends},
                             {"stopped_by", r.stop_reason}});
  }
  if (p.flag("json")) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("decode pool %s, prompts of %lld tokens + %lld new, pages of %lld tokens\n",
              format_byte_size(*pool_bytes).c_str(), static_cast<long long>(*prompt_tokens),
              static_cast<long long>(*max_new), static_cast<long long>(*page_tokens));
  std::printf("%-9s %6s %7s %12s %12s %12s %12s %6s\n", "policy", "held", "vs 1st", "reserve/req",
              "image", "kv (formula)", "dense", "keep");
  for (const auto& r : results) {
    std::printf("%-9s %6lld %6.2fx %12lld %12lld %12lld %12lld %6.3f\n", r.policy.c_str(),
                static_cast<long long>(r.held), base > 0 ? r.held / base : 0.0,
                static_cast<long long>(r.reserve_bytes_last), static_cast<long long>(r.image_bytes),
                static_cast<long long>(r.kv_bytes), static_cast<long long>(r.dense_bytes),
                r.keep_rate);
  }
  return 0;
}

}  // namespace kvgate::cli
