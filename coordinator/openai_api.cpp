#include "coordinator/openai_api.h"

#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>
#include <unordered_map>

namespace kvgate::coordinator {

using nlohmann::json;

namespace {

constexpr size_t kMaxStopStrings = 4;
constexpr int64_t kMaxTokensLimit = int64_t{1} << 24;
constexpr int64_t kMaxMessages = 1 << 16;

std::string dump(const json& j) {
  // Strings inside come from parsed JSON or our own text, but be safe with
  // invalid UTF-8 (dump() would throw): replace it.
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "an integer";
    case json::value_t::number_float:
      return "a number";
    default:
      return "an unsupported value";
  }
}

ApiError wrong_type(const std::string& name, const char* want, const json& got) {
  return bad_request("'" + name + "' must be " + want + ", got " + type_name(got), name);
}

std::string format_number(double v) {
  json j = v;
  return j.dump();
}

// A JSON number as a double, in [lo, hi] (lo excluded when lo_open).
ApiOr<double> number_in(const json& v, const std::string& name, double lo, double hi,
                        bool lo_open = false) {
  if (!v.is_number()) return wrong_type(name, "a number", v);
  const double d = v.get<double>();
  const bool below = lo_open ? !(d > lo) : !(d >= lo);
  if (!std::isfinite(d) || below || d > hi) {
    return bad_request("'" + name + "' must be in " + (lo_open ? "(" : "[") + format_number(lo) +
                           ", " + format_number(hi) + "], got " + format_number(d),
                       name);
  }
  return d;
}

// A JSON integer (or a float with an integral value) in [lo, hi].
ApiOr<int64_t> integer_in(const json& v, const std::string& name, int64_t lo, int64_t hi) {
  int64_t i = 0;
  if (v.is_number_integer() && !v.is_number_unsigned()) {
    i = v.get<int64_t>();
  } else if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) {
      return bad_request("'" + name + "' is out of range", name);
    }
    i = static_cast<int64_t>(u);
  } else if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9.0e15) {
      return wrong_type(name, "an integer", v);
    }
    i = static_cast<int64_t>(d);
  } else {
    return wrong_type(name, "an integer", v);
  }
  if (i < lo || i > hi) {
    return bad_request("'" + name + "' must be in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "], got " + std::to_string(i),
                       name);
  }
  return i;
}

ApiOr<bool> boolean(const json& v, const std::string& name) {
  if (!v.is_boolean()) return wrong_type(name, "a boolean", v);
  return v.get<bool>();
}

ApiOr<std::string> string_value(const json& v, const std::string& name) {
  if (!v.is_string()) return wrong_type(name, "a string", v);
  return v.get<std::string>();
}

ApiError unsupported(const std::string& name, const std::string& what) {
  return bad_request(
      "'" + name + "' is not supported by kvgate" + (what.empty() ? "" : ": " + what), name,
      "unsupported_parameter");
}

// A list of token ids (range against the vocabulary is checked later).
ApiOr<std::vector<int64_t>> token_ids(const json& v, const std::string& name) {
  std::vector<int64_t> ids;
  ids.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    auto id = integer_in(v[i], name + "[" + std::to_string(i) + "]", 0, INT32_MAX);
    if (!id.ok()) return id.error();
    ids.push_back(*id);
  }
  return ids;
}

Status parse_prompt(const json& v, ParsedRequest& out, ApiError& err) {
  const std::string name = "prompt";
  auto fail = [&](ApiError e) {
    err = std::move(e);
    return invalid_argument("");
  };
  if (v.is_string()) {
    out.prompt_text = v.get<std::string>();
    return Status();
  }
  if (!v.is_array()) {
    return fail(wrong_type(name, "a string, an array of one string or an array of token ids", v));
  }
  if (v.empty()) return fail(bad_request("'prompt' must not be empty", name));
  if (v[0].is_string()) {
    if (v.size() != 1) {
      return fail(
          bad_request("'prompt' with several prompts is not supported (n prompts in one "
                      "request); send one request per prompt",
                      name, "unsupported_parameter"));
    }
    out.prompt_text = v[0].get<std::string>();
    return Status();
  }
  if (v[0].is_array()) {
    if (v.size() != 1) {
      return fail(
          bad_request("'prompt' with several token lists is not supported; send one "
                      "request per prompt",
                      name, "unsupported_parameter"));
    }
    if (v[0].empty()) return fail(bad_request("'prompt' must not be empty", name));
    auto ids = token_ids(v[0], "prompt[0]");
    if (!ids.ok()) return fail(ids.error());
    out.prompt_ids = std::move(*ids);
    return Status();
  }
  auto ids = token_ids(v, name);
  if (!ids.ok()) return fail(ids.error());
  out.prompt_ids = std::move(*ids);
  return Status();
}

ApiOr<std::vector<engine::ChatMessage>> parse_messages(const json& v) {
  const std::string name = "messages";
  if (!v.is_array()) return wrong_type(name, "an array of messages", v);
  if (v.empty()) return bad_request("'messages' must not be empty", name);
  if (v.size() > static_cast<size_t>(kMaxMessages)) {
    return bad_request("'messages' has more than " + std::to_string(kMaxMessages) + " entries",
                       name);
  }
  std::vector<engine::ChatMessage> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string at = "messages[" + std::to_string(i) + "]";
    const json& m = v[i];
    if (!m.is_object()) return wrong_type(at, "an object", m);
    engine::ChatMessage msg;
    bool have_role = false, have_content = false;
    for (auto it = m.begin(); it != m.end(); ++it) {
      const std::string field = at + "." + it.key();
      const json& f = it.value();
      if (it.key() == "role") {
        if (!f.is_string()) return wrong_type(field, "a string", f);
        std::string role = f.get<std::string>();
        if (role == "developer") role = "system";  // OpenAI's newer name for system
        if (role != "system" && role != "user" && role != "assistant") {
          return bad_request("'" + field + "' must be system, user or assistant, got '" +
                                 f.get<std::string>() + "'",
                             field);
        }
        msg.role = std::move(role);
        have_role = true;
      } else if (it.key() == "content") {
        if (f.is_string()) {
          msg.content = f.get<std::string>();
        } else if (f.is_array()) {
          // Content parts: only text parts, concatenated.
          for (size_t p = 0; p < f.size(); ++p) {
            const std::string part = field + "[" + std::to_string(p) + "]";
            const json& cp = f[p];
            if (!cp.is_object()) return wrong_type(part, "an object", cp);
            auto type = cp.find("type");
            if (type == cp.end() || !type->is_string() || type->get<std::string>() != "text") {
              return bad_request("'" + part +
                                     ".type' must be \"text\" (only text content is "
                                     "supported)",
                                 part + ".type");
            }
            auto text = cp.find("text");
            if (text == cp.end() || !text->is_string()) {
              return bad_request("'" + part + ".text' must be a string", part + ".text");
            }
            for (auto k = cp.begin(); k != cp.end(); ++k) {
              if (k.key() != "type" && k.key() != "text") {
                return bad_request("Unrecognized content part field: " + part + "." + k.key(),
                                   part + "." + k.key());
              }
            }
            msg.content += text->get<std::string>();
          }
        } else {
          return wrong_type(field, "a string or an array of text parts", f);
        }
        have_content = true;
      } else if (it.key() == "name") {
        if (!f.is_string() && !f.is_null()) return wrong_type(field, "a string", f);
      } else if (it.key() == "tool_calls" || it.key() == "function_call" ||
                 it.key() == "tool_call_id") {
        return unsupported(field, "tools and function calls");
      } else {
        return bad_request("Unrecognized message field: " + field, field);
      }
    }
    if (!have_role) return bad_request("'" + at + ".role' is required", at + ".role");
    if (!have_content) return bad_request("'" + at + ".content' is required", at + ".content");
    out.push_back(std::move(msg));
  }
  return out;
}

ApiOr<std::vector<std::string>> parse_stop(const json& v) {
  const std::string name = "stop";
  std::vector<std::string> out;
  if (v.is_string()) {
    if (!v.get<std::string>().empty()) out.push_back(v.get<std::string>());
    return out;
  }
  if (!v.is_array()) return wrong_type(name, "a string or an array of strings", v);
  if (v.size() > kMaxStopStrings) {
    return bad_request("'stop' takes at most " + std::to_string(kMaxStopStrings) +
                           " strings, got " + std::to_string(v.size()),
                       name);
  }
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_string()) return wrong_type("stop[" + std::to_string(i) + "]", "a string", v[i]);
    if (v[i].get<std::string>().empty()) {
      return bad_request("'stop[" + std::to_string(i) + "]' must not be empty",
                         "stop[" + std::to_string(i) + "]");
    }
    out.push_back(v[i].get<std::string>());
  }
  return out;
}

using FieldHandler = std::function<std::optional<ApiError>(const json&, ParsedRequest&)>;

// Wraps an ApiOr-returning check that stores its value.
template <typename T, typename Check, typename Store>
FieldHandler field(Check check, Store store) {
  return [check, store](const json& v, ParsedRequest& r) -> std::optional<ApiError> {
    ApiOr<T> got = check(v);
    if (!got.ok()) return got.error();
    store(r, std::move(*got));
    return std::nullopt;
  };
}

std::unordered_map<std::string, FieldHandler> make_handlers(ApiRoute route) {
  std::unordered_map<std::string, FieldHandler> h;
  auto num = [](const char* name, double lo, double hi, bool lo_open = false) {
    return [=](const json& v) { return number_in(v, name, lo, hi, lo_open); };
  };
  h["model"] = field<std::string>([](const json& v) { return string_value(v, "model"); },
                                  [](ParsedRequest& r, std::string s) { r.model = std::move(s); });
  auto max_tokens = [](const char* name) {
    return field<int64_t>([name](const json& v) { return integer_in(v, name, 1, kMaxTokensLimit); },
                          [name](ParsedRequest& r, int64_t n) {
                            r.max_tokens = n;
                            r.max_tokens_param = name;
                          });
  };
  h["max_tokens"] = max_tokens("max_tokens");
  h["temperature"] = field<double>(num("temperature", 0, 2), [](ParsedRequest& r, double d) {
    r.sampling.temperature = static_cast<float>(d);
  });
  h["top_p"] = field<double>(num("top_p", 0, 1, true), [](ParsedRequest& r, double d) {
    r.sampling.top_p = static_cast<float>(d);
  });
  h["top_k"] = field<int64_t>(
      [](const json& v) { return integer_in(v, "top_k", -1, INT32_MAX); },
      [](ParsedRequest& r, int64_t k) { r.sampling.top_k = k < 0 ? 0 : static_cast<int32_t>(k); });
  h["min_p"] = field<double>(num("min_p", 0, 1), [](ParsedRequest& r, double d) {
    r.sampling.min_p = static_cast<float>(d);
  });
  h["repetition_penalty"] = field<double>(
      num("repetition_penalty", 0, 10, true),
      [](ParsedRequest& r, double d) { r.sampling.repetition_penalty = static_cast<float>(d); });
  h["n"] = [](const json& v, ParsedRequest&) -> std::optional<ApiError> {
    auto n = integer_in(v, "n", 1, 128);
    if (!n.ok()) return n.error();
    if (*n != 1) return unsupported("n", "only n = 1 is supported (send n requests instead)");
    return std::nullopt;
  };
  h["stop"] = field<std::vector<std::string>>(
      parse_stop, [](ParsedRequest& r, std::vector<std::string> s) { r.stop = std::move(s); });
  h["stream"] = field<bool>([](const json& v) { return boolean(v, "stream"); },
                            [](ParsedRequest& r, bool b) { r.stream = b; });
  h["stream_options"] = [](const json& v, ParsedRequest& r) -> std::optional<ApiError> {
    if (!v.is_object()) return wrong_type("stream_options", "an object", v);
    for (auto it = v.begin(); it != v.end(); ++it) {
      const std::string name = "stream_options." + it.key();
      if (it.key() == "include_usage") {
        if (it->is_null()) continue;
        auto b = boolean(*it, name);
        if (!b.ok()) return b.error();
        r.include_usage = *b;
      } else if (it.key() == "continuous_usage_stats") {
        if (!it->is_null() && !(it->is_boolean() && !it->get<bool>())) {
          return unsupported(name, "");
        }
      } else {
        return bad_request("Unrecognized request argument supplied: " + name, name);
      }
    }
    return std::nullopt;
  };
  h["seed"] = field<int64_t>(
      [](const json& v) { return integer_in(v, "seed", INT64_MIN, INT64_MAX); },
      [](ParsedRequest& r, int64_t s) { r.sampling.seed = static_cast<uint64_t>(s); });
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    h[name] = [name](const json& v, ParsedRequest&) -> std::optional<ApiError> {
      auto d = number_in(v, name, -2, 2);
      if (!d.ok()) return d.error();
      if (*d != 0.0) {
        return unsupported(name, "only 0 is accepted (use the repetition_penalty extension)");
      }
      return std::nullopt;
    };
  }
  h["user"] = field<std::string>([](const json& v) { return string_value(v, "user"); },
                                 [](ParsedRequest& r, std::string s) { r.user = std::move(s); });
  h["ignore_eos"] = field<bool>([](const json& v) { return boolean(v, "ignore_eos"); },
                                [](ParsedRequest& r, bool b) { r.ignore_eos = b; });
  h["logit_bias"] = [](const json& v, ParsedRequest&) -> std::optional<ApiError> {
    if (!v.is_object()) return wrong_type("logit_bias", "an object", v);
    if (!v.empty()) return unsupported("logit_bias", "");
    return std::nullopt;
  };
  h["logprobs"] = [](const json& v, ParsedRequest&) -> std::optional<ApiError> {
    if ((v.is_boolean() && !v.get<bool>()) || (v.is_number_integer() && v.get<int64_t>() == 0)) {
      return std::nullopt;
    }
    return unsupported("logprobs", "");
  };
  if (route == ApiRoute::kCompletions) {
    h["prompt"] = [](const json& v, ParsedRequest& r) -> std::optional<ApiError> {
      ApiError err;
      if (!parse_prompt(v, r, err).ok()) return err;
      return std::nullopt;
    };
    h["echo"] = [](const json& v, ParsedRequest&) -> std::optional<ApiError> {
      auto b = boolean(v, "echo");
      if (!b.ok()) return b.error();
      if (*b) return unsupported("echo", "");
      return std::nullopt;
    };
    h["best_of"] = [](const json& v, ParsedRequest&) -> std::optional<ApiError> {
      auto n = integer_in(v, "best_of", 1, 128);
      if (!n.ok()) return n.error();
      if (*n != 1) return unsupported("best_of", "only 1 is supported");
      return std::nullopt;
    };
    h["suffix"] = [](const json& v, ParsedRequest&) -> std::optional<ApiError> {
      if (v.is_string() && v.get<std::string>().empty()) return std::nullopt;
      return unsupported("suffix", "");
    };
  } else {
    h["messages"] = field<std::vector<engine::ChatMessage>>(
        parse_messages,
        [](ParsedRequest& r, std::vector<engine::ChatMessage> m) { r.messages = std::move(m); });
    h["max_completion_tokens"] = max_tokens("max_completion_tokens");
    h["top_logprobs"] = [](const json& v, ParsedRequest&) -> std::optional<ApiError> {
      if (v.is_number_integer() && v.get<int64_t>() == 0) return std::nullopt;
      return unsupported("top_logprobs", "");
    };
    for (const char* name : {"tools", "tool_choice", "functions", "function_call",
                             "parallel_tool_calls", "response_format", "audio", "modalities"}) {
      h[name] = [name](const json& v, ParsedRequest&) -> std::optional<ApiError> {
        if (std::string_view(name) == "response_format" && v.is_object()) {
          auto t = v.find("type");
          if (v.size() == 1 && t != v.end() && t->is_string() && t->get<std::string>() == "text") {
            return std::nullopt;
          }
        }
        return unsupported(name, "");
      };
    }
  }
  return h;
}

const std::unordered_map<std::string, FieldHandler>& handlers(ApiRoute route) {
  static const auto completions = make_handlers(ApiRoute::kCompletions);
  static const auto chat = make_handlers(ApiRoute::kChatCompletions);
  return route == ApiRoute::kCompletions ? completions : chat;
}

}  // namespace

ApiError bad_request(std::string message, std::string param, std::string code) {
  ApiError e;
  e.http_status = 400;
  e.message = std::move(message);
  e.param = std::move(param);
  e.code = std::move(code);
  return e;
}

ApiError model_not_found(const std::string& model) {
  ApiError e;
  e.http_status = 404;
  e.message = "The model '" + model + "' does not exist (see GET /v1/models)";
  e.param = "model";
  e.code = "model_not_found";
  return e;
}

ApiError route_not_found(const std::string& method, const std::string& path) {
  ApiError e;
  e.http_status = 404;
  e.message = "No route for " + method + " " + path;
  e.code = "not_found";
  return e;
}

ApiError method_not_allowed(const std::string& method, const std::string& path) {
  ApiError e;
  e.http_status = 405;
  e.message = "Method " + method + " is not allowed on " + path;
  e.code = "method_not_allowed";
  return e;
}

ApiError invalid_api_key(bool missing) {
  ApiError e;
  e.http_status = 401;
  e.message = missing ? "Missing API key: send it as 'Authorization: Bearer KEY'"
                      : "Incorrect API key provided";
  e.code = "invalid_api_key";
  return e;
}

ApiError body_too_large(int64_t limit_bytes) {
  ApiError e;
  e.http_status = 413;
  e.message = "Request body is larger than the limit of " + std::to_string(limit_bytes) +
              " bytes (coordinator.max_body_bytes)";
  e.code = "request_too_large";
  return e;
}

ApiError queue_full(int64_t max_queued) {
  ApiError e;
  e.http_status = 429;
  e.type = "rate_limit_error";
  e.message = "Too many requests are waiting (coordinator.max_queued_requests = " +
              std::to_string(max_queued) + "); retry later";
  e.code = "rate_limit_exceeded";
  return e;
}

ApiError api_error_from_status(const Status& status) {
  ApiError e;
  e.message = status.message();
  switch (status.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange:
    case StatusCode::kUnimplemented:
      e.http_status = 400;
      break;
    case StatusCode::kNotFound:
      e.http_status = 404;
      e.code = "not_found";
      break;
    case StatusCode::kResourceExhausted:
      e.http_status = 429;
      e.type = "rate_limit_error";
      e.code = "rate_limit_exceeded";
      break;
    case StatusCode::kUnavailable:
    case StatusCode::kDeadlineExceeded:
    case StatusCode::kFailedPrecondition:
      e.http_status = 503;
      e.type = "server_error";
      e.code = "service_unavailable";
      break;
    case StatusCode::kCancelled:
      e.http_status = 499;
      e.code = "cancelled";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
      e.code = "internal_error";
      if (e.message.empty()) e.message = "internal error";
      break;
  }
  return e;
}

std::string error_body(const ApiError& error) {
  json e = {{"message", error.message}, {"type", error.type}};
  e["param"] = error.param.empty() ? json(nullptr) : json(error.param);
  e["code"] = error.code.empty() ? json(nullptr) : json(error.code);
  return dump(json{{"error", e}});
}

ApiOr<ParsedRequest> parse_request(ApiRoute route, std::string_view body) {
  json doc = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    // Parse again for the position of the error; the exception is caught here.
    std::string where;
    try {
      json ignored = json::parse(body.begin(), body.end());
      (void)ignored;
    } catch (const json::parse_error& e) {
      where = " (at byte " + std::to_string(e.byte) + ")";
    } catch (...) {
    }
    return bad_request("Request body is not valid JSON" + where, {}, "invalid_json");
  }
  if (!doc.is_object()) return bad_request("Request body must be a JSON object", {});
  ParsedRequest out;
  out.route = route;
  const auto& table = handlers(route);
  bool have_model = false, have_input = false;
  bool have_max_tokens = false;
  try {
    for (auto it = doc.begin(); it != doc.end(); ++it) {
      auto h = table.find(it.key());
      if (h == table.end()) {
        return bad_request("Unrecognized request argument supplied: " + it.key(), it.key());
      }
      if (it.value().is_null()) {  // null = not given, except for the required fields
        if (it.key() == "model" || it.key() == "prompt" || it.key() == "messages") {
          return bad_request("'" + it.key() + "' must not be null", it.key());
        }
        continue;
      }
      if (it.key() == "max_tokens" || it.key() == "max_completion_tokens") {
        if (have_max_tokens) {
          // Both given: they must agree.
          auto v = integer_in(it.value(), it.key(), 1, kMaxTokensLimit);
          if (!v.ok()) return v.error();
          if (out.max_tokens != *v) {
            return bad_request("'max_tokens' and 'max_completion_tokens' disagree; give one",
                               it.key());
          }
          continue;
        }
        have_max_tokens = true;
      }
      if (auto err = h->second(it.value(), out)) return *err;
      if (it.key() == "model") have_model = true;
      if (it.key() == "prompt" || it.key() == "messages") have_input = true;
    }
  } catch (const json::exception& e) {
    // Our checks test types before reading values; this is a safety net.
    return bad_request(std::string("Request body could not be read: ") + e.what());
  }
  if (!have_model) return bad_request("'model' is required", "model");
  if (out.model.empty()) return bad_request("'model' must not be empty", "model");
  if (!have_input) {
    const char* name = route == ApiRoute::kCompletions ? "prompt" : "messages";
    return bad_request(std::string("'") + name + "' is required", name);
  }
  if (out.include_usage && !out.stream) {
    return bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options");
  }
  if (Status s = out.sampling.validate(); !s.ok()) return bad_request(s.message());
  return out;
}

ApiOr<const ServedModel*> find_served_model(std::span<const ServedModel> models,
                                            const std::string& name) {
  for (const ServedModel& m : models) {
    if (m.name == name) return &m;
  }
  return model_not_found(name);
}

ApiOr<GenerationRequest> prepare_generation(const ParsedRequest& request, const ServedModel& model,
                                            const PrepareOptions& options) {
  GenerationRequest out;
  out.model = model.name;
  std::string input_param;
  if (request.route == ApiRoute::kCompletions) {
    input_param = "prompt";
    if (request.prompt_ids) {
      const int64_t vocab = model.tokenizer->vocab_size();
      out.prompt_tokens.reserve(request.prompt_ids->size());
      for (size_t i = 0; i < request.prompt_ids->size(); ++i) {
        const int64_t id = (*request.prompt_ids)[i];
        if (id < 0 || id >= vocab) {
          return bad_request("'prompt' token id " + std::to_string(id) + " at index " +
                                 std::to_string(i) + " is outside the vocabulary of " +
                                 std::to_string(vocab) + " tokens",
                             "prompt");
        }
        out.prompt_tokens.push_back(static_cast<int32_t>(id));
      }
    } else {
      // Plain prompts are text: "<|im_start|>" in them is not a control token.
      out.prompt_tokens = model.tokenizer->encode(request.prompt_text.value_or(""),
                                                  /*add_special=*/true, /*parse_special=*/false);
    }
  } else {
    input_param = "messages";
    if (!model.chat_template) {
      return bad_request("The model '" + model.name +
                             "' has no supported chat template; use "
                             "/v1/completions",
                         "messages");
    }
    auto text = model.chat_template->apply(request.messages, /*add_generation_prompt=*/true);
    if (!text.ok()) return bad_request(text.status().message(), "messages");
    // The template's markers are control tokens (as `kvgate generate --chat`).
    out.prompt_tokens = model.tokenizer->encode(*text, /*add_special=*/true,
                                                /*parse_special=*/true);
  }
  const int64_t n_prompt = static_cast<int64_t>(out.prompt_tokens.size());
  if (n_prompt == 0) {
    return bad_request("'" + input_param + "' gives an empty prompt (0 tokens)", input_param);
  }
  if (n_prompt >= model.context_tokens) {
    return bad_request("'" + input_param + "' is " + std::to_string(n_prompt) +
                           " tokens, but the model's context is " +
                           std::to_string(model.context_tokens) +
                           " tokens (prompt plus completion); shorten it",
                       input_param, "context_length_exceeded");
  }
  const int64_t room = model.context_tokens - n_prompt;
  int64_t max_tokens = 0;
  if (request.max_tokens) {
    max_tokens = *request.max_tokens;
    if (max_tokens > room) {
      const std::string& param = request.max_tokens_param;
      return bad_request("'" + param + "' is " + std::to_string(max_tokens) +
                             " but the prompt is " + std::to_string(n_prompt) +
                             " tokens and the model's context is " +
                             std::to_string(model.context_tokens) + " tokens: at most " +
                             std::to_string(room) + " tokens can be generated",
                         param, "context_length_exceeded");
    }
  } else {
    max_tokens = std::min(options.default_max_tokens, room);
  }
  out.max_tokens = static_cast<int32_t>(max_tokens);
  out.sampling = request.sampling;
  out.stop = request.stop;
  out.ignore_eos = request.ignore_eos;
  return out;
}

}  // namespace kvgate::coordinator
