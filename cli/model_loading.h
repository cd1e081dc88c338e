// Loading a model and its tokenizer for a subcommand, with errors that name
// the file.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "common/status.h"
#include "engine/gate.h"
#include "engine/gate_file.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

namespace kvgate::cli {

struct LoadedModel {
  std::unique_ptr<engine::LlamaModel> model;
  std::unique_ptr<engine::Tokenizer> tokenizer;
};

// The message of an error starts with the path.
inline Result<LoadedModel> load_model_and_tokenizer(const std::string& path) {
  auto with_path = [&](const Status& s) { return Status(s.code(), path + ": " + s.message()); };
  auto model = engine::LlamaModel::load(path);
  if (!model.ok()) return with_path(model.status());
  auto spec = engine::tokenizer_spec_from_gguf((*model)->gguf());
  if (!spec.ok()) return with_path(spec.status());
  auto tok = engine::Tokenizer::create(std::move(*spec));
  if (!tok.ok()) return with_path(tok.status());
  LoadedModel out;
  out.model = std::move(*model);
  out.tokenizer = std::make_unique<engine::Tokenizer>(std::move(*tok));
  return out;
}

// The gate side file that sits next to a model: PATH with its ".gguf"
// replaced by ".gate.gguf" (appended when PATH does not end in ".gguf").
inline std::string gate_path_for_model(const std::string& model_path) {
  const std::string ext = ".gguf";
  if (model_path.size() >= ext.size() &&
      model_path.compare(model_path.size() - ext.size(), ext.size(), ext) == 0) {
    return model_path.substr(0, model_path.size() - ext.size()) + ".gate.gguf";
  }
  return model_path + ".gate.gguf";
}

// Which gate file a command uses: `explicit_path` when given (--gate), else
// the model's default gate file if it exists, else none ("").
struct GateSource {
  std::string path;       // "" when there is none
  bool from_option = false;  // given with --gate
};
inline GateSource find_gate_file(const std::string& explicit_path, const std::string& model_path) {
  if (!explicit_path.empty()) return {explicit_path, true};
  std::string path = gate_path_for_model(model_path);
  std::error_code ec;
  if (std::filesystem::is_regular_file(path, ec)) return {path, false};
  return {};
}

// An explicit --gate FILE must exist: checked before the model loads so the
// error comes at once. NOT_FOUND naming the file.
inline Status check_gate_file_exists(const GateSource& source) {
  if (source.path.empty()) return Status();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(source.path, ec)) {
    return not_found("gate file " + source.path + ": no such file");
  }
  return Status();
}

// Loads the gate of `source` for `model` (null when there is none). Errors
// name the file (engine/gate_file.h: another format version, a gate
// calibrated for another model, a malformed file).
inline Result<std::shared_ptr<const engine::GateModel>> load_gate(const GateSource& source,
                                                                  const engine::LlamaModel& model) {
  if (source.path.empty()) return std::shared_ptr<const engine::GateModel>();
  auto gate = engine::load_gate_for_model(source.path, model);
  if (!gate.ok()) return gate.status();
  return std::shared_ptr<const engine::GateModel>(
      std::make_shared<engine::GateModel>(std::move(*gate)));
}

}  // namespace kvgate::cli
