#include "engine/calibrate.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <thread>

#include "engine/cpu/thread_pool.h"
#include "engine/gate_math.h"
#include "engine/threshold_fit.h"

namespace kvgate::engine {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Hot loops of training: compiled for the best ISA at run time (the binary
// stays portable); calibrate.cpp is built with associative FP math so the
// reductions vectorize.
__attribute__((target_clones("avx512f", "avx2", "default"))) float vdot(const float* a,
                                                                       const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void vaxpy(float alpha, const float* x,
                                                                       float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// ------------------------------------------------------------ sequences

// ------------------------------------------------------------ grouping

// Distant-token distribution of one captured query row at position `pos`:
// keys [n_sink, pos + 1 - window).
std::pair<int64_t, int64_t> distant_range(int64_t pos, int64_t n_sink, int64_t window) {
  return {n_sink, std::max(n_sink, pos + 1 - window)};
}

// Observer that copies the normalized input of chosen layers as fp16.
class FeatureCapture final : public LayerInputObserver {
 public:
  FeatureCapture(std::vector<int32_t> layer_index, int64_t n_tokens, int64_t n_embd)
      : layer_index_(std::move(layer_index)), n_tokens_(n_tokens), n_embd_(n_embd) {}
  void reset(fp16_t* out) { out_ = out; }
  void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                      std::span<const int64_t> row_pos, std::span<const int32_t>) override {
    const int32_t idx = layer_index_[layer];
    if (idx < 0 || out_ == nullptr) return;
    for (int64_t r = 0; r < n_rows; ++r) {
      fp16_t* dst = out_ + (idx * n_tokens_ + row_pos[r]) * n_embd_;
      for (int64_t e = 0; e < n_embd_; ++e) dst[e] = fp32_to_fp16(xn[r * n_embd_ + e]);
    }
  }

 private:
  std::vector<int32_t> layer_index_;  // layer -> feature index or -1
  int64_t n_tokens_;
  int64_t n_embd_;
  fp16_t* out_ = nullptr;
};

// ------------------------------------------------------------ training

struct Sequence {
  std::vector<fp16_t> features;  // [base index][token][n_embd]
  std::vector<float> importance;  // [gate slot][token]
  std::vector<uint8_t> eligible;  // [token]
  bool holdout = false;
};

struct SlotTraining {
  std::vector<float> params;  // flat: attention wq|wk|wv|wo|bias, linear w|bias
  std::vector<float> grad;
  std::vector<float> adam_m, adam_v;
  int64_t step = 0;
  // K/V rounded to fp16 like the runtime's stored rows (off only for exact
  // gradient checks: the rounding is treated as identity by the backward).
  bool round_kv = true;
  // Per-thread scratch.
  std::vector<float> x, q, k, v, o, dq, dk, dv, z, row;
};

int64_t param_count(const GateModel& g) {
  return g.kind == GateKind::kAttention ? 3 * g.gate_dim() * g.n_embd + g.gate_dim() + 1
                                        : g.n_embd + 1;
}

// Labels of one slot and sequence: the top `rate` of eligible tokens by
// importance.
void make_labels(const float* importance, const std::vector<uint8_t>& eligible, double rate,
                 std::vector<float>& y, int64_t& n_elig) {
  const auto t_end = static_cast<int64_t>(eligible.size());
  std::vector<int32_t> idx;
  for (int64_t t = 0; t < t_end; ++t) {
    if (eligible[t]) idx.push_back(static_cast<int32_t>(t));
  }
  n_elig = static_cast<int64_t>(idx.size());
  y.assign(static_cast<size_t>(t_end), 0.0f);
  const auto k = static_cast<int64_t>(std::ceil(rate * static_cast<double>(n_elig) - 1e-9));
  std::partial_sort(idx.begin(), idx.begin() + std::min(k, n_elig), idx.end(),
                    [&](int32_t a, int32_t b) { return importance[a] > importance[b]; });
  for (int64_t i = 0; i < std::min(k, n_elig); ++i) y[idx[i]] = 1.0f;
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// The keys query t attends to in training: [0, sink_end) and
// [window_begin, t]. kCache: the full causal context [0, t] (the runtime's
// context, sinks + window + retained tokens, is a subset of it that depends
// on earlier flags). kWindow: the band the runtime attends over exactly —
// sinks j < n_sink and the window j >= t + 1 - n_window.
struct Band {
  int64_t sink_end = 0;
  int64_t window_begin = 0;
};

Band context_band(const GateModel& g, int64_t t) {
  if (g.context == GateContext::kCache) return {0, 0};
  const int64_t sink_end = std::min(g.n_sink_tokens, t + 1);
  return {sink_end, std::max(sink_end, t + 1 - g.n_window_tokens)};
}

// Calls fn(i) for every key i of query t's band, in increasing order.
template <typename Fn>
inline void for_band(const Band& b, int64_t t, Fn fn) {
  for (int64_t i = 0; i < b.sink_end; ++i) fn(i);
  for (int64_t i = b.window_begin; i <= t; ++i) fn(i);
}

// Logits of eligible tokens over the training context (context_band).
// Fills st.z[t] for eligible t; q/k/v/o kept for the backward pass.
void forward_slot(const GateModel& g, SlotTraining& st, const float* params, const float* x,
                  int64_t t_end, const std::vector<uint8_t>& eligible) {
  const int64_t e = g.n_embd;
  st.z.assign(static_cast<size_t>(t_end), 0.0f);
  if (g.kind == GateKind::kLinear) {
    for (int64_t t = 0; t < t_end; ++t) {
      if (eligible[t]) st.z[t] = vdot(params, x + t * e, e) + params[e];
    }
    return;
  }
  const int64_t dim = g.gate_dim(), heads = g.n_gate_heads, hd = g.gate_head_dim;
  const float* wq = params;
  const float* wk = wq + dim * e;
  const float* wv = wk + dim * e;
  const float* wo = wv + dim * e;
  const float bias = wo[dim];
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  st.q.assign(static_cast<size_t>(t_end * dim), 0.0f);
  st.k.resize(static_cast<size_t>(t_end * dim));
  st.v.resize(static_cast<size_t>(t_end * dim));
  st.o.assign(static_cast<size_t>(t_end * dim), 0.0f);
  st.row.resize(static_cast<size_t>(t_end));
  for (int64_t t = 0; t < t_end; ++t) {
    const float* xt = x + t * e;
    for (int64_t i = 0; i < dim; ++i) {
      // K and V round to fp16 as the runtime stores them.
      const float kk = vdot(wk + i * e, xt, e);
      const float vv = vdot(wv + i * e, xt, e);
      st.k[t * dim + i] = st.round_kv ? fp16_to_fp32(fp32_to_fp16(kk)) : kk;
      st.v[t * dim + i] = st.round_kv ? fp16_to_fp32(fp32_to_fp16(vv)) : vv;
      if (eligible[t]) st.q[t * dim + i] = vdot(wq + i * e, xt, e);
    }
  }
  for (int64_t t = 0; t < t_end; ++t) {
    if (!eligible[t]) continue;
    const Band band = context_band(g, t);
    float z = bias;
    for (int64_t a = 0; a < heads; ++a) {
      const float* qa = st.q.data() + t * dim + a * hd;
      float m = -INFINITY;
      for_band(band, t, [&](int64_t i) {
        st.row[i] = vdot(qa, st.k.data() + i * dim + a * hd, hd) * scale;
        m = std::max(m, st.row[i]);
      });
      float sum = 0.0f;
      float* oa = st.o.data() + t * dim + a * hd;
      for_band(band, t, [&](int64_t i) {
        const float p = std::exp(st.row[i] - m);
        sum += p;
        vaxpy(p, st.v.data() + i * dim + a * hd, oa, hd);
      });
      for (int64_t c = 0; c < hd; ++c) oa[c] /= sum;
      z += vdot(wo + a * hd, oa, hd);
    }
    st.z[t] = z;
  }
}

// Loss and gradient (into st.grad, overwritten) of one slot on one sequence.
double train_slot(const GateModel& g, SlotTraining& st, const float* x, int64_t t_end,
                  const std::vector<uint8_t>& eligible, const std::vector<float>& y,
                  int64_t n_elig, double rate, double lambda) {
  const int64_t e = g.n_embd;
  forward_slot(g, st, st.params.data(), x, t_end, eligible);
  std::fill(st.grad.begin(), st.grad.end(), 0.0f);
  if (n_elig == 0) return 0.0;
  double mean_p = 0.0, bce = 0.0;
  for (int64_t t = 0; t < t_end; ++t) {
    if (!eligible[t]) continue;
    const double p = sigmoid(st.z[t]);
    mean_p += p;
    const double pc = std::clamp(p, 1e-7, 1.0 - 1e-7);
    bce -= y[t] * std::log(pc) + (1.0 - y[t]) * std::log(1.0 - pc);
  }
  mean_p /= static_cast<double>(n_elig);
  bce /= static_cast<double>(n_elig);
  const double loss = bce + lambda * (mean_p - rate) * (mean_p - rate);
  std::vector<float> gz(static_cast<size_t>(t_end), 0.0f);
  for (int64_t t = 0; t < t_end; ++t) {
    if (!eligible[t]) continue;
    const double p = sigmoid(st.z[t]);
    gz[t] = static_cast<float>(((p - y[t]) + 2.0 * lambda * (mean_p - rate) * p * (1.0 - p)) /
                               static_cast<double>(n_elig));
  }
  if (g.kind == GateKind::kLinear) {
    for (int64_t t = 0; t < t_end; ++t) {
      if (gz[t] == 0.0f) continue;
      vaxpy(gz[t], x + t * e, st.grad.data(), e);
      st.grad[e] += gz[t];
    }
    return loss;
  }
  const int64_t dim = g.gate_dim(), heads = g.n_gate_heads, hd = g.gate_head_dim;
  const float* wo = st.params.data() + 3 * dim * e;
  float* gwq = st.grad.data();
  float* gwk = gwq + dim * e;
  float* gwv = gwk + dim * e;
  float* gwo = gwv + dim * e;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  st.dq.assign(static_cast<size_t>(t_end * dim), 0.0f);
  st.dk.assign(static_cast<size_t>(t_end * dim), 0.0f);
  st.dv.assign(static_cast<size_t>(t_end * dim), 0.0f);
  for (int64_t t = 0; t < t_end; ++t) {
    if (gz[t] == 0.0f) continue;
    const float* ot = st.o.data() + t * dim;
    vaxpy(gz[t], ot, gwo, dim);
    gwo[dim] += gz[t];
    const Band band = context_band(g, t);
    for (int64_t a = 0; a < heads; ++a) {
      float d_o[64];
      for (int64_t c = 0; c < hd; ++c) d_o[c] = gz[t] * wo[a * hd + c];
      const float* qa = st.q.data() + t * dim + a * hd;
      float m = -INFINITY;
      for_band(band, t, [&](int64_t i) {
        st.row[i] = vdot(qa, st.k.data() + i * dim + a * hd, hd) * scale;
        m = std::max(m, st.row[i]);
      });
      float sum = 0.0f;
      for_band(band, t, [&](int64_t i) {
        st.row[i] = std::exp(st.row[i] - m);
        sum += st.row[i];
      });
      const float dt = vdot(d_o, ot + a * hd, hd);
      float* dqa = st.dq.data() + t * dim + a * hd;
      // Keys outside the band get no gradient (they are not attended to).
      for_band(band, t, [&](int64_t i) {
        const float p = st.row[i] / sum;
        const float* vi = st.v.data() + i * dim + a * hd;
        const float ds = p * (vdot(d_o, vi, hd) - dt) * scale;
        vaxpy(ds, st.k.data() + i * dim + a * hd, dqa, hd);
        vaxpy(ds, qa, st.dk.data() + i * dim + a * hd, hd);
        vaxpy(p, d_o, st.dv.data() + i * dim + a * hd, hd);
      });
    }
  }
  for (int64_t t = 0; t < t_end; ++t) {
    const float* xt = x + t * e;
    for (int64_t i = 0; i < dim; ++i) {
      if (st.dq[t * dim + i] != 0.0f) vaxpy(st.dq[t * dim + i], xt, gwq + i * e, e);
      if (st.dk[t * dim + i] != 0.0f) vaxpy(st.dk[t * dim + i], xt, gwk + i * e, e);
      if (st.dv[t * dim + i] != 0.0f) vaxpy(st.dv[t * dim + i], xt, gwv + i * e, e);
    }
  }
  return loss;
}

void adam_step(SlotTraining& st, double lr) {
  constexpr double kB1 = 0.9, kB2 = 0.999, kEps = 1e-8;
  ++st.step;
  const double c1 = 1.0 - std::pow(kB1, static_cast<double>(st.step));
  const double c2 = 1.0 - std::pow(kB2, static_cast<double>(st.step));
  for (size_t i = 0; i < st.params.size(); ++i) {
    const double gi = st.grad[i];
    st.adam_m[i] = static_cast<float>(kB1 * st.adam_m[i] + (1.0 - kB1) * gi);
    st.adam_v[i] = static_cast<float>(kB2 * st.adam_v[i] + (1.0 - kB2) * gi * gi);
    const double mh = st.adam_m[i] / c1;
    const double vh = st.adam_v[i] / c2;
    st.params[i] -= static_cast<float>(lr * mh / (std::sqrt(vh) + kEps));
  }
}

void to_fp32(const fp16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}

}  // namespace

int64_t gate_param_count(const GateModel& shape) { return param_count(shape); }

std::vector<float> gate_flat_params(const GateModel& gate, int64_t slot) {
  const GateSlot& g = gate.slots[slot];
  std::vector<float> p;
  if (gate.kind == GateKind::kAttention) {
    p.insert(p.end(), g.wq.begin(), g.wq.end());
    p.insert(p.end(), g.wk.begin(), g.wk.end());
    p.insert(p.end(), g.wv.begin(), g.wv.end());
  }
  p.insert(p.end(), g.wo.begin(), g.wo.end());
  p.push_back(g.bias);
  return p;
}

std::vector<float> gate_training_logits(const GateModel& shape, std::span<const float> params,
                                        const float* x, int64_t t_end,
                                        const std::vector<uint8_t>& eligible, bool round_kv) {
  SlotTraining st;
  st.round_kv = round_kv;
  forward_slot(shape, st, params.data(), x, t_end, eligible);
  return st.z;
}

double gate_loss_and_gradient(const GateModel& shape, std::span<const float> params,
                              const float* x, int64_t t_end, const std::vector<uint8_t>& eligible,
                              const std::vector<float>& y, double rate, double lambda,
                              std::vector<float>& grad, bool round_kv) {
  SlotTraining st;
  st.round_kv = round_kv;
  st.params.assign(params.begin(), params.end());
  st.grad.assign(params.size(), 0.0f);
  int64_t n_elig = 0;
  for (uint8_t e : eligible) n_elig += e;
  const double loss = train_slot(shape, st, x, t_end, eligible, y, n_elig, rate, lambda);
  grad = std::move(st.grad);
  return loss;
}

Status CalibrationOptions::validate() const {
  if (grouping_sequences < 1) return invalid_argument("grouping_sequences must be >= 1");
  if (grouping_queries < 1) return invalid_argument("grouping_queries must be >= 1");
  if (!(similarity_threshold >= 0.0 && similarity_threshold <= 1.0)) {
    return invalid_argument("similarity_threshold (delta) must be in [0, 1]");
  }
  if (max_block_layers < 0) return invalid_argument("max_block_layers must be >= 0");
  if (kind == GateKind::kAttention && (n_gate_heads < 1 || n_gate_heads > 64 || gate_head_dim < 1 ||
                                       gate_head_dim > 64)) {
    return invalid_argument("gate heads and head width must be in [1, 64]");
  }
  if (train_sequences < 2) return invalid_argument("train_sequences must be >= 2");
  if (epochs < 1) return invalid_argument("epochs must be >= 1");
  if (!(learning_rate > 0.0)) return invalid_argument("learning_rate must be > 0");
  if (!(keep_rate_weight >= 0.0)) return invalid_argument("keep_rate_weight must be >= 0");
  if (!(target_keep_rate > 0.0 && target_keep_rate < 1.0)) {
    return invalid_argument("target_keep_rate must be in (0, 1)");
  }
  if (n_sink_tokens < 0) return invalid_argument("n_sink must be >= 0");
  if (n_window_tokens < 1) return invalid_argument("n_window must be >= 1");
  if (min_distant_queries < 1) return invalid_argument("min_distant_queries must be >= 1");
  if (probe_queries < 1) return invalid_argument("probe_queries must be >= 1");
  for (size_t i = 0; i < grouping_probes.size(); ++i) {
    if (static_cast<int64_t>(grouping_probes[i].size()) <= n_sink_tokens + n_window_tokens + probe_queries) {
      return invalid_argument("grouping probe " + std::to_string(i) + " has " +
                              std::to_string(grouping_probes[i].size()) +
                              " tokens; it must exceed n_sink + n_window + probe_queries");
    }
  }
  if (grouping_tokens <= n_sink_tokens + n_window_tokens + grouping_queries) {
    return invalid_argument("grouping_tokens must exceed n_sink + n_window + grouping_queries");
  }
  if (train_tokens <= n_sink_tokens + n_window_tokens + min_distant_queries) {
    return invalid_argument("train_tokens must exceed n_sink + n_window + min_distant_queries");
  }
  if (!(holdout_fraction >= 0.0 && holdout_fraction < 1.0)) {
    return invalid_argument("holdout_fraction must be in [0, 1)");
  }
  return Status();
}

double js_similarity(const float* a, const float* b, int64_t n) {
  double sa = 0.0, sb = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    sa += a[i];
    sb += b[i];
  }
  if (sa <= 0.0 || sb <= 0.0) return sa <= 0.0 && sb <= 0.0 ? 1.0 : 0.0;
  // JSD = Σ ½p·log2(2p/(p+q)) + ½q·log2(2q/(p+q)), in float per term
  // (the sum in double); terms with p = q = 0 vanish.
  const float ia = static_cast<float>(1.0 / sa), ib = static_cast<float>(1.0 / sb);
  double jsd = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float p = a[i] * ia, q = b[i] * ib;
    const float m2 = p + q;
    if (m2 <= 0.0f) continue;
    float t = 0.0f;
    if (p > 0.0f) t += p * std::log2(2.0f * p / m2);
    if (q > 0.0f) t += q * std::log2(2.0f * q / m2);
    jsd += 0.5 * t;
  }
  return 1.0 - std::clamp(jsd, 0.0, 1.0);
}

double shared_score_similarity(const float* s_base, const float* s_layer, int64_t n, int64_t lo,
                               int64_t hi) {
  if (hi <= lo) return 1.0;
  float m_l = -INFINITY, m_b = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m_l = std::max(m_l, s_layer[j]);
  for (int64_t j = lo; j < hi; ++j) m_b = std::max(m_b, s_base[j]);
  double zp = 0.0, zd_l = 0.0, zd_b = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = std::exp(static_cast<double>(s_layer[j] - m_l));
    if (j >= lo && j < hi) {
      zd_l += e;
    } else {
      zp += e;
    }
  }
  for (int64_t j = lo; j < hi; ++j) zd_b += std::exp(static_cast<double>(s_base[j] - m_b));
  const double c = std::exp(static_cast<double>(m_b) - m_l);  // b's weights relative to m_l
  const double z_l = zp + zd_l;
  const double z_h = zp + zd_b * c;
  // Proximal keys: q = p·r with r = z_l / z_h, in closed form.
  const double mass_p = zp / z_l;
  const double r = z_l / z_h;
  double jsd = 0.5 * mass_p * (std::log2(2.0 / (1.0 + r)) + r * std::log2(2.0 * r / (1.0 + r)));
  const double inv_l = 1.0 / z_l, inv_h = c / z_h;
  for (int64_t j = lo; j < hi; ++j) {
    const double p = std::exp(static_cast<double>(s_layer[j] - m_l)) * inv_l;
    const double q = std::exp(static_cast<double>(s_base[j] - m_b)) * inv_h;
    const double m2 = p + q;
    if (m2 <= 0.0) continue;
    if (p > 0.0) jsd += 0.5 * p * std::log2(2.0 * p / m2);
    if (q > 0.0) jsd += 0.5 * q * std::log2(2.0 * q / m2);
  }
  return 1.0 - std::clamp(jsd, 0.0, 1.0);
}

std::vector<TextWindow> shuffled_windows(std::span<const std::vector<int32_t>> documents,
                                        int64_t tokens, uint64_t seed) {
  std::vector<TextWindow> windows;
  for (size_t d = 0; d < documents.size(); ++d) {
    const auto n = static_cast<int64_t>(documents[d].size());
    for (int64_t s = 0; s + tokens <= n; s += tokens) windows.push_back({static_cast<int64_t>(d), s});
  }
  std::mt19937_64 rng(seed);
  std::shuffle(windows.begin(), windows.end(), rng);
  return windows;
}

Result<kvstore::BlockMap> group_layers(const std::vector<std::vector<double>>& similarity,
                                       int64_t n_layers, double delta, int64_t max_block_layers) {
  std::vector<std::vector<kvstore::LayerBlock>> per_head;
  for (const auto& sim : similarity) {
    if (static_cast<int64_t>(sim.size()) != n_layers * n_layers) {
      return invalid_argument("similarity matrix is not n_layers x n_layers");
    }
    std::vector<kvstore::LayerBlock> blocks;
    kvstore::LayerBlock cur{0, 1};
    for (int32_t l = 1; l < n_layers; ++l) {
      const bool fits = max_block_layers == 0 || cur.n_layers < max_block_layers;
      if (fits && sim[cur.first_layer * n_layers + l] >= delta) {
        ++cur.n_layers;
      } else {
        blocks.push_back(cur);
        cur = {l, 1};
      }
    }
    blocks.push_back(cur);
    per_head.push_back(std::move(blocks));
  }
  return kvstore::BlockMap::create(n_layers, std::move(per_head));
}

Result<GateModel> calibrate(CpuForward& forward, std::span<const std::vector<int32_t>> documents,
                            const CalibrationOptions& opt, const CalibrationProgressFn& progress,
                            CalibrationReport* report) {
  KVGATE_RETURN_IF_ERROR(opt.validate());
  const LlamaConfig& c = forward.model().config();
  const int64_t n_layers = c.n_layers, n_kv = c.n_kv_heads, group = c.n_heads / c.n_kv_heads;
  const int64_t slot_tokens = std::max(opt.grouping_tokens, opt.train_tokens);
  const int64_t per_slot = slot_tokens / opt.train_tokens;
  const int64_t train_slots = (opt.train_sequences + per_slot - 1) / per_slot;
  std::vector<TextWindow> slots = shuffled_windows(documents, slot_tokens, opt.seed);
  if (static_cast<int64_t>(slots.size()) < opt.grouping_sequences + train_slots) {
    return invalid_argument("calibration texts hold " + std::to_string(slots.size()) + " windows of " +
                            std::to_string(slot_tokens) + " tokens; " +
                            std::to_string(opt.grouping_sequences + train_slots) + " are needed");
  }
  CalibrationReport local_report;
  CalibrationReport& rep = report != nullptr ? *report : local_report;
  rep = CalibrationReport();
  const auto report_progress = [&](std::string_view stage, int64_t done, int64_t total, double loss) {
    if (progress) progress({stage, done, total, loss});
  };

  // ---- 1. layer grouping
  auto t0 = Clock::now();
  const int64_t max_span = opt.max_block_layers > 0 ? opt.max_block_layers - 1 : n_layers;
  // Mean shared-score similarity over the last `n_queries` queries of each
  // sequence, per (KV head, layer pair).
  const auto measure = [&](std::span<const std::span<const int32_t>> sequences, int64_t n_queries,
                           std::string_view stage,
                           std::vector<std::vector<double>>& mean) -> Status {
    std::vector<std::vector<double>> sum(n_kv, std::vector<double>(n_layers * n_layers, 0.0));
    int64_t n_sim = 0;
    AttentionStats stats;
    std::vector<float> logits(c.n_vocab);
    for (size_t s = 0; s < sequences.size(); ++s) {
      report_progress(stage, static_cast<int64_t>(s), static_cast<int64_t>(sequences.size()), 0.0);
      const std::span<const int32_t> toks = sequences[s];
      const auto t_len = static_cast<int64_t>(toks.size());
      KvCache cache(c, t_len);
      stats.reset(n_layers, n_kv, t_len, t_len);
      stats.enable_capture(c.n_heads, t_len - n_queries);
      KVGATE_RETURN_IF_ERROR(forward.prefill(cache, toks, logits.data(), &stats));
      rep.grouping_tokens_seen += t_len;
      for (int64_t qi = 0; qi < stats.n_captured(); ++qi) {
        const int64_t pos = stats.capture_from + qi;
        const auto [lo, hi] = distant_range(pos, opt.n_sink_tokens, opt.n_window_tokens);
        if (hi <= lo) continue;
        for (int64_t qh = 0; qh < c.n_heads; ++qh) {
          const int64_t h = qh / group;
          for (int64_t a = 0; a < n_layers; ++a) {
            const float* ra = stats.captured_row(a, qh, qi);
            // Blocks are consecutive and bounded: pairs further apart than
            // the largest block never decide anything (and JSD is costly).
            for (int64_t b = a + 1; b < std::min(n_layers, a + max_span + 1); ++b) {
              const double sim =
                  shared_score_similarity(ra, stats.captured_row(b, qh, qi), pos + 1, lo, hi);
              sum[h][a * n_layers + b] += sim / group;
            }
          }
        }
        ++n_sim;
      }
    }
    report_progress(stage, static_cast<int64_t>(sequences.size()), static_cast<int64_t>(sequences.size()), 0.0);
    mean.assign(n_kv, std::vector<double>(n_layers * n_layers, 1.0));
    for (int64_t h = 0; h < n_kv; ++h) {
      for (int64_t a = 0; a < n_layers; ++a) {
        for (int64_t b = a + 1; b < n_layers; ++b) {
          const double v = n_sim > 0 ? sum[h][a * n_layers + b] / n_sim : 0.0;
          mean[h][a * n_layers + b] = v;
          mean[h][b * n_layers + a] = v;
        }
      }
    }
    return Status();
  };
  {
    std::vector<std::span<const int32_t>> seqs;
    for (int64_t s = 0; s < opt.grouping_sequences; ++s) {
      const TextWindow w = slots[s];
      seqs.emplace_back(documents[w.document].data() + w.start, opt.grouping_tokens);
    }
    KVGATE_RETURN_IF_ERROR(measure(seqs, opt.grouping_queries, "grouping", rep.similarity));
  }
  if (!opt.grouping_probes.empty()) {
    std::vector<std::span<const int32_t>> probes(opt.grouping_probes.begin(), opt.grouping_probes.end());
    KVGATE_RETURN_IF_ERROR(measure(probes, opt.probe_queries, "probes", rep.probe_similarity));
    rep.text_similarity = rep.similarity;
    for (int64_t h = 0; h < n_kv; ++h) {
      for (size_t i = 0; i < rep.similarity[h].size(); ++i) {
        rep.similarity[h][i] = std::min(rep.similarity[h][i], rep.probe_similarity[h][i]);
      }
    }
  }
  GateModel gate;
  KVGATE_ASSIGN_OR_RETURN(gate.blocks, group_layers(rep.similarity, n_layers, opt.similarity_threshold,
                                                    opt.max_block_layers));
  rep.block_map = gate.blocks.to_string();
  rep.seconds_grouping = seconds_since(t0);

  gate.kind = opt.kind;
  gate.context = opt.gate_context;  // forward_slot's band reads it
  gate.n_embd = c.n_embd;
  gate.n_gate_heads = opt.kind == GateKind::kAttention ? opt.n_gate_heads : 0;
  gate.gate_head_dim = opt.kind == GateKind::kAttention ? opt.gate_head_dim : 0;
  gate.n_sink_tokens = opt.n_sink_tokens;
  gate.n_window_tokens = opt.n_window_tokens;
  gate.target_keep_rate = opt.target_keep_rate;
  gate.similarity_threshold = opt.similarity_threshold;
  const int64_t n_slots = gate.blocks.n_slots();
  gate.slots.resize(static_cast<size_t>(n_slots));

  // ---- 2. collect features and teacher importance
  t0 = Clock::now();
  std::vector<int32_t> base_index(n_layers, -1);
  std::vector<int32_t> slot_feature(n_slots);
  int32_t n_bases = 0;
  for (int64_t s = 0; s < n_slots; ++s) {
    const int32_t base = gate.blocks.slot_block(s).first_layer;
    if (base_index[base] < 0) base_index[base] = n_bases++;
    slot_feature[s] = base_index[base];
  }
  const int64_t t_len = opt.train_tokens;
  const int64_t e = c.n_embd;
  std::vector<Sequence> seqs(static_cast<size_t>(opt.train_sequences));
  const auto n_holdout = static_cast<int64_t>(std::floor(opt.holdout_fraction * opt.train_sequences));
  {
    KvCache cache(c, t_len);
    AttentionStats stats;
    std::vector<float> logits(c.n_vocab);
    FeatureCapture capture(base_index, t_len, e);
    LayerInputObserver* previous = forward.layer_observer();
    for (int64_t i = 0; i < opt.train_sequences; ++i) {
      report_progress("collecting", i, opt.train_sequences, 0.0);
      const TextWindow w = slots[opt.grouping_sequences + i / per_slot];
      std::span<const int32_t> toks(documents[w.document].data() + w.start + (i % per_slot) * t_len,
                                    t_len);
      Sequence& sq = seqs[i];
      sq.holdout = i >= opt.train_sequences - n_holdout;
      sq.features.resize(static_cast<size_t>(n_bases * t_len * e));
      capture.reset(sq.features.data());
      cache.set_n_tokens(0);
      stats.reset(n_layers, n_kv, t_len, t_len);
      stats.enable_distant(opt.n_window_tokens);
      forward.set_layer_observer(&capture);
      const Status st = forward.prefill(cache, toks, logits.data(), &stats);
      forward.set_layer_observer(previous);
      KVGATE_RETURN_IF_ERROR(st);
      rep.training_tokens_seen += t_len;
      sq.eligible.assign(static_cast<size_t>(t_len), 0);
      const int64_t last = t_len - opt.n_window_tokens - opt.min_distant_queries;
      for (int64_t t = opt.n_sink_tokens; t < last; ++t) sq.eligible[t] = 1;
      if (opt.teacher == CalibrationOptions::Teacher::kMean) {
        sq.importance = teacher_importance(stats, gate.blocks, group, opt.n_window_tokens);
        continue;
      }
      sq.importance.assign(static_cast<size_t>(n_slots * t_len), 0.0f);
      for (int64_t s = 0; s < n_slots; ++s) {
        const int64_t h = gate.blocks.slot_head(s);
        const auto block = gate.blocks.slot_block(s);
        float* imp = sq.importance.data() + s * t_len;
        for (int64_t l = block.first_layer; l < block.end_layer(); ++l) {
          const float* row = stats.received_distant_max.data() + (l * n_kv + h) * t_len;
          for (int64_t t = 0; t < t_len; ++t) imp[t] += row[t] / static_cast<float>(block.n_layers);
        }
      }
    }
    report_progress("collecting", opt.train_sequences, opt.train_sequences, 0.0);
  }
  rep.seconds_collecting = seconds_since(t0);

  // ---- 3. train every slot's gate (slots in parallel)
  t0 = Clock::now();
  const int64_t n_params = param_count(gate);
  std::vector<SlotTraining> train(static_cast<size_t>(n_slots));
  std::mt19937_64 rng(opt.seed ^ 0x9e3779b97f4a7c15ULL);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float init_scale = 1.0f / std::sqrt(static_cast<float>(e));
  for (auto& st : train) {
    st.params.resize(static_cast<size_t>(n_params));
    for (auto& p : st.params) p = normal(rng) * init_scale;
    if (gate.kind == GateKind::kAttention) {
      for (int64_t i = 0; i < gate.gate_dim(); ++i) {
        st.params[3 * gate.gate_dim() * e + i] = normal(rng) / std::sqrt(static_cast<float>(gate.gate_dim()));
      }
    }
    st.params.back() = 0.0f;  // bias
    st.grad.assign(st.params.size(), 0.0f);
    st.adam_m.assign(st.params.size(), 0.0f);
    st.adam_v.assign(st.params.size(), 0.0f);
  }
  cpu::ThreadPool pool(forward.n_threads());
  std::vector<int64_t> order;
  for (int64_t i = 0; i < opt.train_sequences - n_holdout; ++i) order.push_back(i);
  std::vector<std::vector<float>> xbuf(static_cast<size_t>(pool.size()),
                                       std::vector<float>(static_cast<size_t>(t_len * e)));
  std::vector<double> slot_loss(static_cast<size_t>(n_slots));
  for (int64_t epoch = 0; epoch < opt.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    double epoch_loss = 0.0;
    for (size_t k = 0; k < order.size(); ++k) {
      const Sequence& sq = seqs[order[k]];
      pool.run([&](int share, int n_shares) {
        std::vector<float>& x = xbuf[share];
        int32_t x_feature = -1;
        std::vector<float> y;
        for (int64_t s = share; s < n_slots; s += n_shares) {
          if (slot_feature[s] != x_feature) {
            x_feature = slot_feature[s];
            to_fp32(sq.features.data() + x_feature * t_len * e, x.data(), t_len * e);
          }
          int64_t n_elig = 0;
          make_labels(sq.importance.data() + s * t_len, sq.eligible, opt.target_keep_rate, y, n_elig);
          slot_loss[s] = train_slot(gate, train[s], x.data(), t_len, sq.eligible, y, n_elig,
                                    opt.target_keep_rate, opt.keep_rate_weight);
          adam_step(train[s], opt.learning_rate);
        }
      });
      epoch_loss += std::accumulate(slot_loss.begin(), slot_loss.end(), 0.0) / n_slots;
      report_progress("training", epoch * static_cast<int64_t>(order.size()) + static_cast<int64_t>(k) + 1,
                      opt.epochs * static_cast<int64_t>(order.size()), epoch_loss / (k + 1));
    }
    rep.epoch_loss.push_back(epoch_loss / std::max<size_t>(1, order.size()));
  }
  rep.seconds_training = seconds_since(t0);

  // ---- 4. thresholds at the target keep rate, then the held-out report
  for (int64_t s = 0; s < n_slots; ++s) {
    GateSlot& gs = gate.slots[s];
    const std::vector<float>& p = train[s].params;
    if (gate.kind == GateKind::kAttention) {
      const int64_t dim = gate.gate_dim();
      gs.wq.assign(p.begin(), p.begin() + dim * e);
      gs.wk.assign(p.begin() + dim * e, p.begin() + 2 * dim * e);
      gs.wv.assign(p.begin() + 2 * dim * e, p.begin() + 3 * dim * e);
      gs.wo.assign(p.begin() + 3 * dim * e, p.begin() + 3 * dim * e + dim);
    } else {
      gs.wo.assign(p.begin(), p.begin() + e);
    }
    gs.bias = p.back();
  }
  std::vector<std::vector<float>> slot_logits(static_cast<size_t>(n_slots));
  std::vector<std::vector<float>> holdout_logits(static_cast<size_t>(n_slots));
  for (size_t i = 0; i < seqs.size(); ++i) {
    report_progress("thresholds", static_cast<int64_t>(i), static_cast<int64_t>(seqs.size()), 0.0);
    const Sequence& sq = seqs[i];
    pool.run([&](int share, int n_shares) {
      std::vector<float>& x = xbuf[share];
      int32_t x_feature = -1;
      for (int64_t s = share; s < n_slots; s += n_shares) {
        if (slot_feature[s] != x_feature) {
          x_feature = slot_feature[s];
          to_fp32(sq.features.data() + x_feature * t_len * e, x.data(), t_len * e);
        }
        forward_slot(gate, train[s], train[s].params.data(), x.data(), t_len, sq.eligible);
        auto& dst = sq.holdout ? holdout_logits[s] : slot_logits[s];
        for (int64_t t = 0; t < t_len; ++t) {
          if (sq.eligible[t]) dst.push_back(train[s].z[t]);
        }
      }
    });
  }
  for (int64_t s = 0; s < n_slots; ++s) {
    std::vector<float> v = slot_logits[s];
    const auto k = static_cast<int64_t>(std::floor((1.0 - opt.target_keep_rate) * v.size()));
    std::nth_element(v.begin(), v.begin() + std::min<int64_t>(k, v.size() - 1), v.end());
    gate.slots[s].threshold = v.empty() ? 0.0f : v[std::min<int64_t>(k, v.size() - 1)];
  }
  // Held-out teacher mass kept.
  double mass_gate = 0.0, mass_oracle = 0.0, mass_total = 0.0, kept = 0.0, n_elig_total = 0.0;
  std::vector<size_t> offset(static_cast<size_t>(n_slots), 0);
  for (const Sequence& sq : seqs) {
    if (!sq.holdout) continue;
    for (int64_t s = 0; s < n_slots; ++s) {
      const float* imp = sq.importance.data() + s * t_len;
      std::vector<float> elig_imp;
      for (int64_t t = 0; t < t_len; ++t) {
        if (!sq.eligible[t]) continue;
        const float z = holdout_logits[s][offset[s]++];
        mass_total += imp[t];
        n_elig_total += 1.0;
        if (z >= gate.slots[s].threshold) {
          mass_gate += imp[t];
          kept += 1.0;
        }
        elig_imp.push_back(imp[t]);
      }
      std::sort(elig_imp.begin(), elig_imp.end(), std::greater<>());
      const auto k = static_cast<size_t>(std::ceil(opt.target_keep_rate * elig_imp.size()));
      for (size_t j = 0; j < k && j < elig_imp.size(); ++j) mass_oracle += elig_imp[j];
    }
  }
  if (mass_total > 0.0) {
    rep.holdout_mass_gate = mass_gate / mass_total;
    rep.holdout_mass_oracle = mass_oracle / mass_total;
    rep.holdout_keep_rate = kept / n_elig_total;
  }
  report_progress("thresholds", static_cast<int64_t>(seqs.size()), static_cast<int64_t>(seqs.size()), 0.0);
  KVGATE_ASSIGN_OR_RETURN(gate.model, fingerprint_model(forward.model()));
  gate.calibration_note = "grouping " + std::to_string(rep.grouping_tokens_seen) + " tokens, training " +
                          std::to_string(rep.training_tokens_seen) + " tokens, " +
                          std::to_string(opt.epochs) + " epochs, seed " + std::to_string(opt.seed) + ", teacher " +
                          (opt.teacher == CalibrationOptions::Teacher::kMax ? "max" : "mean");
  KVGATE_RETURN_IF_ERROR(gate.validate());
  return gate;
}

}  // namespace kvgate::engine
