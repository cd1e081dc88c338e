// End to end over real HTTP on 127.0.0.1: the front end with the local
// backend running the real model (skipped without it). The backend is
// wrapped to observe cancel() calls.
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>

#include "coordinator/http_server.h"
#include "coordinator/local_backend.h"
#include "engine/chat_template.h"
#include "engine/generate.h"
#include "tests/unit/coordinator/http_test_client.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::coordinator {
namespace {

using nlohmann::json;
using testing::http_call;
using testing::HttpTestClient;
using testing::sse_payloads;
using Headers = std::vector<std::pair<std::string, std::string>>;

const Headers kAuth = {{"Authorization", "Bearer sk-local"}};

// Forwards to the local backend and records cancel() calls.
class RecordingBackend final : public Backend {
 public:
  explicit RecordingBackend(Backend& inner) : inner_(inner) {}
  Status submit(GenerationRequest r, std::shared_ptr<GenerationSink> s) override {
    return inner_.submit(std::move(r), std::move(s));
  }
  void cancel(RequestId id) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_.push_back(id);
      cv_.notify_all();
    }
    inner_.cancel(id);
  }
  BackendHealth health() const override { return inner_.health(); }
  std::vector<BackendModel> models() const override { return inner_.models(); }
  bool wait_cancelled(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(30), [&] { return cancelled_.size() >= n; });
  }

 private:
  Backend& inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<RequestId> cancelled_;
};

class LocalServingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* L = engine::testing::test_model();
    if (!L->model) GTEST_SKIP() << "model not found at " KVGATE_TEST_MODEL;
    LocalBackendOptions o;
    o.model_name = "smollm";
    o.forward.n_threads = 2;
    o.kv_policy.policy = engine::KvPolicy::kDense;
    auto b = LocalBackend::start(
        std::shared_ptr<const engine::LlamaModel>(L->model.get(), [](const engine::LlamaModel*) {}),
        *L->tokenizer, o);
    ASSERT_TRUE(b.ok()) << b.status().to_string();
    local_ = std::move(*b);
    recording_ = std::make_unique<RecordingBackend>(*local_);
    HttpServerOptions so;
    so.config.listen = {"127.0.0.1", 0};
    so.config.auth = AuthMode::kRequired;
    so.config.max_body_bytes = 64 * 1024;
    so.config.default_max_tokens = 16;
    auto keys = ApiKeys::parse("sk-local\n", "test");
    ASSERT_TRUE(keys.ok());
    so.api_keys = std::move(*keys);
    so.models.push_back(local_->served_model());
    auto s = HttpServer::start(std::move(so), *recording_);
    ASSERT_TRUE(s.ok()) << s.status().to_string();
    server_ = std::move(*s);
  }
  void TearDown() override {
    if (server_) server_->stop();
    if (local_) local_->shutdown();
  }
  uint16_t port() const { return server_->port(); }

  std::unique_ptr<LocalBackend> local_;
  std::unique_ptr<RecordingBackend> recording_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(LocalServingTest, HealthAndModels) {
  auto h = http_call(port(), "GET", "/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  auto m = http_call(port(), "GET", "/v1/models", {}, kAuth);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200);
  json j = json::parse(m->body);
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "smollm");
}

TEST_F(LocalServingTest, CompletionMatchesTheEngine) {
  const std::string prompt = "The capital of France is";
  auto r =
      http_call(port(), "POST", "/v1/completions",
                json{{"model", "smollm"}, {"prompt", prompt}, {"max_tokens", 8}}.dump(), kAuth);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  // The same greedy generation run directly on the engine.
  const auto* L = engine::testing::test_model();
  const auto ids = L->tokenizer->encode(prompt, true, false);
  engine::CpuForward forward(*L->model, engine::ForwardOptions{.n_threads = 2});
  engine::GenerateOptions opt;
  opt.max_tokens = 8;
  auto ref = engine::generate(forward, *L->tokenizer, ids, opt);
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(j["choices"][0]["text"], ref->text);
  EXPECT_EQ(j["choices"][0]["finish_reason"], ref->finish_reason);
  EXPECT_EQ(j["usage"]["prompt_tokens"], ids.size());
  EXPECT_EQ(j["usage"]["completion_tokens"], ref->tokens.size());
  EXPECT_EQ(j["usage"]["total_tokens"], ids.size() + ref->tokens.size());
  EXPECT_EQ(j["id"].get<std::string>().rfind("cmpl-", 0), 0u);
}

TEST_F(LocalServingTest, StreamingChatEndsWithUsageAndDone) {
  auto r = http_call(port(), "POST", "/v1/chat/completions",
                     json{{"model", "smollm"},
                          {"messages", {{{"role", "user"}, {"content", "Say hello."}}}},
                          {"max_tokens", 6},
                          {"stream", true},
                          {"stream_options", {{"include_usage", true}}}}
                         .dump(),
                     kAuth);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(r->header("content-type"), "text/event-stream");
  auto events = sse_payloads(r->body);
  ASSERT_GE(events.size(), 4u) << r->body;
  EXPECT_EQ(events.back(), "[DONE]");
  EXPECT_EQ(json::parse(events[0])["choices"][0]["delta"]["role"], "assistant");
  json usage = json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  std::string text;
  for (size_t i = 1; i + 3 < events.size(); ++i) {
    text += json::parse(events[i])["choices"][0]["delta"]["content"].get<std::string>();
  }
  EXPECT_FALSE(text.empty());
  json finish = json::parse(events[events.size() - 3]);
  EXPECT_FALSE(finish["choices"][0]["finish_reason"].is_null());
  // Prompt tokens: the chat template applied to the message, as the engine counts them.
  const auto* L = engine::testing::test_model();
  const std::vector<engine::ChatMessage> msgs = {{"user", "Say hello."}};
  auto rendered = engine::apply_chat_template(*L->tokenizer, msgs, true);
  ASSERT_TRUE(rendered.ok());
  EXPECT_EQ(usage["usage"]["prompt_tokens"], L->tokenizer->encode(*rendered, true, true).size());
  EXPECT_LE(usage["usage"]["completion_tokens"].get<int>(), 6);
  EXPECT_GE(usage["usage"]["completion_tokens"].get<int>(), 1);
}

TEST_F(LocalServingTest, ErrorsAreOpenAiShaped) {
  auto bad = http_call(port(), "POST", "/v1/completions",
                       R"({"model":"smollm","prompt":"x","top_p":0})", kAuth);
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 400);
  EXPECT_EQ(json::parse(bad->body)["error"]["param"], "top_p");
  auto nokey = http_call(port(), "POST", "/v1/completions", R"({"model":"smollm","prompt":"x"})");
  ASSERT_TRUE(nokey);
  EXPECT_EQ(nokey->status, 401);
  auto wrong = http_call(port(), "POST", "/v1/completions", R"({"model":"smollm","prompt":"x"})",
                         {{"Authorization", "Bearer sk-other"}});
  ASSERT_TRUE(wrong);
  EXPECT_EQ(wrong->status, 401);
  auto big =
      http_call(port(), "POST", "/v1/completions",
                json{{"model", "smollm"}, {"prompt", std::string(70000, 'a')}}.dump(), kAuth);
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
  auto unknown =
      http_call(port(), "POST", "/v1/completions", R"({"model":"gpt-4","prompt":"x"})", kAuth);
  ASSERT_TRUE(unknown);
  EXPECT_EQ(unknown->status, 404);
  EXPECT_EQ(json::parse(unknown->body)["error"]["code"], "model_not_found");
}

TEST_F(LocalServingTest, DisconnectMidStreamCancelsTheEngineRequest) {
  auto c = std::make_unique<HttpTestClient>(port());
  ASSERT_TRUE(c->send_all(HttpTestClient::request("POST", "/v1/completions",
                                                  json{{"model", "smollm"},
                                                       {"prompt", "Once upon a time"},
                                                       {"max_tokens", 4000},
                                                       {"ignore_eos", true},
                                                       {"stream", true}}
                                                      .dump(),
                                                  kAuth)));
  // Wait for the first text chunk, then go away.
  const std::string got = c->read_until("\"text\"");
  ASSERT_NE(got.find("\"text\""), std::string::npos) << got;
  c.reset();
  ASSERT_TRUE(recording_->wait_cancelled(1));
  // The engine is free again: a short request completes.
  auto r = http_call(port(), "POST", "/v1/completions",
                     R"({"model":"smollm","prompt":"Hi","max_tokens":2})", kAuth);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  auto m = http_call(port(), "GET", "/metrics");
  ASSERT_TRUE(m);
  EXPECT_NE(m->body.find("kvgate_coordinator_ttft_seconds_count 2"), std::string::npos) << m->body;
}

}  // namespace
}  // namespace kvgate::coordinator
