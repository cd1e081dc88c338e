#include "coordinator/openai_format.h"

#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

namespace kvgate::coordinator {

using nlohmann::json;

namespace {

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

json usage_json(const GenerationUsage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

bool is_chat(const ResponseContext& ctx) {
  return ctx.route == ApiRoute::kChatCompletions;
}

json chunk_base(const ResponseContext& ctx) {
  json j = {{"id", ctx.id},
            {"object", is_chat(ctx) ? "chat.completion.chunk" : "text_completion"},
            {"created", ctx.created_unix},
            {"model", ctx.model}};
  if (ctx.include_usage) j["usage"] = nullptr;
  return j;
}

// One chunk with a single choice.
std::string choice_event(const ResponseContext& ctx, json choice_payload, const json& finish) {
  json j = chunk_base(ctx);
  json choice = {{"index", 0}};
  if (is_chat(ctx)) {
    choice["delta"] = std::move(choice_payload);
  } else {
    choice["text"] = std::move(choice_payload);
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish;
  j["choices"] = json::array({choice});
  return sse_event(dump(j));
}

uint64_t process_salt() {
  static const uint64_t salt = [] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }();
  return salt;
}

}  // namespace

std::string make_response_id(ApiRoute route, uint64_t sequence) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%s%016llx%08llx",
                route == ApiRoute::kChatCompletions ? "chatcmpl-" : "cmpl-",
                static_cast<unsigned long long>(process_salt()),
                static_cast<unsigned long long>(sequence & 0xffffffffull));
  return buf;
}

std::string completion_body(const ResponseContext& ctx, std::string_view text,
                            const GenerationResult& result) {
  json choice = {{"index", 0}};
  if (is_chat(ctx)) {
    choice["message"] = {{"role", "assistant"}, {"content", std::string(text)}};
  } else {
    choice["text"] = std::string(text);
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = result.finish_reason;
  json j = {{"id", ctx.id},
            {"object", is_chat(ctx) ? "chat.completion" : "text_completion"},
            {"created", ctx.created_unix},
            {"model", ctx.model},
            {"choices", json::array({choice})},
            {"usage", usage_json(result.usage)}};
  return dump(j);
}

std::string sse_event(std::string_view payload) {
  std::string out;
  out.reserve(payload.size() + 8);
  out += "data: ";
  out += payload;
  out += "\n\n";
  return out;
}

std::string stream_start_events(const ResponseContext& ctx) {
  if (!is_chat(ctx)) return {};
  return choice_event(ctx, json{{"role", "assistant"}, {"content", ""}}, nullptr);
}

std::string stream_text_event(const ResponseContext& ctx, std::string_view text) {
  if (is_chat(ctx)) return choice_event(ctx, json{{"content", std::string(text)}}, nullptr);
  return choice_event(ctx, json(std::string(text)), nullptr);
}

std::string stream_end_events(const ResponseContext& ctx, const GenerationResult& result) {
  std::string out =
      choice_event(ctx, is_chat(ctx) ? json::object() : json(""), json(result.finish_reason));
  if (ctx.include_usage) {
    json j = chunk_base(ctx);
    j["choices"] = json::array();
    j["usage"] = usage_json(result.usage);
    out += sse_event(dump(j));
  }
  out += sse_event("[DONE]");
  return out;
}

std::string stream_error_event(const ApiError& error) {
  return sse_event(error_body(error));
}

std::string models_body(std::span<const ServedModel> models) {
  json data = json::array();
  for (const ServedModel& m : models) {
    data.push_back({{"id", m.name},
                    {"object", "model"},
                    {"created", m.created_unix},
                    {"owned_by", "kvgate"},
                    {"max_model_len", m.context_tokens}});
  }
  return dump(json{{"object", "list"}, {"data", data}});
}

}  // namespace kvgate::coordinator
