// Loading a model and its tokenizer for a subcommand, with errors that name
// the file.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
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

}  // namespace kvgate::cli
