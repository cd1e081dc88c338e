// kvgate calibrate: layer grouping and Attention-Gate training for a model
// (engine/calibrate.h), written as a gate side file (engine/gate_file.h).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/model_loading.h"
#include "engine/calibrate.h"
#include "engine/gate_file.h"
#include "engine/threshold_fit.h"

namespace kvgate::cli {
namespace {

int fail(const Status& s) {
  print_error(s.message());
  return s.code() == StatusCode::kInvalidArgument ? 2 : 1;
}

// Every *.txt file of `dir`, sorted by name.
Result<std::vector<std::string>> text_files(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return not_found(dir + ": no such directory (run scripts/fetch-eval-data.sh for the default texts)");
  }
  std::vector<std::string> out;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.is_regular_file() && entry.path().extension() == ".txt") out.push_back(entry.path().string());
  }
  std::sort(out.begin(), out.end());
  if (out.empty()) return not_found(dir + ": no .txt files");
  return out;
}

}  // namespace

int run_calibrate(const std::vector<std::string>& args) {
  ArgParser p("calibrate",
              "Calibrates KV compression for a model: groups layers by the similarity of their\n"
              "attention over distant tokens (PoD), then trains one Attention-Gate per (block,\n"
              "KV head) from the model's own attention (the model runs forward only). Writes the\n"
              "gate side file that the gate and gate+pod policies load. Finally fits the gates'\n"
              "thresholds at the serving length (--fit-tokens) as the served gates compute them,\n"
              "spreading the keep budget over heads by the attention mass they keep (--allocation).\n"
              "--refit FILE does only that last step for an existing gate file.");
  p.add_option("model", "PATH", "GGUF model", kDefaultModel);
  p.add_option("texts", "DIR", "directory of .txt calibration texts (keep them apart from eval text)",
               "eval-data/calib");
  p.add_option("out", "FILE", "gate side file to write (default: MODEL with .gate.gguf)");
  p.add_option("delta", "X", "layer grouping threshold: 1 - JSD between a layer's attention and its attention with the base layer's distant scores, in [0, 1]", "0.95");
  p.add_option("max-block", "N", "largest block of layers (0 = no cap)", "8");
  p.add_option("kind", "K", "gate kind: attention or linear", "attention");
  p.add_option("gate-context", "C",
               "attention gate: what a token's gate attends over — window (sinks and window: no gate "
               "state for retained tokens) or cache (also the retained tokens)",
               "window");
  p.add_option("gate-heads", "N", "attention gate: heads h'", "2");
  p.add_option("gate-head-dim", "N", "attention gate: head width d'", "4");
  p.add_option("keep-rate", "R", "target share of distant tokens kept", "0.3");
  p.add_option("teacher", "T",
               "token importance the gates learn: mean (attention received from the queries for "
               "which it is distant) or max (the largest attention one of them gives it)",
               "mean");
  p.add_option("keep-weight", "X", "weight of the keep-rate term in the loss", "1.0");
  p.add_option("grouping-sequences", "N", "sequences for the layer grouping", "8");
  p.add_option("grouping-tokens", "N", "tokens per grouping sequence", "2048");
  p.add_option("grouping-probes", "FILE",
               "retrieval probes (texts separated by form-feed lines, each ending where the model "
               "retrieves an earlier fact; scripts/make-retrieval-texts.py --probes): layers share "
               "distant scores only if they also agree on the probes' last queries");
  p.add_option("sequences", "N", "training sequences", "160");
  p.add_option("tokens", "N", "tokens per training sequence", "1024");
  p.add_option("epochs", "N", "passes over the training sequences", "3");
  p.add_option("lr", "X", "Adam learning rate", "0.003");
  p.add_option("n-sink", "N", "sink tokens (never evicted)", "4");
  p.add_option("n-window", "N", "recent-window tokens (kept in every layer)", "256");
  p.add_option("seed", "N", "random seed (sequence choice, initialization)", "1");
  p.add_option("threads", "N", "threads (0 = all cores)", "0");
  p.add_option("fit-tokens", "N",
               "serving length the thresholds are fitted at with the served gate semantics "
               "(0: keep the training-length quantiles)", "4096");
  p.add_option("fit-sequences", "N", "sequences of --fit-tokens for the threshold fit", "4");
  p.add_option("fit-rounds", "N", "threshold fit: threshold <-> logit iterations", "6");
  p.add_option("allocation", "A",
               "threshold fit: uniform (every head keeps --keep-rate) or mass (one byte budget, "
               "spent on the heads whose distant tokens get the most attention)", "mass");
  p.add_option("min-keep-rate", "R", "allocation mass: the least share any head keeps", "0.1");
  p.add_option("refit", "FILE",
               "only refit the thresholds of this gate file (its gates and block map unchanged); "
               "--keep-rate, the --fit-* options and --allocation apply");
  p.add_flag("quiet", "no progress on stderr");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::printf("%s", p.help().c_str());
    return 0;
  }
  engine::CalibrationOptions opt;
  auto get_int = [&](const char* name, int64_t lo, int64_t hi, int64_t& dst) -> Status {
    auto v = p.get_int(name, lo, hi);
    if (!v.ok()) return v.status();
    dst = *v;
    return Status();
  };
  auto get_double = [&](const char* name, double lo, double hi, double& dst) -> Status {
    auto v = p.get_double(name, lo, hi);
    if (!v.ok()) return v.status();
    dst = *v;
    return Status();
  };
  int64_t threads = 0;
  int64_t seed = 1;
  engine::ThresholdFitOptions fit;
  for (const Status& s :
       {get_double("delta", 0.0, 1.0, opt.similarity_threshold),
        get_int("max-block", 0, 1024, opt.max_block_layers), get_int("gate-heads", 1, 64, opt.n_gate_heads),
        get_int("gate-head-dim", 1, 64, opt.gate_head_dim),
        get_double("keep-rate", 0.001, 0.999, opt.target_keep_rate),
        get_double("keep-weight", 0.0, 1e6, opt.keep_rate_weight),
        get_int("grouping-sequences", 1, 100000, opt.grouping_sequences),
        get_int("grouping-tokens", 2, 1 << 20, opt.grouping_tokens),
        get_int("sequences", 2, 1000000, opt.train_sequences), get_int("tokens", 2, 1 << 20, opt.train_tokens),
        get_int("epochs", 1, 1000, opt.epochs), get_double("lr", 1e-9, 10.0, opt.learning_rate),
        get_int("n-sink", 0, 1 << 20, opt.n_sink_tokens), get_int("n-window", 1, 1 << 20, opt.n_window_tokens),
        get_int("seed", 0, int64_t{1} << 62, seed), get_int("threads", 0, 1024, threads),
        get_int("fit-tokens", 0, 1 << 20, fit.tokens), get_int("fit-sequences", 1, 100000, fit.sequences),
        get_int("fit-rounds", 1, 1000, fit.rounds),
        get_double("min-keep-rate", 0.0, 1.0, fit.min_keep_rate)}) {
    if (!s.ok()) {
      print_error(s.message());
      return 2;
    }
  }
  opt.seed = static_cast<uint64_t>(seed);
  auto kind = engine::parse_gate_kind(p.get("kind"));
  if (!kind.ok()) return fail(invalid_argument("option '--kind': " + kind.status().message()));
  opt.kind = *kind;
  auto context = engine::parse_gate_context(p.get("gate-context"));
  if (!context.ok()) return fail(invalid_argument("option '--gate-context': " + context.status().message()));
  opt.gate_context = *context;
  if (p.get("teacher") == "max") {
    opt.teacher = engine::CalibrationOptions::Teacher::kMax;
  } else if (p.get("teacher") != "mean") {
    print_error("option '--teacher' must be mean or max, got '" + p.get("teacher") + "'");
    return 2;
  }
  auto allocation = engine::parse_keep_allocation(p.get("allocation"));
  if (!allocation.ok()) return fail(invalid_argument("option '--allocation': " + allocation.status().message()));
  fit.allocation = *allocation;
  fit.target_keep_rate = opt.target_keep_rate;
  fit.min_distant_queries = opt.min_distant_queries;
  const bool refit = p.has("refit");
  if (refit && fit.tokens == 0) return fail(invalid_argument("--refit needs --fit-tokens > 0"));
  if (Status s = opt.validate(); !s.ok()) return fail(s);
  if (fit.tokens > 0) {
    if (Status s = fit.validate(); !s.ok()) return fail(s);
  }
  const std::string out_path = p.has("out") ? p.get("out") : gate_path_for_model(p.get("model"));

  auto files = text_files(p.get("texts"));
  if (!files.ok()) return fail(files.status());
  auto loaded = load_model_and_tokenizer(p.get("model"));
  if (!loaded.ok()) return fail(Status(StatusCode::kNotFound, loaded.status().message()));
  std::vector<std::vector<int32_t>> documents;
  int64_t total_tokens = 0;
  for (const auto& f : *files) {
    std::ifstream in(f, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    documents.push_back(loaded->tokenizer->encode(ss.str(), false, false));
    total_tokens += static_cast<int64_t>(documents.back().size());
  }
  if (p.has("grouping-probes")) {
    std::ifstream in(p.get("grouping-probes"), std::ios::binary);
    if (!in) return fail(not_found(p.get("grouping-probes") + ": cannot read the grouping probes"));
    std::ostringstream ss;
    ss << in.rdbuf();
    const std::string all = ss.str();
    size_t begin = 0;
    while (begin <= all.size()) {
      size_t end = all.find('\f', begin);
      if (end == std::string::npos) end = all.size();
      std::string text = all.substr(begin, end - begin);
      const size_t a = text.find_first_not_of(" \t\r\n");
      const size_t b = text.find_last_not_of(" \t\r\n");
      if (a != std::string::npos) {
        opt.grouping_probes.push_back(loaded->tokenizer->encode(text.substr(a, b - a + 1), false, false));
      }
      begin = end + 1;
    }
    if (opt.grouping_probes.empty()) {
      return fail(invalid_argument(p.get("grouping-probes") + ": no probe texts"));
    }
    if (Status s = opt.validate(); !s.ok()) return fail(invalid_argument(p.get("grouping-probes") + ": " + s.message()));
  }
  const bool quiet = p.flag("quiet");
  if (!quiet) {
    std::fprintf(stderr, "calibration texts: %zu files, %lld tokens (%s)\n", files->size(),
                 static_cast<long long>(total_tokens), p.get("texts").c_str());
  }
  engine::ForwardOptions fopt;
  fopt.n_threads = static_cast<int>(threads);
  engine::CpuForward forward(*loaded->model, fopt);
  const auto t0 = std::chrono::steady_clock::now();
  auto progress = [&](const engine::CalibrationProgress& pr) {
    if (quiet) return;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int width = 30;
    const int filled = pr.total > 0 ? static_cast<int>(width * pr.done / pr.total) : 0;
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(width, '.');
    std::fprintf(stderr, "\r%-11s [%s] %lld/%lld", std::string(pr.stage).c_str(), bar.c_str(),
                 static_cast<long long>(pr.done), static_cast<long long>(pr.total));
    if (pr.stage == "training") std::fprintf(stderr, "  loss %.4f", pr.loss);
    std::fprintf(stderr, "  %5.0fs ", secs);
    if (pr.done == pr.total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  };
  engine::CalibrationReport report;
  Result<engine::GateModel> gate = internal_error("no gate");
  if (refit) {
    gate = engine::load_gate_for_model(p.get("refit"), *loaded->model);
    if (!gate.ok()) return fail(gate.status());
  } else {
    gate = engine::calibrate(forward, documents, opt, progress, &report);
    if (!gate.ok()) return fail(Status(StatusCode::kInternal, gate.status().message()));
    gate->calibration_note += "; texts " + p.get("texts") + " (" + std::to_string(total_tokens) +
                              " tokens); delta " + p.get("delta") + ", keep-rate " + p.get("keep-rate") +
                              ", kind " + p.get("kind") +
                              ", context " + p.get("gate-context");
  }
  engine::ThresholdFitReport fit_report;
  fit.probes = opt.grouping_probes;
  fit.probe_queries = opt.probe_queries;
  if (fit.tokens > 0) {
    auto fit_progress = [&](const engine::ThresholdFitProgress& pr) {
      progress({pr.stage, pr.done, pr.total, 0.0});
    };
    if (Status s = engine::fit_thresholds(forward, documents, *gate, fit, fit_progress, &fit_report); !s.ok()) {
      return fail(s);
    }
    gate->target_keep_rate = fit.target_keep_rate;
    gate->calibration_note += "; thresholds fitted at " + std::to_string(fit.tokens) + " tokens (" +
                              std::to_string(fit.sequences) + " sequences of " + p.get("texts") +
                              (fit.probes.empty() ? std::string()
                                                  : " and " + std::to_string(fit.probes.size()) + " retrieval probes") +
                              ", served gate semantics), allocation " +
                              engine::keep_allocation_name(fit.allocation) + ", keep-rate " +
                              p.get("keep-rate") + ", min-keep-rate " + p.get("min-keep-rate");
  }
  if (Status s = engine::save_gate_file(out_path, *gate); !s.ok()) return fail(s);

  if (!refit) {
    std::printf("block map (delta %.3f, %lld slots):\n%s", opt.similarity_threshold,
                static_cast<long long>(gate->blocks.n_slots()), report.block_map.c_str());
    std::printf("adjacent-layer sharing similarity (1 - JSD, layer l using layer l-1's distant scores)");
    if (!report.probe_similarity.empty()) {
      std::printf(", min of the texts' and the %zu retrieval probes'", opt.grouping_probes.size());
    }
    std::printf(":");
    const int64_t L = gate->blocks.n_layers();
    const auto print_row = [&](const char* what, int64_t h, const std::vector<std::vector<double>>& m) {
      std::printf("\n  head %lld%s:", static_cast<long long>(h), what);
      for (int64_t l = 0; l + 1 < L; ++l) std::printf(" %.2f", m[h][l * L + l + 1]);
    };
    for (int64_t h = 0; h < gate->blocks.n_kv_heads(); ++h) {
      print_row("", h, report.similarity);
      if (!report.probe_similarity.empty()) {
        print_row(" texts ", h, report.text_similarity);
        print_row(" probes", h, report.probe_similarity);
      }
    }
    std::printf("\ntraining loss per epoch:");
    for (double x : report.epoch_loss) std::printf(" %.4f", x);
    std::printf("\nheld-out (training length, full-context logits): keep rate %.3f, teacher attention mass "
                "kept %.3f (oracle at the same rate %.3f, random %.3f)\n",
                report.holdout_keep_rate, report.holdout_mass_gate, report.holdout_mass_oracle,
                opt.target_keep_rate);
    std::printf("time: grouping %.0f s (%lld tokens), collecting %.0f s (%lld tokens), training %.0f s\n",
                report.seconds_grouping, static_cast<long long>(report.grouping_tokens_seen),
                report.seconds_collecting, static_cast<long long>(report.training_tokens_seen),
                report.seconds_training);
  }
  if (fit.tokens > 0) {
    std::printf("threshold fit at %lld tokens (%s, %lld tokens, %.0f s): keep rate %.3f, retained bytes "
                "%.3f of keeping every distant token, teacher attention mass kept %.3f\n",
                static_cast<long long>(fit.tokens), engine::keep_allocation_name(fit.allocation),
                static_cast<long long>(fit_report.tokens_seen), fit_report.seconds, fit_report.keep_rate,
                fit_report.bytes_share, fit_report.mass_kept);
    std::printf("keep rate per slot (block map order):");
    for (double r : fit_report.slot_keep_rate) std::printf(" %.2f", r);
    std::printf("\n");
  }
  std::printf("wrote %s\n", out_path.c_str());
  return 0;
}

}  // namespace kvgate::cli
