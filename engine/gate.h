// Attention-Gate (DESIGN.md §4): a small module per (block, KV head) slot
// that decides, once, when a token is created, whether its K/V survive when
// the token leaves the window.
//
// Input: the normalized input hidden state (after attn_norm) of the slot's
// base layer, one row of n_embd floats per token.
//
// Kinds:
//   attention  a reduced causal multi-head attention: per gate head a,
//              q_a = Wq_a x, k_a = Wk_a x, v_a = Wv_a x (width gate_head_dim,
//              no RoPE); o_a = softmax_i(q_a·k_i / sqrt(d')) v_i over the
//              slot's context (GateContext: sinks and window, plus the
//              retained tokens for kCache; its own K/V are kept only for
//              those, fp16, counted in the footprint);
//              logit = Σ_a wo_a·o_a + bias.
//   linear     token-local: logit = w·x + bias (an ablation; no state).
//
// Context of the attention kind, for token t of a slot:
//   kCache   the tokens the cache holds when t is created: sinks [0, n_sink),
//            the window [t + 1 - n_window, t] and the retained distant
//            tokens (flag 1). Gate state per retained token too; the
//            logits depend on earlier flags and drift with prompt length;
//            training (full causal context) and serving differ.
//   kWindow  sinks and window only. No gate state outlives the window
//            (KvLayout::gate_state_retained = false); training (a band
//            mask) and serving compute the same logits. The default of new
//            calibrations.
// flag = logit >= threshold (the threshold is calibrated per slot so that
// the calibration text keeps the target share of distant tokens).
//
// A GateModel is immutable after loading and may be shared between threads.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "kvstore/block_map.h"

namespace kvgate::engine {

class LlamaModel;

// Version of the gate side file format (engine/gate_file.h) that writers
// write. Readers take kMinGateFileVersion..kGateFileVersion and refuse any
// other. Version 2 added kvgate.gate.context: a version-1 reader would
// ignore it and run a window-context gate over the cache's context, so
// those readers must refuse such files; version-1 files read as kCache.
inline constexpr uint32_t kGateFileVersion = 2;
inline constexpr uint32_t kMinGateFileVersion = 1;

enum class GateKind { kAttention, kLinear };

Result<GateKind> parse_gate_kind(std::string_view name);  // "attention" | "linear"
const char* gate_kind_name(GateKind kind);

// What the attention kind's gate attends over (see above); no effect on the
// linear kind.
enum class GateContext { kCache, kWindow };

Result<GateContext> parse_gate_context(std::string_view name);  // "cache" | "window"
const char* gate_context_name(GateContext context);

// What identifies the model a gate was calibrated for. Two models with equal
// fingerprints have the same shapes and the same token embedding bytes.
struct ModelFingerprint {
  std::string architecture;  // general.architecture, "llama"
  int64_t n_layers = 0;
  int64_t n_embd = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t n_vocab = 0;
  uint32_t token_embd_crc32c = 0;  // CRC32C of the token_embd tensor's bytes as stored

  bool operator==(const ModelFingerprint&) const = default;
};

// The parameters of one (block, KV head) slot. Matrices are row-major
// [rows][n_embd]; D = n_gate_heads * gate_head_dim.
//   attention: wq, wk, wv have D x n_embd entries, wo has D.
//   linear:    wq, wk, wv are empty, wo has n_embd (the weight vector w).
struct GateSlot {
  std::vector<float> wq, wk, wv, wo;
  float bias = 0.0f;
  float threshold = 0.0f;  // on the logit: flag = logit >= threshold
};

struct GateModel {
  ModelFingerprint model;
  kvstore::BlockMap blocks;  // the layer grouping the gates were trained for
  GateKind kind = GateKind::kAttention;
  // kCache for files written before the context was recorded (version 1).
  GateContext context = GateContext::kCache;
  int64_t n_embd = 0;
  int64_t n_gate_heads = 2;   // h' (attention kind; 0 for linear)
  int64_t gate_head_dim = 8;  // d' (attention kind; 0 for linear)
  // Calibration settings, recorded so a run can be reproduced and so the
  // serving defaults match what the gates were trained for.
  int64_t n_sink_tokens = 4;
  int64_t n_window_tokens = 256;
  double target_keep_rate = 0.3;
  double similarity_threshold = 0.0;  // δ of the layer grouping
  std::string calibration_note;       // corpus, token count, command line
  std::vector<GateSlot> slots;        // BlockMap slot order

  int64_t gate_dim() const { return n_gate_heads * gate_head_dim; }
  // fp16 K and V of the gate per kept token and slot: 2·D·2 bytes for the
  // attention kind, 0 for linear (KvLayout::gate_state_bytes_per_token).
  int64_t state_bytes_per_token() const {
    return kind == GateKind::kAttention ? 2 * gate_dim() * 2 : 0;
  }
  // Whether retained distant tokens keep their gate state: only a
  // cache-context attention gate reads it (KvLayout::gate_state_retained).
  bool state_retained() const { return context == GateContext::kCache; }
  // Shapes consistent with kind, n_embd and the block map; finite values.
  // The error names the slot and the field.
  Status validate() const;
};

// The fingerprint of a loaded model (reads the embedding bytes once).
Result<ModelFingerprint> fingerprint_model(const LlamaModel& model);

// OK if the gate was calibrated for this model; otherwise
// FAILED_PRECONDITION naming the first field that differs, with both values
// ("gate file was calibrated for a model with n_layers 24; this model has 30").
Status check_gate_matches(const GateModel& gate, const ModelFingerprint& model);

}  // namespace kvgate::engine
