// The gate side file: a calibrated GateModel (engine/gate.h) stored next to
// the model it was calibrated for, as a GGUF v3 file that llama.cpp's gguf-py
// can read too.
//
// Format, version 2 (kGateFileVersion). Every key below is required and must
// have exactly the listed type; u32 fields hold the int64 values of the
// struct (save refuses values outside [0, 2^32)).
//
//   general.alignment               u32     32 (written by GgufWriter)
//   general.architecture            string  "kvgate-gate"
//   kvgate.gate.version             u32     2 (1 is read too, see below)
//   kvgate.gate.kind                string  "attention" | "linear"
//   kvgate.gate.context             string  "cache" | "window" (GateContext:
//                                           what an attention gate attends
//                                           over; see engine/gate.h)
//   kvgate.gate.n_gate_heads        u32     h' (0 for linear)
//   kvgate.gate.gate_head_dim       u32     d' (0 for linear)
//   kvgate.gate.n_embd              u32     input width, = the model's n_embd
//   kvgate.gate.block_map           string  BlockMap::to_string() text,
//                                           "h0: 0-3,4-7\nh1: 0,1-7\n"
//   kvgate.gate.n_sink_tokens       u32
//   kvgate.gate.n_window_tokens     u32
//   kvgate.gate.target_keep_rate    f64
//   kvgate.gate.similarity_threshold f64
//   kvgate.gate.calibration_note    string  (may be empty)
//   kvgate.model.architecture       string  the model's general.architecture
//   kvgate.model.n_layers           u32
//   kvgate.model.n_embd             u32
//   kvgate.model.n_heads            u32
//   kvgate.model.n_kv_heads         u32
//   kvgate.model.head_dim           u32
//   kvgate.model.n_vocab            u32
//   kvgate.model.token_embd_crc32c  u32     CRC32C of token_embd.weight's bytes
//
// Tensors, slot s in BlockMap slot order (D = n_gate_heads * gate_head_dim;
// shapes in ggml order, innermost first, so {n_embd, D} is row-major
// [D][n_embd]); the matrices are F16 or F32 (each may differ), the rest F32:
//
//   attention kind                          linear kind
//   gate.<s>.wq  {n_embd, D}                gate.<s>.wo  {n_embd}   (w)
//   gate.<s>.wk  {n_embd, D}
//   gate.<s>.wv  {n_embd, D}
//   gate.<s>.wo  {D}
//   gate.bias       {n_slots}  F32, per slot
//   gate.threshold  {n_slots}  F32, per slot
//
// No other tensor may be present. Unknown extra keys are ignored (a later
// writer may add informational keys without a version bump; a key that
// changes what the gate computes takes a new version, as context did).
//
// Version 1 is version 2 without kvgate.gate.context: such a file reads as
// context "cache" (a "context" key in it is read if present). Version 2
// exists so that readers of version 1 refuse window-context gates instead
// of silently running them over the cache's context.
//
// Threads: the functions are free of shared state; they block on the file
// system.
//
// Error contract: every error names the file ("gate file PATH: ...").
//   FAILED_PRECONDITION  a format version outside [1, 2]; a gate for another model
//                        (load_gate_for_model)
//   INVALID_ARGUMENT     not a gate file, a missing key, a key of the wrong
//                        type, an unknown kind or context (naming the key),
//                        a missing/extra/misshapen tensor, a value
//                        GateModel::validate() rejects; save of an invalid
//                        gate or of a weight beyond the fp16 range as F16
//   DATA_LOSS, UNIMPLEMENTED, NOT_FOUND, ...  as GgufFile::open reports them
//                        (truncated file, missing file, ...)
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"
#include "engine/gate.h"
#include "engine/gguf.h"
#include "engine/gguf_writer.h"

namespace kvgate::engine {

class LlamaModel;

// general.architecture of a gate side file.
inline constexpr std::string_view kGateFileArchitecture = "kvgate-gate";

// Storage type of the slot matrices (wq, wk, wv, wo). F16 halves the file;
// the gate runs on floats either way.
enum class GateWeightType { kF32, kF16 };

// Validates the gate, then writes it atomically (PATH.tmp, then rename).
Status save_gate_file(const std::string& path, const GateModel& gate,
                      GateWeightType type = GateWeightType::kF16);

// Reads and checks everything listed above, then GateModel::validate().
Result<GateModel> load_gate_file(const std::string& path);

// load_gate_file(), then check_gate_matches() against the model's
// fingerprint; a mismatch is FAILED_PRECONDITION naming the path.
Result<GateModel> load_gate_for_model(const std::string& path, const LlamaModel& model);

// The in-memory halves of save/load, for tools and tests. `source` names
// the file in error messages.
Result<GgufWriter> gate_to_gguf(const GateModel& gate, GateWeightType type);
Result<GateModel> gate_from_gguf(const GgufFile& file, std::string_view source);

}  // namespace kvgate::engine
