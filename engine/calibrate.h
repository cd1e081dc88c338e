// Offline calibration of the compression for one model (DESIGN.md §4):
//
//  1. Layer grouping (PoD). Over sample sequences, for the last queries,
//     each layer's attention distribution is compared with the one it would
//     have if it used the base layer's scores for distant tokens
//     (shared_score_similarity: 1 − Jensen–Shannon divergence, base 2, in
//     [0, 1]), averaged over the query heads of each KV head. Per KV head,
//     layers merge greedily into consecutive blocks while the similarity of
//     each layer to the block's base stays >= δ. With retrieval probes, a
//     pair must also reach δ on the probes' last queries.
//  2. Gate training. Teacher importance of token j for slot (block, head):
//     the mean attention it receives from the queries for which it is
//     distant (at least n_window positions later), averaged over the block's
//     layers and the head's query heads. The top target_keep_rate of the
//     eligible tokens of each sequence are the positives; the gate is fitted
//     by Adam on binary cross-entropy plus λ·(mean keep probability −
//     target)². The LLM runs forward only; only gate parameters learn. The
//     gate attends over its context (gate_context): the window band, or the
//     full causal context for kCache.
//  3. Thresholds: per slot, the logit quantile that keeps target_keep_rate
//     of the eligible calibration tokens (training semantics, training
//     length). `kvgate calibrate` then refits them at the serving length
//     with the serving semantics (engine/threshold_fit.h).
//
// Blocks the calling thread (drives `forward`); progress callbacks run on it.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "engine/gate.h"
#include "engine/model.h"

namespace kvgate::engine {

struct CalibrationOptions {
  // Layer grouping.
  int64_t grouping_sequences = 8;
  int64_t grouping_tokens = 2048;  // tokens per grouping sequence
  int64_t grouping_queries = 32;   // last queries of each sequence compared
  double similarity_threshold = 0.95;  // δ
  int64_t max_block_layers = 8;        // 0: no cap; also bounds the pairs compared
  // Retrieval probes (token ids): short texts that end where the model
  // retrieves an earlier fact (scripts/make-retrieval-texts.py --probes).
  // Their last probe_queries queries are compared like the grouping
  // sequences', and a pair of layers must be similar on both: averages over
  // prose hide the few queries that look back for one token, and a layer
  // that answers them from its own scores must not take another's.
  std::vector<std::vector<int32_t>> grouping_probes;
  int64_t probe_queries = 12;
  // Gate training.
  GateKind kind = GateKind::kAttention;
  // What an attention gate attends over, in training and serving alike
  // (engine/gate.h): kWindow trains with a band mask (sinks and window)
  // and the runtime computes the same logits; kCache trains over the full
  // causal context and serves over sinks, window and retained tokens (and
  // keeps gate state for the retained tokens).
  GateContext gate_context = GateContext::kWindow;
  int64_t n_gate_heads = 2;
  int64_t gate_head_dim = 4;
  int64_t train_sequences = 160;
  int64_t train_tokens = 1024;  // tokens per training sequence
  int64_t epochs = 3;
  double learning_rate = 3e-3;
  double keep_rate_weight = 1.0;  // λ
  double target_keep_rate = 0.3;
  int64_t min_distant_queries = 32;  // a token is eligible with at least this many
  // Teacher importance: kMean, the mean attention a token receives from the
  // queries for which it is distant; kMax, the largest attention any one of
  // them gives it (a token one later query needs sharply — a name, a number
  // — matters even if the average is low).
  enum class Teacher { kMean, kMax };
  Teacher teacher = Teacher::kMean;
  int64_t n_sink_tokens = 4;
  int64_t n_window_tokens = 256;
  uint64_t seed = 1;
  // Held-out share of the training sequences for the report (not trained on).
  double holdout_fraction = 0.1;

  Status validate() const;  // names the field
};

struct CalibrationProgress {
  std::string_view stage;  // "grouping", "collecting", "training", "thresholds"
  int64_t done = 0;
  int64_t total = 0;
  double loss = 0.0;  // training: mean loss of the current epoch so far
};
using CalibrationProgressFn = std::function<void(const CalibrationProgress&)>;

struct CalibrationReport {
  // similarity[h][a * n_layers + b]: how well layer b tolerates layer a's
  // distant scores (shared_score_similarity), the value the grouping used:
  // the minimum of the text and probe similarities when there are probes.
  std::vector<std::vector<double>> similarity;
  std::vector<std::vector<double>> text_similarity;   // with probes: the texts' alone
  std::vector<std::vector<double>> probe_similarity;  // with probes: the probes' alone
  std::string block_map;
  int64_t grouping_tokens_seen = 0;
  int64_t training_tokens_seen = 0;
  std::vector<double> epoch_loss;
  // Held-out: share of the teacher's importance mass over eligible tokens
  // kept by the gates' flags (full-context logits, calibrated thresholds),
  // by an oracle keeping the top target share, and the keep rate reached.
  double holdout_mass_gate = 0.0;
  double holdout_mass_oracle = 0.0;
  double holdout_keep_rate = 0.0;
  double seconds_grouping = 0.0;
  double seconds_collecting = 0.0;
  double seconds_training = 0.0;
};

// Greedy grouping from a similarity matrix (exposed for tests): per head,
// layer l joins the current block while similarity(base, l) >= delta and the
// block is below max_block_layers (0 = no cap).
Result<kvstore::BlockMap> group_layers(const std::vector<std::vector<double>>& similarity,
                                       int64_t n_layers, double delta, int64_t max_block_layers);

// How well layer `l` tolerates PoD score sharing from base layer `b`, for
// one query: 1 − JSD (base 2) between layer l's attention distribution
// softmax(s_l) and the shared one softmax(h), where h takes l's own scores
// on proximal keys and b's scores on the distant keys [lo, hi). s_b and
// s_l are raw scores over keys [0, n). 1: sharing changes nothing.
// (Comparing the two layers' distant distributions alone, as PoD's
// similarity does, misses the scale of the scores: a layer whose distant
// distribution matches the base's can still give the distant tokens a very
// different share of its attention once the base's scores are mixed with
// its own proximal ones — measured: blocks of "similar" layers at 1 − JSD
// >= 0.6 cost +17% perplexity.)
double shared_score_similarity(const float* s_base, const float* s_layer, int64_t n, int64_t lo,
                               int64_t hi);

// A window of `tokens` consecutive token ids of documents[document] from
// `start`; shuffled_windows() cuts every document into such windows and
// shuffles them with the seed (calibration and the threshold fit draw their
// sequences from it).
struct TextWindow {
  int64_t document = 0;
  int64_t start = 0;
};
std::vector<TextWindow> shuffled_windows(std::span<const std::vector<int32_t>> documents,
                                         int64_t tokens, uint64_t seed);

// 1 − JSD (base 2) of two distributions given as non-negative weights over
// the same support (each normalized here); 1 for identical, 0 for disjoint.
double js_similarity(const float* a, const float* b, int64_t n);

// ---- the training arithmetic, exposed for tests (gradient checks, and the
// runtime-vs-training logit comparison).
//
// Parameters of one slot flattened: attention wq | wk | wv | wo | bias
// (3·D·n_embd + D + 1), linear w | bias (n_embd + 1). x holds t_end rows of
// n_embd floats (the base layer's normalized input).
int64_t gate_param_count(const GateModel& shape);
// The flat parameters of slot s of a model, and back.
std::vector<float> gate_flat_params(const GateModel& gate, int64_t slot);
// Training logits for every token where eligible[t] (others 0), over the
// context of shape.context: kCache the full causal context [0, t]; kWindow
// the band j < shape.n_sink_tokens or j >= t + 1 - shape.n_window_tokens —
// which is what GatePrefill/GateDecoder attend over for such a gate, so the
// runtime's logits equal these (to fp16 rounding of its rows). K/V are
// rounded to fp16 as the runtime stores them (round_kv = false: exact, for
// gradient checks).
std::vector<float> gate_training_logits(const GateModel& shape, std::span<const float> params,
                                        const float* x, int64_t t_end,
                                        const std::vector<uint8_t>& eligible,
                                        bool round_kv = true);
// Loss (mean BCE over eligible tokens against labels y + λ·(mean p −
// rate)²) and its gradient with respect to params (grad resized).
double gate_loss_and_gradient(const GateModel& shape, std::span<const float> params,
                              const float* x, int64_t t_end, const std::vector<uint8_t>& eligible,
                              const std::vector<float>& y, double rate, double lambda,
                              std::vector<float>& grad, bool round_kv = true);

// Calibrates gates for `forward`'s model from `documents` (token ids of
// independent texts; sequences are cut from them). INVALID_ARGUMENT when the
// documents hold too few tokens for the requested sequences.
Result<GateModel> calibrate(CpuForward& forward, std::span<const std::vector<int32_t>> documents,
                            const CalibrationOptions& options,
                            const CalibrationProgressFn& progress = {},
                            CalibrationReport* report = nullptr);

}  // namespace kvgate::engine
