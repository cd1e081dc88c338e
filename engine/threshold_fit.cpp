#include "engine/threshold_fit.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>

#include "engine/calibrate.h"
#include "engine/gate_runtime.h"
#include "kvstore/layout.h"

namespace kvgate::engine {
namespace {

// A piece of a slot's upper concave hull: keep items [from, to) for `slope`
// teacher mass per byte.
struct HullSegment {
  int64_t slot = 0;
  int64_t from = 0, to = 0;
  double slope = 0.0;
};

// Upper concave hull of the cumulative value curve of one slot from item
// `from` on, sampled every `step` items (and at the end).
void hull_segments(int64_t slot, const std::vector<float>& values, int64_t from, int64_t bytes,
                   std::vector<HullSegment>& out) {
  const auto n = static_cast<int64_t>(values.size());
  if (from >= n) return;
  const int64_t step = std::max<int64_t>(1, (n - from) / 256);
  std::vector<int64_t> xs;
  std::vector<double> ys;
  double cum = 0.0;
  xs.push_back(from);
  ys.push_back(0.0);
  for (int64_t k = from; k < n; ++k) {
    cum += values[k];
    if ((k + 1 - from) % step == 0 || k + 1 == n) {
      xs.push_back(k + 1);
      ys.push_back(cum);
    }
  }
  // Monotone chain, upper hull: drop a middle point on or below the chord.
  std::vector<size_t> h;
  for (size_t i = 0; i < xs.size(); ++i) {
    while (h.size() >= 2) {
      const size_t a = h[h.size() - 2], b = h.back();
      const double cross = (static_cast<double>(xs[b] - xs[a])) * (ys[i] - ys[a]) -
                           (ys[b] - ys[a]) * static_cast<double>(xs[i] - xs[a]);
      if (cross >= 0.0) {
        h.pop_back();
      } else {
        break;
      }
    }
    h.push_back(i);
  }
  for (size_t i = 0; i + 1 < h.size(); ++i) {
    const size_t a = h[i], b = h[i + 1];
    out.push_back({slot, xs[a], xs[b],
                   (ys[b] - ys[a]) / (static_cast<double>(xs[b] - xs[a]) * static_cast<double>(bytes))});
  }
}

}  // namespace

Result<KeepAllocation> parse_keep_allocation(std::string_view name) {
  if (name == "uniform") return KeepAllocation::kUniform;
  if (name == "mass") return KeepAllocation::kMass;
  return invalid_argument("unknown keep allocation '" + std::string(name) + "' (known: uniform, mass)");
}

const char* keep_allocation_name(KeepAllocation a) {
  return a == KeepAllocation::kUniform ? "uniform" : "mass";
}

Status ThresholdFitOptions::validate() const {
  if (sequences < 1) return invalid_argument("fit sequences must be >= 1");
  if (!(target_keep_rate > 0.0 && target_keep_rate < 1.0)) {
    return invalid_argument("fit target_keep_rate must be in (0, 1)");
  }
  if (!(min_keep_rate >= 0.0 && min_keep_rate <= target_keep_rate)) {
    return invalid_argument("min_keep_rate must be in [0, target keep rate]");
  }
  if (rounds < 1) return invalid_argument("fit rounds must be >= 1");
  if (min_distant_queries < 1) return invalid_argument("min_distant_queries must be >= 1");
  if (probe_queries < 1) return invalid_argument("probe_queries must be >= 1");
  return Status();
}

std::vector<int64_t> allocate_keep(std::span<const std::vector<float>> values_by_rank,
                                   std::span<const int64_t> bytes_per_token, double budget_bytes,
                                   double min_rate) {
  const auto n_slots = static_cast<int64_t>(values_by_rank.size());
  std::vector<int64_t> keep(static_cast<size_t>(n_slots), 0);
  double budget = budget_bytes;
  for (int64_t s = 0; s < n_slots; ++s) {
    const auto n = static_cast<int64_t>(values_by_rank[s].size());
    keep[s] = std::min<int64_t>(n, static_cast<int64_t>(std::ceil(min_rate * static_cast<double>(n))));
    budget -= static_cast<double>(keep[s] * bytes_per_token[s]);
  }
  std::vector<HullSegment> segs;
  for (int64_t s = 0; s < n_slots; ++s) {
    hull_segments(s, values_by_rank[s], keep[s], bytes_per_token[s], segs);
  }
  // Within a slot the hull's slopes strictly decrease, so a stable sort by
  // slope keeps each slot's segments in order: every slot keeps a prefix.
  std::stable_sort(segs.begin(), segs.end(),
                   [](const HullSegment& a, const HullSegment& b) { return a.slope > b.slope; });
  for (const HullSegment& g : segs) {
    if (budget <= 0.0 || g.slope <= 0.0) break;
    if (keep[g.slot] != g.from) continue;  // an earlier segment was cut short
    const int64_t bytes = bytes_per_token[g.slot];
    const int64_t affordable = static_cast<int64_t>(std::floor(budget / static_cast<double>(bytes)));
    const int64_t take = std::min(g.to - g.from, affordable);
    keep[g.slot] += take;
    budget -= static_cast<double>(take * bytes);
    if (take < g.to - g.from) break;
  }
  return keep;
}

std::vector<float> teacher_importance(const AttentionStats& stats, const kvstore::BlockMap& blocks,
                                      int64_t group, int64_t n_window) {
  const int64_t t_len = stats.n_tokens;
  const int64_t n_slots = blocks.n_slots();
  std::vector<float> imp(static_cast<size_t>(n_slots * t_len), 0.0f);
  for (int64_t s = 0; s < n_slots; ++s) {
    const int64_t h = blocks.slot_head(s);
    const auto block = blocks.slot_block(s);
    float* dst = imp.data() + s * t_len;
    for (int64_t l = block.first_layer; l < block.end_layer(); ++l) {
      const float* row = stats.received_distant_row(l, h);
      for (int64_t t = 0; t < t_len; ++t) {
        const int64_t n_queries = t_len - t - n_window;
        if (n_queries > 0) dst[t] += row[t] / static_cast<float>(n_queries * group * block.n_layers);
      }
    }
  }
  return imp;
}

std::vector<float> captured_importance(const AttentionStats& stats, const kvstore::BlockMap& blocks,
                                       int64_t group, int64_t n_sink, int64_t n_window) {
  const int64_t t_len = stats.n_tokens;
  const int64_t n_q = stats.n_captured();
  std::vector<float> imp(static_cast<size_t>(blocks.n_slots() * t_len), 0.0f);
  std::vector<double> p;
  for (int64_t qi = 0; qi < n_q; ++qi) {
    const int64_t pos = stats.capture_from + qi;
    const int64_t hi = pos + 1 - n_window;
    if (hi <= n_sink) continue;
    for (int64_t l = 0; l < blocks.n_layers(); ++l) {
      for (int64_t qh = 0; qh < stats.n_q_heads; ++qh) {
        const int64_t h = qh / group;
        const int64_t slot = blocks.slot_of_layer(l, h);
        const float* row = stats.captured_row(l, qh, qi);
        float m = -INFINITY;
        for (int64_t j = 0; j <= pos; ++j) m = std::max(m, row[j]);
        double z = 0.0;
        for (int64_t j = 0; j <= pos; ++j) z += std::exp(static_cast<double>(row[j] - m));
        const double w = 1.0 / (z * static_cast<double>(n_q * group * blocks.slot_block(slot).n_layers));
        float* dst = imp.data() + slot * t_len;
        for (int64_t j = n_sink; j < hi; ++j) {
          dst[j] += static_cast<float>(std::exp(static_cast<double>(row[j] - m)) * w);
        }
      }
    }
  }
  return imp;
}

Status fit_thresholds(CpuForward& forward, std::span<const std::vector<int32_t>> documents,
                      GateModel& gate, const ThresholdFitOptions& opt,
                      const std::function<void(const ThresholdFitProgress&)>& progress,
                      ThresholdFitReport* report) {
  KVGATE_RETURN_IF_ERROR(opt.validate());
  const auto t0 = std::chrono::steady_clock::now();
  const LlamaConfig& c = forward.model().config();
  const int64_t t_len = opt.tokens;
  const int64_t first = gate.n_sink_tokens;
  const int64_t last = t_len - gate.n_window_tokens - opt.min_distant_queries;
  if (last - first < 16) {
    return invalid_argument("fit tokens (" + std::to_string(t_len) +
                            ") leave too few eligible tokens after the sinks and the window");
  }
  KVGATE_ASSIGN_OR_RETURN(const kvstore::KvLayout layout,
                          make_gate_layout(c, gate, /*share_keys=*/true, gate.n_sink_tokens,
                                           gate.n_window_tokens));
  const int64_t n_slots = gate.blocks.n_slots();
  if (layout.blocks.n_slots() != n_slots) return internal_error("gate+pod layout slots != gate slots");
  const std::vector<TextWindow> windows = shuffled_windows(documents, t_len, opt.seed);
  if (static_cast<int64_t>(windows.size()) < opt.sequences) {
    return invalid_argument("calibration texts hold " + std::to_string(windows.size()) + " windows of " +
                            std::to_string(t_len) + " tokens; the threshold fit needs " +
                            std::to_string(opt.sequences));
  }
  const auto report_progress = [&](std::string_view stage, int64_t done, int64_t total) {
    if (progress) progress({stage, done, total});
  };

  // Prefill each sequence once with the real gate runtime observing; its
  // projections are kept, so every later round only re-runs finish().
  struct FitSequence {
    std::unique_ptr<GatePrefill> gates;
    std::vector<float> importance;  // [slot][token]
    int64_t n_tokens = 0;
    int64_t first = 0, last = 0;    // eligible tokens [first, last)
  };
  std::vector<FitSequence> seqs(static_cast<size_t>(opt.sequences + static_cast<int64_t>(opt.probes.size())));
  int64_t tokens_seen = 0;
  {
    KvCache cache(c, t_len);
    AttentionStats stats;
    std::vector<float> logits(c.n_vocab);
    LayerInputObserver* previous = forward.layer_observer();
    for (int64_t i = 0; i < opt.sequences; ++i) {
      report_progress("fit-prefill", i, opt.sequences);
      const TextWindow w = windows[i];
      std::span<const int32_t> toks(documents[w.document].data() + w.start, t_len);
      seqs[i].gates = std::make_unique<GatePrefill>(gate, layout, t_len, forward.options().isa);
      cache.set_n_tokens(0);
      stats.reset(c.n_layers, c.n_kv_heads, t_len, t_len);
      stats.enable_distant(gate.n_window_tokens);
      forward.set_layer_observer(seqs[i].gates.get());
      const Status st = forward.prefill(cache, toks, logits.data(), &stats);
      forward.set_layer_observer(previous);
      KVGATE_RETURN_IF_ERROR(st);
      seqs[i].importance =
          teacher_importance(stats, gate.blocks, c.n_heads / c.n_kv_heads, gate.n_window_tokens);
      seqs[i].n_tokens = t_len;
      seqs[i].first = first;
      seqs[i].last = last;
      tokens_seen += t_len;
    }
    report_progress("fit-prefill", opt.sequences, opt.sequences);
    // Probes: eligible are the tokens distant for every one of the last
    // queries; valued by those queries' attention only.
    const auto n_probes = static_cast<int64_t>(opt.probes.size());
    for (int64_t i = 0; i < n_probes; ++i) {
      report_progress("fit-probes", i, n_probes);
      const std::vector<int32_t>& toks = opt.probes[i];
      const auto p_len = static_cast<int64_t>(toks.size());
      FitSequence& sq = seqs[opt.sequences + i];
      sq.n_tokens = p_len;
      sq.first = gate.n_sink_tokens;
      sq.last = p_len - gate.n_window_tokens - opt.probe_queries;
      if (sq.last - sq.first < 1) {
        return invalid_argument("retrieval probe " + std::to_string(i) + " has " + std::to_string(p_len) +
                                " tokens; it must exceed n_sink + n_window + probe_queries");
      }
      KvCache probe_cache(c, p_len);
      sq.gates = std::make_unique<GatePrefill>(gate, layout, p_len, forward.options().isa);
      stats.reset(c.n_layers, c.n_kv_heads, p_len, p_len);
      stats.enable_capture(c.n_heads, p_len - opt.probe_queries);
      forward.set_layer_observer(sq.gates.get());
      const Status st = forward.prefill(probe_cache, toks, logits.data(), &stats);
      forward.set_layer_observer(previous);
      KVGATE_RETURN_IF_ERROR(st);
      sq.importance = captured_importance(stats, gate.blocks, c.n_heads / c.n_kv_heads, gate.n_sink_tokens,
                                          gate.n_window_tokens);
      tokens_seen += p_len;
    }
    if (n_probes > 0) report_progress("fit-probes", n_probes, n_probes);
  }

  std::vector<int64_t> bytes(static_cast<size_t>(n_slots));
  double full_bytes = 0.0;
  int64_t n_elig = 0;
  for (const FitSequence& sq : seqs) n_elig += sq.last - sq.first;
  for (int64_t s = 0; s < n_slots; ++s) {
    bytes[s] = layout.elem_bytes * layout.head_dim * (gate.blocks.slot_block(s).n_layers + 1) +
               kvstore::kPositionBytes + layout.retained_gate_bytes_per_token();
    full_bytes += static_cast<double>(bytes[s] * n_elig);
  }

  // Per slot, (logit, importance) of every eligible token under the current
  // thresholds, ranked by logit.
  std::vector<std::vector<std::pair<float, float>>> items(static_cast<size_t>(n_slots));
  std::vector<uint8_t> flags;
  std::vector<fp16_t> rows;
  const auto gather = [&]() -> Status {
    for (auto& it : items) it.clear();
    for (FitSequence& sq : seqs) {
      KVGATE_RETURN_IF_ERROR(sq.gates->finish(GateDecision{}, flags, rows));
      const std::vector<float>& z = sq.gates->logits();
      for (int64_t s = 0; s < n_slots; ++s) {
        for (int64_t t = sq.first; t < sq.last; ++t) {
          items[s].push_back({z[s * sq.n_tokens + t], sq.importance[s * sq.n_tokens + t]});
        }
      }
    }
    for (auto& it : items) {
      std::stable_sort(it.begin(), it.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    }
    return Status();
  };

  // Rounds. A slot's logits depend only on its own retained tokens, so each
  // slot is a one-dimensional problem: find the threshold whose own flags
  // keep `keep[s]` tokens. The first rounds set keep[] (the allocation,
  // from the current ranking) and jump to the quantile; later rounds keep
  // keep[] fixed and bracket each threshold (the quantile of the current
  // logits when it falls inside the bracket, else the bracket's midpoint),
  // so a gate whose logits swing with its retained set still converges.
  std::vector<int64_t> keep(static_cast<size_t>(n_slots), 0);
  struct Bracket {
    bool has_lo = false, has_hi = false;
    float lo = 0.0f, hi = 0.0f;  // lo keeps >= keep[s], hi keeps fewer
  };
  std::vector<Bracket> bracket(static_cast<size_t>(n_slots));
  const int64_t allocation_rounds = std::min<int64_t>(2, opt.rounds);
  for (int64_t round = 0; round < opt.rounds; ++round) {
    report_progress("fit-rounds", round, opt.rounds);
    KVGATE_RETURN_IF_ERROR(gather());
    if (round < allocation_rounds) {
      if (opt.allocation == KeepAllocation::kUniform) {
        for (int64_t s = 0; s < n_slots; ++s) {
          keep[s] = static_cast<int64_t>(std::ceil(opt.target_keep_rate * static_cast<double>(items[s].size())));
        }
      } else {
        std::vector<std::vector<float>> values(static_cast<size_t>(n_slots));
        for (int64_t s = 0; s < n_slots; ++s) {
          for (const auto& [z, v] : items[s]) values[s].push_back(v);
        }
        keep = allocate_keep(values, bytes, opt.target_keep_rate * full_bytes, opt.min_keep_rate);
      }
    }
    for (int64_t s = 0; s < n_slots; ++s) {
      const auto& it = items[s];
      if (it.empty()) continue;
      float& thr = gate.slots[s].threshold;
      // flag = logit >= threshold keeps the top keep[s] (ties kept too).
      const float quantile = keep[s] > 0 ? it[std::min<size_t>(keep[s], it.size()) - 1].first
                                         : std::nextafter(it.front().first, INFINITY);
      if (round < allocation_rounds) {
        thr = quantile;
        continue;
      }
      int64_t kept = 0;
      for (const auto& [z, v] : it) kept += z >= thr ? 1 : 0;
      Bracket& b = bracket[s];
      if (kept >= keep[s]) {
        if (!b.has_lo || thr > b.lo) b.lo = thr;
        b.has_lo = true;
      } else {
        if (!b.has_hi || thr < b.hi) b.hi = thr;
        b.has_hi = true;
      }
      if (kept == keep[s]) continue;
      const bool inside = (!b.has_lo || quantile > b.lo) && (!b.has_hi || quantile < b.hi);
      if (inside && (round % 2 == 0 || !(b.has_lo && b.has_hi))) {
        thr = quantile;
      } else if (b.has_lo && b.has_hi) {
        thr = 0.5f * (b.lo + b.hi);
      } else if (b.has_lo) {  // the quantile points below a threshold known to keep too many
        thr = b.lo + std::max(b.lo - quantile, 1e-3f * (1.0f + std::fabs(b.lo)));
      } else {
        thr = b.hi - std::max(quantile - b.hi, 1e-3f * (1.0f + std::fabs(b.hi)));
      }
    }
  }
  report_progress("fit-rounds", opt.rounds, opt.rounds);

  // What the final thresholds keep, with the logits they produce.
  KVGATE_RETURN_IF_ERROR(gather());
  if (report != nullptr) {
    ThresholdFitReport& r = *report;
    r = ThresholdFitReport();
    r.tokens_seen = tokens_seen;
    double kept = 0.0, total = 0.0, mass = 0.0, mass_total = 0.0, kept_bytes = 0.0;
    for (int64_t s = 0; s < n_slots; ++s) {
      int64_t k = 0;
      for (const auto& [z, v] : items[s]) {
        mass_total += v;
        if (z >= gate.slots[s].threshold) {
          ++k;
          mass += v;
        }
      }
      kept += static_cast<double>(k);
      total += static_cast<double>(items[s].size());
      kept_bytes += static_cast<double>(k * bytes[s]);
      r.slot_keep_rate.push_back(items[s].empty() ? 0.0 : static_cast<double>(k) / items[s].size());
    }
    r.keep_rate = total > 0.0 ? kept / total : 0.0;
    r.mass_kept = mass_total > 0.0 ? mass / mass_total : 0.0;
    r.bytes_share = full_bytes > 0.0 ? kept_bytes / full_bytes : 0.0;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return Status();
}

}  // namespace kvgate::engine
