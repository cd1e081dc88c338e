// OpenAI-shaped response bodies and server-sent-event chunks.
//
// Pure string building (nlohmann::json inside), callable from any thread.
// Shapes follow the OpenAI API:
//   completion   {"id":"cmpl-..","object":"text_completion","created","model",
//                 "choices":[{"index":0,"text","logprobs":null,"finish_reason"}],
//                 "usage":{"prompt_tokens","completion_tokens","total_tokens"}}
//   chat         {"id":"chatcmpl-..","object":"chat.completion",...,"choices":
//                 [{"index":0,"message":{"role":"assistant","content"},
//                   "logprobs":null,"finish_reason"}],"usage":{..}}
//   streaming    "data: {chunk}\n\n" events: chat starts with a delta holding
//                the role; text deltas; a chunk with finish_reason; with
//                stream_options.include_usage every chunk has "usage":null and
//                a last chunk has "choices":[] and the usage; then
//                "data: [DONE]\n\n".
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "coordinator/backend.h"
#include "coordinator/openai_api.h"

namespace kvgate::coordinator {

// What every body of one response shares.
struct ResponseContext {
  ApiRoute route = ApiRoute::kCompletions;
  std::string id;  // "cmpl-..." / "chatcmpl-..."
  int64_t created_unix = 0;
  std::string model;
  bool include_usage = false;
};

// "cmpl-" or "chatcmpl-" followed by 24 hex digits unique to the process.
std::string make_response_id(ApiRoute route, uint64_t sequence);

std::string completion_body(const ResponseContext& ctx, std::string_view text,
                            const GenerationResult& result);

// One SSE event: "data: <payload>\n\n".
std::string sse_event(std::string_view payload);
// The events sent before any text (chat: the role delta; completions: none).
std::string stream_start_events(const ResponseContext& ctx);
std::string stream_text_event(const ResponseContext& ctx, std::string_view text);
// The finish chunk, the usage chunk (if asked) and "data: [DONE]".
std::string stream_end_events(const ResponseContext& ctx, const GenerationResult& result);
// An error after the stream began: {"error":{..}} as an event (no [DONE]).
std::string stream_error_event(const ApiError& error);

// GET /v1/models.
std::string models_body(std::span<const ServedModel> models);

}  // namespace kvgate::coordinator
