// Request parsing and validation of the OpenAI-compatible API, response
// shapes, and a mutation test: thousands of damaged bodies never crash and
// always give a request or a 4xx.
#include "coordinator/openai_api.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "coordinator/openai_format.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::coordinator {
namespace {

using nlohmann::json;

struct BadCase {
  ApiRoute route;
  std::string body;
  int status;
  std::string param;  // "" = null
};

constexpr ApiRoute kC = ApiRoute::kCompletions;
constexpr ApiRoute kChat = ApiRoute::kChatCompletions;

std::string completion(const std::string& extra) {
  return R"({"model":"m","prompt":"hi")" + (extra.empty() ? "" : "," + extra) + "}";
}
std::string chat(const std::string& extra) {
  return R"({"model":"m","messages":[{"role":"user","content":"hi"}])" +
         (extra.empty() ? "" : "," + extra) + "}";
}

TEST(OpenAiParse, BadBodiesGiveStatusAndParam) {
  const std::vector<BadCase> cases = {
      // Not JSON / not an object.
      {kC, "", 400, ""},
      {kC, "{", 400, ""},
      {kC, "{\"model\":\"m\",}", 400, ""},
      {kC, "[1,2]", 400, ""},
      {kC, "\"text\"", 400, ""},
      {kC, "null", 400, ""},
      {kC, "{\"model\":\"m\",\"prompt\":\"\xff\xfe\"}", 400, ""},  // invalid UTF-8
      // Required fields.
      {kC, R"({"prompt":"hi"})", 400, "model"},
      {kC, R"({"model":"m"})", 400, "prompt"},
      {kC, R"({"model":null,"prompt":"hi"})", 400, "model"},
      {kC, R"({"model":"","prompt":"hi"})", 400, "model"},
      {kC, R"({"model":5,"prompt":"hi"})", 400, "model"},
      {kC, R"({"model":"m","prompt":null})", 400, "prompt"},
      {kChat, R"({"model":"m"})", 400, "messages"},
      // Prompt shapes.
      {kC, R"({"model":"m","prompt":5})", 400, "prompt"},
      {kC, R"({"model":"m","prompt":{}})", 400, "prompt"},
      {kC, R"({"model":"m","prompt":[]})", 400, "prompt"},
      {kC, R"({"model":"m","prompt":["a","b"]})", 400, "prompt"},
      {kC, R"({"model":"m","prompt":[1,"a"]})", 400, "prompt[1]"},
      {kC, R"({"model":"m","prompt":[1,-2]})", 400, "prompt[1]"},
      {kC, R"({"model":"m","prompt":[1.5]})", 400, "prompt[0]"},
      {kC, R"({"model":"m","prompt":[[1],[2]]})", 400, "prompt"},
      {kC, R"({"model":"m","prompt":[[]]})", 400, "prompt"},
      {kC, R"({"model":"m","prompt":[[1,true]]})", 400, "prompt[0][1]"},
      {kC, R"({"model":"m","prompt":[3000000000]})", 400, "prompt[0]"},
      // Sampling fields: type and range.
      {kC, completion(R"("max_tokens":0)"), 400, "max_tokens"},
      {kC, completion(R"("max_tokens":-1)"), 400, "max_tokens"},
      {kC, completion(R"("max_tokens":1.5)"), 400, "max_tokens"},
      {kC, completion(R"("max_tokens":"10")"), 400, "max_tokens"},
      {kC, completion(R"("max_tokens":true)"), 400, "max_tokens"},
      {kC, completion(R"("max_tokens":1e30)"), 400, "max_tokens"},
      {kC, completion(R"("max_tokens":18446744073709551615)"), 400, "max_tokens"},
      {kC, completion(R"("temperature":-0.1)"), 400, "temperature"},
      {kC, completion(R"("temperature":2.5)"), 400, "temperature"},
      {kC, completion(R"("temperature":"hot")"), 400, "temperature"},
      {kC, completion(R"("temperature":1e999)"), 400, ""},  // overflow: not valid JSON
      {kC, completion(R"("top_p":0)"), 400, "top_p"},
      {kC, completion(R"("top_p":1.01)"), 400, "top_p"},
      {kC, completion(R"("top_p":[])"), 400, "top_p"},
      {kC, completion(R"("top_k":-2)"), 400, "top_k"},
      {kC, completion(R"("top_k":0.5)"), 400, "top_k"},
      {kC, completion(R"("min_p":1.5)"), 400, "min_p"},
      {kC, completion(R"("min_p":-1)"), 400, "min_p"},
      {kC, completion(R"("repetition_penalty":0)"), 400, "repetition_penalty"},
      {kC, completion(R"("n":2)"), 400, "n"},
      {kC, completion(R"("n":0)"), 400, "n"},
      {kC, completion(R"("n":"1")"), 400, "n"},
      {kC, completion(R"("stop":5)"), 400, "stop"},
      {kC, completion(R"("stop":["a","b","c","d","e"])"), 400, "stop"},
      {kC, completion(R"("stop":["a",1])"), 400, "stop[1]"},
      {kC, completion(R"("stop":["a",""])"), 400, "stop[1]"},
      {kC, completion(R"("stream":"yes")"), 400, "stream"},
      {kC, completion(R"("stream":1)"), 400, "stream"},
      {kC, completion(R"("stream_options":true)"), 400, "stream_options"},
      {kC, completion(R"("stream":true,"stream_options":{"include_usage":1})"), 400,
       "stream_options.include_usage"},
      {kC, completion(R"("stream":true,"stream_options":{"x":1})"), 400, "stream_options.x"},
      {kC, completion(R"("stream_options":{"include_usage":true})"), 400, "stream_options"},
      {kC, completion(R"("seed":"1")"), 400, "seed"},
      {kC, completion(R"("seed":1.5)"), 400, "seed"},
      {kC, completion(R"("presence_penalty":0.5)"), 400, "presence_penalty"},
      {kC, completion(R"("frequency_penalty":-1)"), 400, "frequency_penalty"},
      {kC, completion(R"("frequency_penalty":3)"), 400, "frequency_penalty"},
      {kC, completion(R"("user":5)"), 400, "user"},
      {kC, completion(R"("logprobs":5)"), 400, "logprobs"},
      {kC, completion(R"("logprobs":true)"), 400, "logprobs"},
      {kC, completion(R"("echo":true)"), 400, "echo"},
      {kC, completion(R"("best_of":3)"), 400, "best_of"},
      {kC, completion(R"("suffix":"x")"), 400, "suffix"},
      {kC, completion(R"("logit_bias":{"1":5})"), 400, "logit_bias"},
      {kC, completion(R"("ignore_eos":"no")"), 400, "ignore_eos"},
      {kC, completion(R"("bogus":1)"), 400, "bogus"},
      {kC, completion(R"("messages":[])"), 400, "messages"},  // a chat field on completions
      // Chat messages.
      {kChat, R"({"model":"m","messages":"hi"})", 400, "messages"},
      {kChat, R"({"model":"m","messages":[]})", 400, "messages"},
      {kChat, R"({"model":"m","messages":[5]})", 400, "messages[0]"},
      {kChat, R"({"model":"m","messages":[{"content":"hi"}]})", 400, "messages[0].role"},
      {kChat, R"({"model":"m","messages":[{"role":"user"}]})", 400, "messages[0].content"},
      {kChat, R"({"model":"m","messages":[{"role":"tool","content":"x"}]})", 400,
       "messages[0].role"},
      {kChat, R"({"model":"m","messages":[{"role":7,"content":"x"}]})", 400, "messages[0].role"},
      {kChat, R"({"model":"m","messages":[{"role":"user","content":null}]})", 400,
       "messages[0].content"},
      {kChat, R"({"model":"m","messages":[{"role":"user","content":5}]})", 400,
       "messages[0].content"},
      {kChat,
       R"({"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":[{"type":"image_url"}]}]})",
       400, "messages[1].content[0].type"},
      {kChat, R"({"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]})", 400,
       "messages[0].content[0].text"},
      {kChat, R"({"model":"m","messages":[{"role":"user","content":"x","extra":1}]})", 400,
       "messages[0].extra"},
      {kChat, R"({"model":"m","messages":[{"role":"assistant","content":"x","tool_calls":[]}]})",
       400, "messages[0].tool_calls"},
      {kChat, chat(R"("max_completion_tokens":0)"), 400, "max_completion_tokens"},
      {kChat, chat(R"("max_tokens":5,"max_completion_tokens":6)"), 400, "max_tokens"},
      {kChat, chat(R"("tools":[])"), 400, "tools"},
      {kChat, chat(R"("response_format":{"type":"json_object"})"), 400, "response_format"},
      {kChat, chat(R"("logprobs":true)"), 400, "logprobs"},
      {kChat, chat(R"("top_logprobs":2)"), 400, "top_logprobs"},
      {kChat, chat(R"("prompt":"x")"), 400, "prompt"},  // a completions field on chat
      {kChat, chat(R"("echo":false)"), 400, "echo"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.body);
    auto r = parse_request(c.route, c.body);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().http_status, c.status);
    EXPECT_EQ(r.error().param, c.param);
    EXPECT_FALSE(r.error().message.empty());
    // The error body is OpenAI-shaped JSON.
    json e = json::parse(error_body(r.error()));
    ASSERT_TRUE(e.contains("error"));
    EXPECT_EQ(e["error"]["message"], r.error().message);
    EXPECT_EQ(e["error"]["type"], "invalid_request_error");
    if (c.param.empty()) {
      EXPECT_TRUE(e["error"]["param"].is_null());
    } else {
      EXPECT_EQ(e["error"]["param"], c.param);
    }
    EXPECT_TRUE(e["error"].contains("code"));
  }
}

TEST(OpenAiParse, GoodCompletionFields) {
  auto r = parse_request(
      kC, R"({"model":"m","prompt":["hello"],"max_tokens":7,"temperature":0.7,"top_p":0.9,
              "top_k":40,"min_p":0.05,"repetition_penalty":1.1,"n":1,"stop":"\n","stream":true,
              "stream_options":{"include_usage":true},"seed":-3,"presence_penalty":0,
              "frequency_penalty":0.0,"user":"u1","logprobs":null,"echo":false,"best_of":1,
              "ignore_eos":true,"logit_bias":{},"suffix":null})");
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->model, "m");
  EXPECT_EQ(r->prompt_text, "hello");
  EXPECT_EQ(r->max_tokens, 7);
  EXPECT_FLOAT_EQ(r->sampling.temperature, 0.7f);
  EXPECT_FLOAT_EQ(r->sampling.top_p, 0.9f);
  EXPECT_EQ(r->sampling.top_k, 40);
  EXPECT_FLOAT_EQ(r->sampling.min_p, 0.05f);
  EXPECT_FLOAT_EQ(r->sampling.repetition_penalty, 1.1f);
  EXPECT_EQ(r->stop, std::vector<std::string>{"\n"});
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_EQ(r->sampling.seed, static_cast<uint64_t>(int64_t{-3}));
  EXPECT_EQ(r->user, "u1");
  EXPECT_TRUE(r->ignore_eos);

  auto ids = parse_request(kC, R"({"model":"m","prompt":[[1,2,3]],"top_k":-1})");
  ASSERT_TRUE(ids.ok()) << ids.error().message;
  EXPECT_EQ(*ids->prompt_ids, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(ids->sampling.top_k, 0);
  EXPECT_FALSE(ids->max_tokens.has_value());
  auto flat = parse_request(kC, R"({"model":"m","prompt":[5,6],"max_tokens":3.0})");
  ASSERT_TRUE(flat.ok()) << flat.error().message;
  EXPECT_EQ(*flat->prompt_ids, (std::vector<int64_t>{5, 6}));
  EXPECT_EQ(flat->max_tokens, 3);
}

TEST(OpenAiParse, GoodChatFields) {
  auto r = parse_request(kChat, R"({"model":"m","messages":[
      {"role":"system","content":"be brief"},
      {"role":"developer","content":"really"},
      {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],"name":"x"},
      {"role":"assistant","content":"ok"}],
      "max_completion_tokens":9,"stop":["x","y"],"logprobs":false,"top_logprobs":0,
      "response_format":{"type":"text"}})");
  ASSERT_TRUE(r.ok()) << r.error().message;
  ASSERT_EQ(r->messages.size(), 4u);
  EXPECT_EQ(r->messages[1].role, "system");
  EXPECT_EQ(r->messages[2].content, "ab");
  EXPECT_EQ(r->max_tokens, 9);
  EXPECT_EQ(r->max_tokens_param, "max_completion_tokens");
  EXPECT_EQ(r->stop.size(), 2u);
}

TEST(OpenAiErrors, StatusMapping) {
  EXPECT_EQ(api_error_from_status(invalid_argument("x")).http_status, 400);
  EXPECT_EQ(api_error_from_status(resource_exhausted("x")).http_status, 429);
  EXPECT_EQ(api_error_from_status(resource_exhausted("x")).type, "rate_limit_error");
  EXPECT_EQ(api_error_from_status(unavailable("x")).http_status, 503);
  EXPECT_EQ(api_error_from_status(Status(StatusCode::kDeadlineExceeded, "x")).http_status, 503);
  EXPECT_EQ(api_error_from_status(internal_error("x")).http_status, 500);
  EXPECT_EQ(api_error_from_status(internal_error("x")).type, "server_error");
  EXPECT_EQ(invalid_api_key(true).http_status, 401);
  EXPECT_EQ(invalid_api_key(false).code, "invalid_api_key");
  EXPECT_EQ(body_too_large(10).http_status, 413);
  EXPECT_EQ(queue_full(3).http_status, 429);
  EXPECT_EQ(model_not_found("x").http_status, 404);
  EXPECT_EQ(model_not_found("x").code, "model_not_found");
}

TEST(OpenAiFormat, CompletionAndChatShapes) {
  ResponseContext ctx{kC, make_response_id(kC, 7), 1700000000, "m", false};
  EXPECT_EQ(ctx.id.rfind("cmpl-", 0), 0u);
  GenerationResult res{"length", {5, 3}};
  json c = json::parse(completion_body(ctx, "abc", res));
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_EQ(c["choices"][0]["text"], "abc");
  EXPECT_EQ(c["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(c["usage"]["total_tokens"], 8);

  ResponseContext chat_ctx{kChat, make_response_id(kChat, 8), 1700000000, "m", true};
  EXPECT_EQ(chat_ctx.id.rfind("chatcmpl-", 0), 0u);
  json m = json::parse(completion_body(chat_ctx, "hey", res));
  EXPECT_EQ(m["object"], "chat.completion");
  EXPECT_EQ(m["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(m["choices"][0]["message"]["content"], "hey");

  const std::string stream = stream_start_events(chat_ctx) + stream_text_event(chat_ctx, "a") +
                             stream_end_events(chat_ctx, res);
  std::vector<std::string> events;
  size_t pos = 0;
  while ((pos = stream.find("data: ", pos)) != std::string::npos) {
    const size_t end = stream.find("\n\n", pos);
    events.push_back(stream.substr(pos + 6, end - pos - 6));
    pos = end + 2;
  }
  ASSERT_EQ(events.size(), 5u);
  EXPECT_EQ(json::parse(events[0])["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(json::parse(events[1])["choices"][0]["delta"]["content"], "a");
  EXPECT_TRUE(json::parse(events[1])["usage"].is_null());
  EXPECT_EQ(json::parse(events[2])["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(json::parse(events[3])["choices"].empty());
  EXPECT_EQ(json::parse(events[3])["usage"]["completion_tokens"], 3);
  EXPECT_EQ(events[4], "[DONE]");
  // Completions streams have no role chunk.
  EXPECT_TRUE(stream_start_events(ctx).empty());
}

// With the real tokenizer: templates, token counts, context limits.
class OpenAiPrepare : public ::testing::Test {
 protected:
  ServedModel model(int64_t context) {
    const auto* L = engine::testing::test_model();
    ServedModel m;
    m.name = "m";
    m.context_tokens = context;
    m.tokenizer = std::shared_ptr<const engine::Tokenizer>(L->tokenizer.get(),
                                                           [](const engine::Tokenizer*) {});
    auto t = engine::ChatTemplate::parse(L->tokenizer->chat_template());
    if (t.ok()) m.chat_template = std::make_shared<const engine::ChatTemplate>(std::move(*t));
    return m;
  }
};

TEST_F(OpenAiPrepare, TokenCountsAndLimits) {
  KVGATE_REQUIRE_MODEL();
  const ServedModel m = model(64);
  auto p = parse_request(kC, R"({"model":"m","prompt":"The capital of France is"})");
  ASSERT_TRUE(p.ok());
  auto g = prepare_generation(*p, m, {.default_max_tokens = 1000});
  ASSERT_TRUE(g.ok()) << g.error().message;
  EXPECT_EQ(g->prompt_tokens, L->tokenizer->encode("The capital of France is", true, false));
  EXPECT_EQ(g->max_tokens, 64 - static_cast<int32_t>(g->prompt_tokens.size()));  // capped

  // A prompt of the whole context: 400 naming prompt with both counts.
  std::string long_text;
  for (int i = 0; i < 80; ++i) long_text += " word";
  auto lp = parse_request(kC, json{{"model", "m"}, {"prompt", long_text}}.dump());
  ASSERT_TRUE(lp.ok());
  auto lg = prepare_generation(*lp, m, {});
  ASSERT_FALSE(lg.ok());
  EXPECT_EQ(lg.error().http_status, 400);
  EXPECT_EQ(lg.error().param, "prompt");
  EXPECT_EQ(lg.error().code, "context_length_exceeded");
  EXPECT_NE(lg.error().message.find("64"), std::string::npos);
  EXPECT_NE(lg.error().message.find("80"), std::string::npos);

  // max_tokens past the room left.
  auto mp = parse_request(kC, R"({"model":"m","prompt":"hi","max_tokens":64})");
  auto mg = prepare_generation(*mp, m, {});
  ASSERT_FALSE(mg.ok());
  EXPECT_EQ(mg.error().param, "max_tokens");

  // Token ids outside the vocabulary; an empty text prompt.
  auto ip = parse_request(kC, R"({"model":"m","prompt":[1,2,999999]})");
  auto ig = prepare_generation(*ip, m, {});
  ASSERT_FALSE(ig.ok());
  EXPECT_EQ(ig.error().param, "prompt");
  auto ep = parse_request(kC, R"({"model":"m","prompt":""})");
  auto eg = prepare_generation(*ep, m, {});
  ASSERT_FALSE(eg.ok());
  EXPECT_EQ(eg.error().param, "prompt");

  // Chat: the template is applied and control tokens parsed.
  auto cp = parse_request(kChat, R"({"model":"m","messages":[{"role":"user","content":"hi"}]})");
  auto cg = prepare_generation(*cp, model(8192), {.default_max_tokens = 16});
  ASSERT_TRUE(cg.ok()) << cg.error().message;
  const std::vector<engine::ChatMessage> msgs = {{"user", "hi"}};
  auto text = engine::apply_chat_template(*L->tokenizer, msgs, true);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(cg->prompt_tokens, L->tokenizer->encode(*text, true, true));
  EXPECT_EQ(cg->max_tokens, 16);
}

TEST(OpenAiModels, NotFound) {
  std::vector<ServedModel> models(1);
  models[0].name = "a";
  EXPECT_TRUE(find_served_model(models, "a").ok());
  auto r = find_served_model(models, "b");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().http_status, 404);
}

// Damaged bodies: byte edits and value swaps. Every one parses to a request
// or a 4xx with a JSON error body; none crashes or throws.
TEST(OpenAiParse, MutatedBodiesNeverCrash) {
  const std::vector<std::pair<ApiRoute, std::string>> seeds = {
      {kC,
       R"({"model":"m","prompt":"hello world","max_tokens":16,"temperature":0.5,"top_p":0.9,"stop":["\n","."],"stream":true,"stream_options":{"include_usage":true},"seed":42})"},
      {kC, R"({"model":"m","prompt":[[1,2,3,4]],"n":1,"logprobs":null,"top_k":5})"},
      {kChat,
       R"({"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"t"}]}],"max_completion_tokens":8,"min_p":0.1})"},
  };
  const std::vector<json> values = {nullptr,
                                    true,
                                    false,
                                    0,
                                    -1,
                                    1,
                                    1.5,
                                    1e300,
                                    -1e300,
                                    "",
                                    "x",
                                    json::array(),
                                    json::object(),
                                    json::array({1, "a"}),
                                    INT64_MAX,
                                    UINT64_MAX};
  std::mt19937_64 rng(12345);
  const ServedModel* served = nullptr;
  ServedModel model;
  if (const auto* L = engine::testing::test_model(); L->tokenizer) {
    model.name = "m";
    model.context_tokens = 128;
    model.tokenizer = std::shared_ptr<const engine::Tokenizer>(L->tokenizer.get(),
                                                               [](const engine::Tokenizer*) {});
    auto t = engine::ChatTemplate::parse(L->tokenizer->chat_template());
    if (t.ok()) model.chat_template = std::make_shared<const engine::ChatTemplate>(std::move(*t));
    served = &model;
  }
  int ok = 0, refused = 0;
  for (int iter = 0; iter < 6000; ++iter) {
    const auto& [route, seed] = seeds[iter % seeds.size()];
    std::string body = seed;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = body.empty() ? 0 : rng() % body.size();
      switch (rng() % 6) {
        case 0:
          if (!body.empty()) body[pos] = static_cast<char>(rng() % 256);
          break;
        case 1:
          body.insert(pos, 1, "{}[]\":,0-e.\\ntu"[rng() % 16]);
          break;
        case 2:
          if (!body.empty()) body.erase(pos, 1 + rng() % 8);
          break;
        case 3:
          body.insert(pos, body.substr(rng() % (body.size() + 1), rng() % 16));
          break;
        case 4:
          body.resize(rng() % (body.size() + 1));
          break;
        case 5: {
          // A structural edit: replace one field's value by another type.
          json j = json::parse(seed);
          auto it = j.begin();
          std::advance(it, static_cast<long>(rng() % j.size()));
          *it = values[rng() % values.size()];
          body = j.dump();
          break;
        }
      }
    }
    auto r = parse_request(route, body);
    if (r.ok()) {
      ++ok;
      if (served) {
        auto g = prepare_generation(*r, *served, {});
        if (!g.ok()) {
          EXPECT_GE(g.error().http_status, 400);
          EXPECT_LT(g.error().http_status, 500);
        } else {
          EXPECT_FALSE(g->prompt_tokens.empty());
          EXPECT_GE(g->max_tokens, 1);
          EXPECT_LE(static_cast<int64_t>(g->prompt_tokens.size()) + g->max_tokens, 128);
          EXPECT_TRUE(g->sampling.validate().ok());
        }
      }
    } else {
      ++refused;
      ASSERT_GE(r.error().http_status, 400) << body;
      ASSERT_LT(r.error().http_status, 500) << body;
      const json e = json::parse(error_body(r.error()), nullptr, false);
      ASSERT_FALSE(e.is_discarded()) << body;
    }
  }
  EXPECT_GT(ok, 100);
  EXPECT_GT(refused, 1000);
}

}  // namespace
}  // namespace kvgate::coordinator
