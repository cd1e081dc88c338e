// OpenAI-compatible request bodies: parsing, validation and preparation.
//
// Two steps, both pure (no I/O, no Beast, no globals), callable from any
// thread:
//   1. parse_request(route, body): JSON syntax, the type and range of every
//      field, unsupported features refused by name. Needs no model.
//   2. prepare_generation(parsed, model, ...): the chat template, the
//      tokenizer, the context-length checks; gives what a Backend runs.
// Every failure is an ApiError: an HTTP status plus the OpenAI error body
// {"error":{"message","type","param","code"}}. Nothing here throws: the JSON
// library's exceptions are caught at the call and converted.
//
// Accepted fields (anything else is a 400 naming the field, as OpenAI does):
//   both routes  model, max_tokens, temperature [0,2], top_p (0,1], top_k
//                (extension, >= 0 or -1 = off), min_p [0,1] (extension),
//                repetition_penalty (0,10] (extension), n (1 only), stop
//                (string or up to 4 strings), stream, stream_options
//                {include_usage}, seed, presence_penalty / frequency_penalty
//                (0 only), user, logprobs (null/false/0 only), ignore_eos
//                (extension), logit_bias (empty only)
//   completions  prompt (string, [string], [token ids] or [[token ids]]),
//                echo (false only), best_of (1 only), suffix (null only)
//   chat         messages [{role: system|user|assistant|developer, content:
//                string or [{type: "text", text}], name}],
//                max_completion_tokens (alias of max_tokens), top_logprobs
//                (null/0 only)
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "common/status.h"
#include "coordinator/backend.h"
#include "engine/chat_template.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"

namespace kvgate::coordinator {

enum class ApiRoute { kCompletions, kChatCompletions };

// An error answer. `param` is the offending field ("" = none: JSON null).
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;
  std::string code;  // "" = JSON null
};

// A value or an ApiError (shaped like Result<T>).
template <typename T>
class ApiOr {
 public:
  ApiOr(T value) : v_(std::move(value)) {}         // NOLINT: implicit by design
  ApiOr(ApiError error) : v_(std::move(error)) {}  // NOLINT: implicit by design
  bool ok() const { return std::holds_alternative<T>(v_); }
  const ApiError& error() const { return std::get<ApiError>(v_); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, ApiError> v_;
};

// The error kinds the API answers with.
ApiError bad_request(std::string message, std::string param = {}, std::string code = {});
ApiError model_not_found(const std::string& model);                               // 404
ApiError route_not_found(const std::string& method, const std::string& path);     // 404
ApiError method_not_allowed(const std::string& method, const std::string& path);  // 405
ApiError invalid_api_key(bool missing);                                           // 401
ApiError body_too_large(int64_t limit_bytes);                                     // 413
ApiError queue_full(int64_t max_queued);                                          // 429
// The mapping of backend.h; kCancelled maps to 499 (never sent: the client
// is gone), kOk to 500.
ApiError api_error_from_status(const Status& status);
// {"error":{...}} as compact JSON.
std::string error_body(const ApiError& error);

// A parsed and range-checked request, before the model is involved.
struct ParsedRequest {
  ApiRoute route = ApiRoute::kCompletions;
  std::string model;
  // Completions: exactly one of these is set.
  std::optional<std::string> prompt_text;
  std::optional<std::vector<int64_t>> prompt_ids;  // ids range-checked against the vocabulary later
  // Chat.
  std::vector<engine::ChatMessage> messages;
  std::optional<int64_t> max_tokens;            // unset = the server default
  std::string max_tokens_param = "max_tokens";  // or "max_completion_tokens", for errors
  engine::SamplingParams sampling;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool ignore_eos = false;
  std::string user;
};

// Refuses a body that is not a JSON object, and any field that is not
// accepted, of the wrong type or out of range.
ApiOr<ParsedRequest> parse_request(ApiRoute route, std::string_view body);

// A model the front end serves: its tokenizer and chat template are used to
// count tokens before a request is admitted.
struct ServedModel {
  std::string name;
  int64_t context_tokens = 0;  // prompt + completion limit
  std::shared_ptr<const engine::Tokenizer> tokenizer;
  std::shared_ptr<const engine::ChatTemplate> chat_template;  // null: chat requests get 400
  int64_t created_unix = 0;                                   // for /v1/models
};

// The model named by the request, or 404 model_not_found.
ApiOr<const ServedModel*> find_served_model(std::span<const ServedModel> models,
                                            const std::string& name);

struct PrepareOptions {
  int64_t default_max_tokens = 256;  // when the request gives none (capped by the context)
};

// Applies the chat template, tokenizes and checks the lengths:
// an empty prompt -> 400 (prompt / messages); a prompt of the context
// length or longer -> 400 naming the field with both token counts;
// prompt + max_tokens over the context -> 400 naming max_tokens.
// The returned request has no id yet.
ApiOr<GenerationRequest> prepare_generation(const ParsedRequest& request, const ServedModel& model,
                                            const PrepareOptions& options);

}  // namespace kvgate::coordinator
