#include "engine/gate_runtime.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "engine/gate_math.h"

namespace kvgate::engine {
namespace {

// Layout slot -> gate model slot. With shared keys the layout's block map
// is the gate's, slot for slot; without (policy `gate`), every layer of a
// gate block has its own one-layer slot driven by that block's gate.
std::vector<int32_t> map_slots(const GateModel& gate, const kvstore::KvLayout& layout) {
  const kvstore::BlockMap& map = layout.blocks;
  std::vector<int32_t> out(static_cast<size_t>(map.n_slots()));
  for (int64_t s = 0; s < map.n_slots(); ++s) {
    const int64_t h = map.slot_head(s);
    const int64_t layer = map.slot_block(s).first_layer;
    out[s] = static_cast<int32_t>(gate.blocks.slot_of_layer(layer, h));
  }
  return out;
}

}  // namespace

Result<kvstore::KvLayout> make_gate_layout(const LlamaConfig& config, const GateModel& gate,
                                           bool share_keys, int64_t n_sink_tokens,
                                           int64_t n_window_tokens) {
  KVGATE_RETURN_IF_ERROR(gate.validate());
  if (gate.blocks.n_layers() != config.n_layers || gate.blocks.n_kv_heads() != config.n_kv_heads ||
      gate.n_embd != config.n_embd) {
    return failed_precondition("gate model shapes do not match the model (layers " +
                               std::to_string(gate.blocks.n_layers()) + " vs " +
                               std::to_string(config.n_layers) + ")");
  }
  kvstore::KvLayout layout;
  if (share_keys) {
    layout.blocks = gate.blocks;
  } else {
    KVGATE_ASSIGN_OR_RETURN(layout.blocks,
                            kvstore::BlockMap::dense(config.n_layers, config.n_kv_heads));
  }
  layout.head_dim = config.head_dim;
  layout.n_sink_tokens = n_sink_tokens;
  layout.n_window_tokens = n_window_tokens;
  layout.gate_state_bytes_per_token = gate.state_bytes_per_token();
  // A window-context gate never reads a retained token's gate row.
  layout.gate_state_retained = gate.state_retained();
  KVGATE_RETURN_IF_ERROR(kvstore::validate_layout(layout));
  return layout;
}

// ------------------------------------------------------------ GatePrefill

GatePrefill::GatePrefill(const GateModel& gate, const kvstore::KvLayout& layout, int64_t n_tokens,
                         cpu::Isa isa)
    : gate_(gate), layout_(layout), n_tokens_(n_tokens), isa_(isa), gate_slot_(map_slots(gate, layout)) {
  const int64_t width = gate_.kind == GateKind::kAttention ? 3 * gate_.gate_dim() : 1;
  proj_.assign(static_cast<size_t>(n_tokens_ * gate_.slots.size() * width), 0.0f);
}

void GatePrefill::on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                                 std::span<const int64_t> row_pos, std::span<const int32_t>) {
  const int64_t n_gate_slots = static_cast<int64_t>(gate_.slots.size());
  const int64_t width = gate_.kind == GateKind::kAttention ? 3 * gate_.gate_dim() : 1;
  for (int64_t g = 0; g < n_gate_slots; ++g) {
    if (gate_.blocks.slot_block(g).first_layer != layer) continue;
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t pos = row_pos[r];
      if (pos < 0 || pos >= n_tokens_) continue;
      float* out = proj_.data() + (pos * n_gate_slots + g) * width;
      gate_project(gate_, g, xn + r * gate_.n_embd, out, isa_);
    }
  }
}

kvstore::DenseGate GatePrefill::dense_gate(const std::vector<fp16_t>& gate_rows) const {
  const int64_t row = 2 * gate_.gate_dim();
  const int64_t n_slots = layout_.blocks.n_slots();
  return {gate_rows.data(), n_slots * row, row};
}

void GatePrefill::size_outputs(std::vector<uint8_t>& flags, std::vector<fp16_t>& gate_rows) {
  const int64_t n_slots = layout_.blocks.n_slots();
  const bool attention = gate_.kind == GateKind::kAttention;
  const int64_t row = 2 * gate_.gate_dim();
  flags.assign(static_cast<size_t>(n_slots * n_tokens_), 0);
  logits_.assign(static_cast<size_t>(n_slots * n_tokens_), 0.0f);
  gate_rows.assign(attention ? static_cast<size_t>(n_tokens_ * n_slots * row) : 0, fp16_t{0});
  computed_.assign(gate_.slots.size(), 0);
}

Status GatePrefill::finish(const GateDecision& decision, std::vector<uint8_t>& flags,
                           std::vector<fp16_t>& gate_rows) {
  size_outputs(flags, gate_rows);
  for (int64_t g = 0; g < static_cast<int64_t>(gate_.slots.size()); ++g) {
    compute_gate_slot(g, decision, flags, gate_rows);
  }
  return Status();
}

Status GatePrefill::finish_slots(const GateDecision& decision, std::span<const int64_t> layout_slots,
                                 std::vector<uint8_t>& flags, std::vector<fp16_t>& gate_rows) {
  const int64_t n_slots = layout_.blocks.n_slots();
  if (computed_.empty()) size_outputs(flags, gate_rows);
  for (int64_t s : layout_slots) {
    if (s < 0 || s >= n_slots) {
      return invalid_argument("gate prefill: slot " + std::to_string(s) + " not in [0, " +
                              std::to_string(n_slots) + ")");
    }
    const int32_t g = gate_slot_[s];
    if (!computed_[g]) compute_gate_slot(g, decision, flags, gate_rows);
  }
  return Status();
}

// The flags, logits and gate rows of every layout slot that uses gate slot
// g (layout slots sharing a gate slot copy its result).
void GatePrefill::compute_gate_slot(int64_t g, const GateDecision& decision,
                                    std::vector<uint8_t>& flags, std::vector<fp16_t>& gate_rows) {
  computed_[g] = 1;
  const int64_t n_slots = layout_.blocks.n_slots();
  const int64_t n_gate_slots = static_cast<int64_t>(gate_.slots.size());
  const int64_t t_end = n_tokens_;
  const int64_t n_sink = layout_.n_sink_tokens;
  const int64_t window = layout_.n_window_tokens;
  const bool attention = gate_.kind == GateKind::kAttention;
  const int64_t dim = gate_.gate_dim();
  const int64_t row = 2 * dim;
  bool used = false;
  for (int64_t s = 0; s < n_slots && !used; ++s) used = gate_slot_[s] == g;
  if (!used) return;

  // Buffers kept across gate slots (one allocation per prefill).
  std::vector<float>& gate_logits = work_.logits;
  std::vector<uint8_t>& gate_flags = work_.flags;
  std::vector<fp16_t>& kv16 = work_.kv16;
  // The same rows in fp32 (exactly the fp16 values): the context of every
  // token reads them, converting once here instead of per read.
  std::vector<float>& kv32 = work_.kv32;
  std::vector<int32_t>& context = work_.context;
  std::vector<float>& scratch = work_.scratch;
  gate_logits.resize(static_cast<size_t>(t_end));
  gate_flags.resize(static_cast<size_t>(t_end));
  kv16.resize(static_cast<size_t>(attention ? t_end * row : 0));
  kv32.resize(static_cast<size_t>(attention ? t_end * row : 0));
  context.reserve(static_cast<size_t>(t_end));
  const float threshold = gate_.slots[g].threshold + static_cast<float>(decision.threshold_offset);
  if (!attention) {
    for (int64_t t = 0; t < t_end; ++t) {
      gate_logits[t] = proj_[t * n_gate_slots + g];
      gate_flags[t] = gate_logits[t] >= threshold ? 1 : 0;
    }
  } else {
    const int64_t width = 3 * dim;
    for (int64_t t = 0; t < t_end; ++t) {
      const float* p = proj_.data() + (t * n_gate_slots + g) * width;
      for (int64_t e = 0; e < row; ++e) {
        kv16[t * row + e] = fp32_to_fp16(p[dim + e]);
        kv32[t * row + e] = fp16_to_fp32(kv16[t * row + e]);
      }
    }
    // Retained distant tokens, in position order, as the cache holds them
    // (context kCache; a window-context gate attends over sinks and window
    // only, so its logits depend on no flag).
    const bool with_retained = gate_.context == GateContext::kCache;
    std::vector<int32_t> retained;
    for (int64_t t = 0; t < t_end; ++t) {
      // At length t + 1 the distant range is [n_sink, t + 1 - window): the
      // token entering it now is t - window (if it is not a sink), and
      // its flag applies (decode: begin_append of token t).
      const int64_t leaving = t - window;
      if (with_retained && leaving >= n_sink && gate_flags[leaving]) {
        retained.push_back(static_cast<int32_t>(leaving));
      }
      context.clear();
      for (int64_t i = 0; i < std::min(n_sink, t + 1); ++i) context.push_back(static_cast<int32_t>(i));
      context.insert(context.end(), retained.begin(), retained.end());
      for (int64_t i = std::max(n_sink, t + 1 - window); i <= t; ++i) {
        context.push_back(static_cast<int32_t>(i));
      }
      const float* q = proj_.data() + (t * n_gate_slots + g) * width;
      gate_logits[t] = gate_attention_logit(
          gate_, g, q, static_cast<int64_t>(context.size()),
          [&](int64_t c) -> const float* { return kv32.data() + context[c] * row; }, scratch);
      gate_flags[t] = gate_logits[t] >= threshold ? 1 : 0;
    }
  }
  if (decision.retained_budget_tokens > 0) {
    // Budget: the prompt's highest logits among non-sink tokens, at most
    // the budget; tokens generated later are not retained (see header).
    std::fill(gate_flags.begin(), gate_flags.end(), 0);
    std::vector<int32_t> order;
    for (int64_t t = n_sink; t < t_end; ++t) order.push_back(static_cast<int32_t>(t));
    const auto k = std::min<int64_t>(decision.retained_budget_tokens, static_cast<int64_t>(order.size()));
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int32_t a, int32_t b) { return gate_logits[a] > gate_logits[b]; });
    for (int64_t i = 0; i < k; ++i) gate_flags[order[i]] = 1;
  }
  for (int64_t s = 0; s < n_slots; ++s) {
    if (gate_slot_[s] != g) continue;
    for (int64_t t = 0; t < t_end; ++t) {
      flags[s * t_end + t] = gate_flags[t];
      logits_[s * t_end + t] = gate_logits[t];
      if (attention) {
        std::copy(kv16.data() + t * row, kv16.data() + (t + 1) * row,
                  gate_rows.data() + (t * n_slots + s) * row);
      }
    }
  }
  // Sinks never leave; their flag is irrelevant but set for clarity.
  for (int64_t s = 0; s < n_slots; ++s) {
    if (gate_slot_[s] != g) continue;
    for (int64_t t = 0; t < std::min(n_sink, t_end); ++t) flags[s * t_end + t] = 1;
  }
}

// ------------------------------------------------------------ GateDecoder

GateDecoder::GateDecoder(const GateModel& gate, const kvstore::KvLayout& layout, cpu::Isa isa)
    : gate_(gate),
      layout_(layout),
      isa_(isa),
      with_retained_(gate.context == GateContext::kCache),
      gate_slot_(map_slots(gate, layout)) {}

void GateDecoder::bind(std::span<kvstore::CompressedKvCache* const> caches,
                       const GateDecision& decision) {
  caches_.assign(caches.begin(), caches.end());
  decision_ = decision;
  status_ = Status();
}

void GateDecoder::on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                                 std::span<const int64_t>, std::span<const int32_t> row_item) {
  const int64_t n_slots = layout_.blocks.n_slots();
  const bool attention = gate_.kind == GateKind::kAttention;
  const int64_t dim = gate_.gate_dim();
  const int64_t row = 2 * dim;
  float proj[3 * kMaxGateDim + 1];
  fp16_t own[2 * kMaxGateDim];
  int64_t last_gate = -1;
  for (int64_t r = 0; r < n_rows; ++r) {
    if (row_item[r] < 0 || row_item[r] >= static_cast<int32_t>(caches_.size())) continue;
    kvstore::CompressedKvCache* cache = caches_[row_item[r]];
    last_gate = -1;
    float logit = 0.0f;
    for (int64_t s = 0; s < n_slots; ++s) {
      const int32_t g = gate_slot_[s];
      if (gate_.blocks.slot_block(g).first_layer != layer) continue;
      if (g != last_gate) {
        gate_project(gate_, g, xn + r * gate_.n_embd, proj, isa_);
        if (!attention) {
          logit = proj[0];
        } else {
          for (int64_t e = 0; e < row; ++e) own[e] = fp32_to_fp16(proj[dim + e]);
        }
      }
      if (attention) {
        std::copy(own, own + row, cache->new_gate_row(s));
        if (g != last_gate) {
          // Context: the slot's proximal rows (the new token's row included,
          // just written) and, for context kCache, its retained rows.
          auto near = cache->gate_proximal(s);
          auto far = with_retained_ ? cache->gate_distant(s)
                                    : Result<kvstore::GateRowsView>(kvstore::GateRowsView());
          if (!near.ok() || !far.ok()) {
            if (status_.ok()) status_ = !near.ok() ? near.status() : far.status();
            continue;
          }
          const int64_t n_near = near->n_rows();
          logit = gate_attention_logit(
              gate_, g, proj, n_near + far->n_rows(),
              [&](int64_t c) { return c < n_near ? near->row(c) : far->row(c - n_near); },
              scratch_);
        }
      }
      last_gate = g;
      uint8_t flag = logit >= gate_.slots[g].threshold + static_cast<float>(decision_.threshold_offset) ? 1 : 0;
      // Budget mode retains prompt tokens only (see GateDecision).
      if (decision_.retained_budget_tokens > 0) flag = 0;
      cache->set_flag_unchecked(s, flag);
    }
  }
}

}  // namespace kvgate::engine
