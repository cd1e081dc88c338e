#include "engine/gate_file.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <unordered_set>
#include <utility>
#include <vector>

#include "engine/ggml_types.h"
#include "engine/model.h"

namespace kvgate::engine {

namespace {

constexpr uint32_t kAlignment = 32;

// Keys, spelled once.
constexpr std::string_view kArchitectureKey = "general.architecture";
constexpr std::string_view kVersionKey = "kvgate.gate.version";
constexpr std::string_view kKindKey = "kvgate.gate.kind";
constexpr std::string_view kContextKey = "kvgate.gate.context";
constexpr std::string_view kGateHeadsKey = "kvgate.gate.n_gate_heads";
constexpr std::string_view kGateHeadDimKey = "kvgate.gate.gate_head_dim";
constexpr std::string_view kGateEmbdKey = "kvgate.gate.n_embd";
constexpr std::string_view kBlockMapKey = "kvgate.gate.block_map";
constexpr std::string_view kSinkKey = "kvgate.gate.n_sink_tokens";
constexpr std::string_view kWindowKey = "kvgate.gate.n_window_tokens";
constexpr std::string_view kKeepRateKey = "kvgate.gate.target_keep_rate";
constexpr std::string_view kSimilarityKey = "kvgate.gate.similarity_threshold";
constexpr std::string_view kNoteKey = "kvgate.gate.calibration_note";
constexpr std::string_view kModelArchKey = "kvgate.model.architecture";
constexpr std::string_view kModelLayersKey = "kvgate.model.n_layers";
constexpr std::string_view kModelEmbdKey = "kvgate.model.n_embd";
constexpr std::string_view kModelHeadsKey = "kvgate.model.n_heads";
constexpr std::string_view kModelKvHeadsKey = "kvgate.model.n_kv_heads";
constexpr std::string_view kModelHeadDimKey = "kvgate.model.head_dim";
constexpr std::string_view kModelVocabKey = "kvgate.model.n_vocab";
constexpr std::string_view kModelCrcKey = "kvgate.model.token_embd_crc32c";

constexpr std::string_view kBiasTensor = "gate.bias";
constexpr std::string_view kThresholdTensor = "gate.threshold";

// Same bound as GateModel::validate(); checked before any tensor shape is
// computed from these counts.
constexpr int64_t kMaxGateHeads = 64;
constexpr int64_t kMaxGateHeadDim = 64;

std::string tensor_name(int64_t slot, std::string_view field) {
  return "gate." + std::to_string(slot) + "." + std::string(field);
}

// A string read from a file, made safe for an error message.
std::string quoted(std::string_view s) {
  constexpr size_t kMaxShown = 64;
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    const auto ch = static_cast<unsigned char>(s[i]);
    if (ch >= 0x20 && ch < 0x7f && ch != '\'') {
      out += static_cast<char>(ch);
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[ch >> 4];
      out += kHex[ch & 15];
    }
  }
  if (s.size() > kMaxShown) out += "...";
  return out + "'";
}

std::string shape_text(std::span<const int64_t> dims) {
  std::string out = "{";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "}";
}

std::string_view type_name(GgmlType type) {
  const auto traits = ggml_type_traits(static_cast<uint32_t>(type));
  return traits ? traits->name : std::string_view("unknown");
}

// ------------------------------------------------------------------ reading

// Typed access to one file's keys and tensors; every error names the file.
class GateReader {
 public:
  GateReader(const GgufFile& file, std::string_view source) : file_(file), source_(source) {}

  Status error(StatusCode code, const std::string& message) const {
    return Status(code, "gate file " + source_ + ": " + message);
  }

  // The key must exist with exactly `type`.
  Status expect_type(std::string_view key, GgufValueType type) const {
    auto t = file_.type_of(key);
    if (!t.ok()) {
      return error(StatusCode::kInvalidArgument, "missing key '" + std::string(key) + "' (" +
                                                     std::string(gguf_value_type_name(type)) + ")");
    }
    if (*t != type) {
      return error(StatusCode::kInvalidArgument, "key '" + std::string(key) + "' has type " +
                                                     std::string(gguf_value_type_name(*t)) +
                                                     ", expected " +
                                                     std::string(gguf_value_type_name(type)));
    }
    return Status();
  }

  bool has(std::string_view key) const { return file_.type_of(key).ok(); }

  Result<int64_t> u32(std::string_view key) const {
    KVGATE_RETURN_IF_ERROR(expect_type(key, GgufValueType::kU32));
    return forward(key, file_.get_int(key));
  }
  Result<double> f64(std::string_view key) const {
    KVGATE_RETURN_IF_ERROR(expect_type(key, GgufValueType::kF64));
    return forward(key, file_.get_float(key));
  }
  Result<std::string> str(std::string_view key) const {
    KVGATE_RETURN_IF_ERROR(expect_type(key, GgufValueType::kString));
    KVGATE_ASSIGN_OR_RETURN(std::string_view v, forward(key, file_.get_string(key)));
    return std::string(v);
  }

  // The tensor's values as floats; it must have exactly `dims` and be F32,
  // or F16 where `allow_f16`.
  Result<std::vector<float>> floats(std::string_view name, std::span<const uint64_t> dims,
                                    bool allow_f16) const {
    const GgufTensorInfo* t = file_.find_tensor(name);
    if (t == nullptr) {
      return error(StatusCode::kInvalidArgument, "missing tensor '" + std::string(name) + "'");
    }
    bool same = t->dims.size() == dims.size();
    for (size_t i = 0; same && i < dims.size(); ++i) {
      same = static_cast<uint64_t>(t->dims[i]) == dims[i];
    }
    if (!same) {
      std::string expected = "{";
      for (size_t i = 0; i < dims.size(); ++i)
        expected += (i ? ", " : "") + std::to_string(dims[i]);
      return error(StatusCode::kInvalidArgument, "tensor '" + std::string(name) + "' has shape " +
                                                     shape_text(t->dims) + ", expected " +
                                                     expected + "}");
    }
    const bool f16 = t->type == GgmlType::kF16;
    if (t->type != GgmlType::kF32 && !(allow_f16 && f16)) {
      return error(StatusCode::kInvalidArgument, "tensor '" + std::string(name) + "' has type " +
                                                     std::string(type_name(t->type)) +
                                                     ", expected " +
                                                     (allow_f16 ? "F32 or F16" : "F32"));
    }
    // The reader checked that size_bytes of data lie inside the file.
    const auto n = static_cast<size_t>(t->n_elements());
    std::vector<float> out(n);
    if (f16) {
      for (size_t i = 0; i < n; ++i) {
        fp16_t h;
        std::memcpy(&h, t->data + i * sizeof(fp16_t), sizeof h);
        out[i] = fp16_to_fp32(h);
      }
    } else {
      std::memcpy(out.data(), t->data, n * sizeof(float));
    }
    return out;
  }

 private:
  template <typename T>
  Result<T> forward(std::string_view key, Result<T> r) const {
    if (r.ok()) return r;
    return error(r.status().code(), "key '" + std::string(key) + "': " + r.status().message());
  }

  const GgufFile& file_;
  std::string source_;
};

// ------------------------------------------------------------------ writing

Status check_u32(std::string_view key, int64_t v) {
  if (v < 0 || v > static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
    return invalid_argument("gate: " + std::string(key) + " = " + std::to_string(v) +
                            " does not fit the file's u32");
  }
  return Status();
}

// Adds one slot matrix in the chosen storage type. fp16 overflow is an
// error rather than a silent inf that the loader would then reject.
Status add_weights(GgufWriter& w, const std::string& name, std::span<const int64_t> ne,
                   const std::vector<float>& v, GateWeightType type) {
  if (type == GateWeightType::kF32) return w.add_tensor_f32(name, ne, v);
  std::vector<uint8_t> bytes(v.size() * sizeof(fp16_t));
  for (size_t i = 0; i < v.size(); ++i) {
    const fp16_t h = fp32_to_fp16(v[i]);
    if (!std::isfinite(fp16_to_fp32(h))) {
      return invalid_argument("gate: " + name + "[" + std::to_string(i) +
                              "] = " + std::to_string(v[i]) +
                              " is beyond the fp16 range; save with GateWeightType::kF32");
    }
    std::memcpy(bytes.data() + i * sizeof(fp16_t), &h, sizeof h);
  }
  return w.add_tensor_raw(name, ne, GgmlType::kF16, bytes);
}

}  // namespace

Result<GgufWriter> gate_to_gguf(const GateModel& gate, GateWeightType type) {
  KVGATE_RETURN_IF_ERROR(gate.validate());
  const ModelFingerprint& m = gate.model;
  const std::pair<std::string_view, int64_t> u32_fields[] = {
      {kGateHeadsKey, gate.n_gate_heads}, {kGateHeadDimKey, gate.gate_head_dim},
      {kGateEmbdKey, gate.n_embd},        {kSinkKey, gate.n_sink_tokens},
      {kWindowKey, gate.n_window_tokens}, {kModelLayersKey, m.n_layers},
      {kModelEmbdKey, m.n_embd},          {kModelHeadsKey, m.n_heads},
      {kModelKvHeadsKey, m.n_kv_heads},   {kModelHeadDimKey, m.head_dim},
      {kModelVocabKey, m.n_vocab},
  };
  for (const auto& [key, v] : u32_fields) KVGATE_RETURN_IF_ERROR(check_u32(key, v));

  GgufWriter w(kAlignment);
  w.set_string(kArchitectureKey, kGateFileArchitecture);
  w.set_uint32(kVersionKey, kGateFileVersion);
  w.set_string(kKindKey, gate_kind_name(gate.kind));
  w.set_string(kContextKey, gate_context_name(gate.context));
  w.set_uint32(kGateHeadsKey, static_cast<uint32_t>(gate.n_gate_heads));
  w.set_uint32(kGateHeadDimKey, static_cast<uint32_t>(gate.gate_head_dim));
  w.set_uint32(kGateEmbdKey, static_cast<uint32_t>(gate.n_embd));
  w.set_string(kBlockMapKey, gate.blocks.to_string());
  w.set_uint32(kSinkKey, static_cast<uint32_t>(gate.n_sink_tokens));
  w.set_uint32(kWindowKey, static_cast<uint32_t>(gate.n_window_tokens));
  w.set_float64(kKeepRateKey, gate.target_keep_rate);
  w.set_float64(kSimilarityKey, gate.similarity_threshold);
  w.set_string(kNoteKey, gate.calibration_note);
  w.set_string(kModelArchKey, m.architecture);
  w.set_uint32(kModelLayersKey, static_cast<uint32_t>(m.n_layers));
  w.set_uint32(kModelEmbdKey, static_cast<uint32_t>(m.n_embd));
  w.set_uint32(kModelHeadsKey, static_cast<uint32_t>(m.n_heads));
  w.set_uint32(kModelKvHeadsKey, static_cast<uint32_t>(m.n_kv_heads));
  w.set_uint32(kModelHeadDimKey, static_cast<uint32_t>(m.head_dim));
  w.set_uint32(kModelVocabKey, static_cast<uint32_t>(m.n_vocab));
  w.set_uint32(kModelCrcKey, m.token_embd_crc32c);

  const int64_t d = gate.gate_dim();
  const int64_t proj_ne[] = {gate.n_embd, d};
  const int64_t wo_ne[] = {gate.kind == GateKind::kAttention ? d : gate.n_embd};
  std::vector<float> bias, threshold;
  bias.reserve(gate.slots.size());
  threshold.reserve(gate.slots.size());
  for (size_t s = 0; s < gate.slots.size(); ++s) {
    const GateSlot& slot = gate.slots[s];
    const auto si = static_cast<int64_t>(s);
    if (gate.kind == GateKind::kAttention) {
      KVGATE_RETURN_IF_ERROR(add_weights(w, tensor_name(si, "wq"), proj_ne, slot.wq, type));
      KVGATE_RETURN_IF_ERROR(add_weights(w, tensor_name(si, "wk"), proj_ne, slot.wk, type));
      KVGATE_RETURN_IF_ERROR(add_weights(w, tensor_name(si, "wv"), proj_ne, slot.wv, type));
    }
    KVGATE_RETURN_IF_ERROR(add_weights(w, tensor_name(si, "wo"), wo_ne, slot.wo, type));
    bias.push_back(slot.bias);
    threshold.push_back(slot.threshold);
  }
  const int64_t slots_ne[] = {static_cast<int64_t>(gate.slots.size())};
  KVGATE_RETURN_IF_ERROR(w.add_tensor_f32(kBiasTensor, slots_ne, bias));
  KVGATE_RETURN_IF_ERROR(w.add_tensor_f32(kThresholdTensor, slots_ne, threshold));
  return w;
}

Result<GateModel> gate_from_gguf(const GgufFile& file, std::string_view source) {
  const GateReader r(file, source);
  const auto bad = [&](const std::string& m) { return r.error(StatusCode::kInvalidArgument, m); };

  // Identity first: a model file passed by mistake should say so, not list
  // missing keys.
  KVGATE_ASSIGN_OR_RETURN(const std::string arch, r.str(kArchitectureKey));
  if (arch != kGateFileArchitecture) {
    return bad("general.architecture is " + quoted(arch) + ", expected '" +
               std::string(kGateFileArchitecture) + "': not a kvgate gate side file");
  }
  KVGATE_ASSIGN_OR_RETURN(const int64_t version, r.u32(kVersionKey));
  if (version < kMinGateFileVersion || version > kGateFileVersion) {
    return failed_precondition("gate file " + std::string(source) + " has format version " +
                               std::to_string(version) + "; this kvgate reads versions " +
                               std::to_string(kMinGateFileVersion) + " to " +
                               std::to_string(kGateFileVersion));
  }

  GateModel g;
  ModelFingerprint& m = g.model;
  KVGATE_ASSIGN_OR_RETURN(m.architecture, r.str(kModelArchKey));
  KVGATE_ASSIGN_OR_RETURN(m.n_layers, r.u32(kModelLayersKey));
  KVGATE_ASSIGN_OR_RETURN(m.n_embd, r.u32(kModelEmbdKey));
  KVGATE_ASSIGN_OR_RETURN(m.n_heads, r.u32(kModelHeadsKey));
  KVGATE_ASSIGN_OR_RETURN(m.n_kv_heads, r.u32(kModelKvHeadsKey));
  KVGATE_ASSIGN_OR_RETURN(m.head_dim, r.u32(kModelHeadDimKey));
  KVGATE_ASSIGN_OR_RETURN(m.n_vocab, r.u32(kModelVocabKey));
  KVGATE_ASSIGN_OR_RETURN(const int64_t crc, r.u32(kModelCrcKey));
  m.token_embd_crc32c = static_cast<uint32_t>(crc);

  KVGATE_ASSIGN_OR_RETURN(const std::string kind_name, r.str(kKindKey));
  auto kind = parse_gate_kind(kind_name);
  if (!kind.ok()) return bad("key '" + std::string(kKindKey) + "': " + kind.status().message());
  g.kind = *kind;
  // Required from version 2; a version-1 file (written before the key
  // existed) reads as kCache, the only semantics there was.
  g.context = GateContext::kCache;
  if (version >= 2 || r.has(kContextKey)) {
    KVGATE_ASSIGN_OR_RETURN(const std::string context_name, r.str(kContextKey));
    auto context = parse_gate_context(context_name);
    if (!context.ok()) {
      return bad("key '" + std::string(kContextKey) + "': " + context.status().message());
    }
    g.context = *context;
  }
  KVGATE_ASSIGN_OR_RETURN(g.n_gate_heads, r.u32(kGateHeadsKey));
  KVGATE_ASSIGN_OR_RETURN(g.gate_head_dim, r.u32(kGateHeadDimKey));
  KVGATE_ASSIGN_OR_RETURN(g.n_embd, r.u32(kGateEmbdKey));
  KVGATE_ASSIGN_OR_RETURN(g.n_sink_tokens, r.u32(kSinkKey));
  KVGATE_ASSIGN_OR_RETURN(g.n_window_tokens, r.u32(kWindowKey));
  KVGATE_ASSIGN_OR_RETURN(g.target_keep_rate, r.f64(kKeepRateKey));
  KVGATE_ASSIGN_OR_RETURN(g.similarity_threshold, r.f64(kSimilarityKey));
  KVGATE_ASSIGN_OR_RETURN(g.calibration_note, r.str(kNoteKey));

  KVGATE_ASSIGN_OR_RETURN(const std::string map_text, r.str(kBlockMapKey));
  auto blocks = kvstore::BlockMap::parse(map_text, m.n_layers);
  if (!blocks.ok()) {
    return bad("key '" + std::string(kBlockMapKey) + "': " + blocks.status().message());
  }
  g.blocks = std::move(*blocks);
  if (g.blocks.n_kv_heads() != m.n_kv_heads) {
    return bad("key '" + std::string(kBlockMapKey) + "' has " +
               std::to_string(g.blocks.n_kv_heads()) + " kv heads; " +
               std::string(kModelKvHeadsKey) + " is " + std::to_string(m.n_kv_heads));
  }

  // The counts that size the tensors are checked before use, so the shape
  // errors below are about the tensors, not about these keys; validate()
  // repeats them.
  if (g.n_embd != m.n_embd) {
    return bad(std::string(kGateEmbdKey) + " " + std::to_string(g.n_embd) + " differs from " +
               std::string(kModelEmbdKey) + " " + std::to_string(m.n_embd));
  }
  const bool attention = g.kind == GateKind::kAttention;
  if (attention ? (g.n_gate_heads < 1 || g.n_gate_heads > kMaxGateHeads || g.gate_head_dim < 1 ||
                   g.gate_head_dim > kMaxGateHeadDim)
                : (g.n_gate_heads != 0 || g.gate_head_dim != 0)) {
    return bad(std::string(kGateHeadsKey) + " " + std::to_string(g.n_gate_heads) + " and " +
               std::string(kGateHeadDimKey) + " " + std::to_string(g.gate_head_dim) +
               (attention ? " must each be in [1, 64] for the attention kind"
                          : " must be 0 for the linear kind"));
  }

  const int64_t n_slots = g.blocks.n_slots();
  const auto d = static_cast<uint64_t>(g.gate_dim());
  const auto n_embd = static_cast<uint64_t>(g.n_embd);
  const uint64_t proj_dims[] = {n_embd, d};
  const uint64_t wo_dims[] = {attention ? d : n_embd};
  const uint64_t slot_dims[] = {static_cast<uint64_t>(n_slots)};

  // Exactly the expected tensors: an extra one means a writer and this
  // reader disagree about the format.
  std::unordered_set<std::string> expected;
  for (int64_t s = 0; s < n_slots; ++s) {
    if (attention) {
      for (std::string_view f : {"wq", "wk", "wv"}) expected.insert(tensor_name(s, f));
    }
    expected.insert(tensor_name(s, "wo"));
  }
  expected.insert(std::string(kBiasTensor));
  expected.insert(std::string(kThresholdTensor));
  for (const GgufTensorInfo& t : file.tensors()) {
    if (expected.count(t.name) == 0) {
      return bad("unexpected tensor " + quoted(t.name) + " for a " + gate_kind_name(g.kind) +
                 " gate with " + std::to_string(n_slots) + " slots");
    }
  }

  KVGATE_ASSIGN_OR_RETURN(const std::vector<float> bias, r.floats(kBiasTensor, slot_dims, false));
  KVGATE_ASSIGN_OR_RETURN(const std::vector<float> threshold,
                          r.floats(kThresholdTensor, slot_dims, false));
  g.slots.resize(static_cast<size_t>(n_slots));
  for (int64_t s = 0; s < n_slots; ++s) {
    GateSlot& slot = g.slots[s];
    if (attention) {
      KVGATE_ASSIGN_OR_RETURN(slot.wq, r.floats(tensor_name(s, "wq"), proj_dims, true));
      KVGATE_ASSIGN_OR_RETURN(slot.wk, r.floats(tensor_name(s, "wk"), proj_dims, true));
      KVGATE_ASSIGN_OR_RETURN(slot.wv, r.floats(tensor_name(s, "wv"), proj_dims, true));
    }
    KVGATE_ASSIGN_OR_RETURN(slot.wo, r.floats(tensor_name(s, "wo"), wo_dims, true));
    slot.bias = bias[s];
    slot.threshold = threshold[s];
  }

  Status valid = g.validate();
  if (!valid.ok()) return r.error(valid.code(), valid.message());
  return g;
}

Status save_gate_file(const std::string& path, const GateModel& gate, GateWeightType type) {
  auto w = gate_to_gguf(gate, type);
  if (!w.ok()) {
    return Status(w.status().code(), "cannot save gate file " + path + ": " + w.status().message());
  }
  return w->write_file(path);
}

Result<GateModel> load_gate_file(const std::string& path) {
  auto file = GgufFile::open(path);
  if (!file.ok()) {
    return Status(file.status().code(), "gate file " + path + ": " + file.status().message());
  }
  return gate_from_gguf(*file, path);
}

Result<GateModel> load_gate_for_model(const std::string& path, const LlamaModel& model) {
  KVGATE_ASSIGN_OR_RETURN(GateModel gate, load_gate_file(path));
  KVGATE_ASSIGN_OR_RETURN(const ModelFingerprint fp, fingerprint_model(model));
  Status match = check_gate_matches(gate, fp);
  if (!match.ok()) {
    // "gate file was calibrated ..." -> "gate file PATH was calibrated ..."
    constexpr std::string_view kLead = "gate file ";
    std::string msg = match.message();
    if (msg.rfind(kLead, 0) == 0) {
      msg.insert(kLead.size(), path + " ");
    } else {
      msg = "gate file " + path + ": " + msg;
    }
    return Status(match.code(), std::move(msg));
  }
  return gate;
}

}  // namespace kvgate::engine
