#include <cmath>
#include <cstdio>
#include <string>

#include "common/crc32c.h"
#include "engine/gate.h"
#include "engine/model.h"

namespace kvgate::engine {

namespace {

// Gate heads and their width are a few; a limit keeps a corrupt file from
// sizing huge buffers (D x n_embd per matrix and slot).
constexpr int64_t kMaxGateHeads = 64;
constexpr int64_t kMaxGateHeadDim = 64;

std::string hex32(uint32_t v) {
  char buf[11];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

std::string slot_name(const kvstore::BlockMap& blocks, int64_t s) {
  const kvstore::LayerBlock& b = blocks.slot_block(s);
  return "gate slot " + std::to_string(s) + " (kv head " + std::to_string(blocks.slot_head(s)) +
         ", layers " + std::to_string(b.first_layer) + "-" + std::to_string(b.end_layer() - 1) +
         ")";
}

// The first non-finite entry of `v`, or -1.
int64_t first_non_finite(const std::vector<float>& v) {
  for (size_t i = 0; i < v.size(); ++i) {
    if (!std::isfinite(v[i])) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace

Result<GateKind> parse_gate_kind(std::string_view name) {
  if (name == "attention") return GateKind::kAttention;
  if (name == "linear") return GateKind::kLinear;
  return invalid_argument("unknown gate kind '" + std::string(name) +
                          "' (known: attention, linear)");
}

const char* gate_kind_name(GateKind kind) {
  switch (kind) {
    case GateKind::kAttention:
      return "attention";
    case GateKind::kLinear:
      return "linear";
  }
  return "unknown";
}

Result<GateContext> parse_gate_context(std::string_view name) {
  if (name == "cache") return GateContext::kCache;
  if (name == "window") return GateContext::kWindow;
  return invalid_argument("unknown gate context '" + std::string(name) +
                          "' (known: cache, window)");
}

const char* gate_context_name(GateContext context) {
  switch (context) {
    case GateContext::kCache:
      return "cache";
    case GateContext::kWindow:
      return "window";
  }
  return "unknown";
}

Status GateModel::validate() const {
  auto bad = [](std::string m) { return invalid_argument("gate: " + std::move(m)); };
  auto num = [](auto v) { return std::to_string(v); };

  if (n_embd < 1) return bad("n_embd is " + num(n_embd) + ", must be >= 1");
  if (n_embd != model.n_embd) {
    return bad("n_embd " + num(n_embd) + " differs from the model's n_embd " + num(model.n_embd));
  }
  if (blocks.n_layers() < 1) return bad("block map is empty");
  if (blocks.n_layers() != model.n_layers) {
    return bad("block map has " + num(blocks.n_layers()) + " layers; the model has n_layers " +
               num(model.n_layers));
  }
  if (blocks.n_kv_heads() != model.n_kv_heads) {
    return bad("block map has " + num(blocks.n_kv_heads()) +
               " kv heads; the model has n_kv_heads " + num(model.n_kv_heads));
  }
  if (static_cast<int64_t>(slots.size()) != blocks.n_slots()) {
    return bad("has " + num(slots.size()) + " slots; the block map has " + num(blocks.n_slots()));
  }

  if (kind == GateKind::kAttention) {
    if (n_gate_heads < 1 || n_gate_heads > kMaxGateHeads) {
      return bad("n_gate_heads is " + num(n_gate_heads) + ", must be in [1, " + num(kMaxGateHeads) +
                 "] for the attention kind");
    }
    if (gate_head_dim < 1 || gate_head_dim > kMaxGateHeadDim) {
      return bad("gate_head_dim is " + num(gate_head_dim) + ", must be in [1, " +
                 num(kMaxGateHeadDim) + "] for the attention kind");
    }
  } else {
    if (n_gate_heads != 0) {
      return bad("n_gate_heads is " + num(n_gate_heads) + ", must be 0 for the linear kind");
    }
    if (gate_head_dim != 0) {
      return bad("gate_head_dim is " + num(gate_head_dim) + ", must be 0 for the linear kind");
    }
  }

  if (n_sink_tokens < 0) return bad("n_sink_tokens is " + num(n_sink_tokens) + ", must be >= 0");
  if (n_window_tokens < 1) {
    return bad("n_window_tokens is " + num(n_window_tokens) + ", must be >= 1");
  }
  // Written so that NaN fails too.
  if (!(target_keep_rate >= 0.0 && target_keep_rate <= 1.0)) {
    return bad("target_keep_rate is " + num(target_keep_rate) + ", must be in [0, 1]");
  }
  if (!std::isfinite(similarity_threshold)) {
    return bad("similarity_threshold is " + num(similarity_threshold) + ", must be finite");
  }

  const int64_t d = gate_dim();
  const bool attention = kind == GateKind::kAttention;
  const size_t proj_size = attention ? static_cast<size_t>(d * n_embd) : 0;
  const size_t wo_size = static_cast<size_t>(attention ? d : n_embd);
  const std::string proj_shape =
      attention ? " (gate_dim " + num(d) + " x n_embd " + num(n_embd) + ")" : " (linear kind)";
  const std::string wo_shape = attention ? " (gate_dim)" : " (n_embd)";
  for (size_t s = 0; s < slots.size(); ++s) {
    const GateSlot& slot = slots[s];
    const auto si = static_cast<int64_t>(s);
    struct Field {
      const char* name;
      const std::vector<float>* values;
      size_t expected;
      const std::string* shape;
    };
    const Field fields[] = {{"wq", &slot.wq, proj_size, &proj_shape},
                            {"wk", &slot.wk, proj_size, &proj_shape},
                            {"wv", &slot.wv, proj_size, &proj_shape},
                            {"wo", &slot.wo, wo_size, &wo_shape}};
    for (const Field& f : fields) {
      if (f.values->size() != f.expected) {
        return bad(slot_name(blocks, si) + ": " + f.name + " has " + num(f.values->size()) +
                   " values, expected " + num(f.expected) + *f.shape);
      }
      if (int64_t i = first_non_finite(*f.values); i >= 0) {
        return bad(slot_name(blocks, si) + ": " + f.name + "[" + num(i) + "] is " +
                   num((*f.values)[i]) + ", must be finite");
      }
    }
    if (!std::isfinite(slot.bias)) {
      return bad(slot_name(blocks, si) + ": bias is " + num(slot.bias) + ", must be finite");
    }
    if (!std::isfinite(slot.threshold)) {
      return bad(slot_name(blocks, si) + ": threshold is " + num(slot.threshold) +
                 ", must be finite");
    }
  }
  return Status();
}

Result<ModelFingerprint> fingerprint_model(const LlamaModel& model) {
  const LlamaConfig& c = model.config();
  // The tensor info, not the WeightView: it carries the byte size as stored
  // (ggml_row_bytes of the file's type), whatever the type.
  const GgufTensorInfo* embd = model.gguf().find_tensor("token_embd.weight");
  if (embd == nullptr || embd->data == nullptr) {
    return not_found("fingerprint: the model has no tensor 'token_embd.weight'");
  }
  ModelFingerprint f;
  f.architecture = c.architecture;
  f.n_layers = c.n_layers;
  f.n_embd = c.n_embd;
  f.n_heads = c.n_heads;
  f.n_kv_heads = c.n_kv_heads;
  f.head_dim = c.head_dim;
  f.n_vocab = c.n_vocab;
  f.token_embd_crc32c = crc32c(embd->data, embd->size_bytes);
  return f;
}

Status check_gate_matches(const GateModel& gate, const ModelFingerprint& model) {
  const ModelFingerprint& g = gate.model;
  auto differs = [](std::string_view field, const std::string& gate_value,
                    const std::string& model_value) {
    return failed_precondition("gate file was calibrated for a model with " + std::string(field) +
                               " " + gate_value + "; this model has " + model_value);
  };
  if (g.architecture != model.architecture) {
    return differs("architecture", "'" + g.architecture + "'", "'" + model.architecture + "'");
  }
  struct Field {
    const char* name;
    int64_t gate_value, model_value;
  };
  const Field fields[] = {
      {"n_layers", g.n_layers, model.n_layers}, {"n_embd", g.n_embd, model.n_embd},
      {"n_heads", g.n_heads, model.n_heads},    {"n_kv_heads", g.n_kv_heads, model.n_kv_heads},
      {"head_dim", g.head_dim, model.head_dim}, {"n_vocab", g.n_vocab, model.n_vocab},
  };
  for (const Field& f : fields) {
    if (f.gate_value != f.model_value) {
      return differs(f.name, std::to_string(f.gate_value), std::to_string(f.model_value));
    }
  }
  if (g.token_embd_crc32c != model.token_embd_crc32c) {
    return failed_precondition(
        "gate file was calibrated for a different model's weights: token_embd CRC32C " +
        hex32(g.token_embd_crc32c) + " in the gate, " + hex32(model.token_embd_crc32c) +
        " for this model (same shapes, other weights or quantization)");
  }
  return Status();
}

}  // namespace kvgate::engine
