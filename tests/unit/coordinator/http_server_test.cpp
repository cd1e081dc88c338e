// The HTTP front end over real sockets on 127.0.0.1 (port 0), with a test
// double behind it so admission, cancellation and error paths are
// deterministic. No sleeps: every wait has a deadline.
#include "coordinator/http_server.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "coordinator/metrics.h"
#include "engine/chat_template.h"
#include "engine/unicode.h"
#include "tests/unit/coordinator/fake_backend.h"
#include "tests/unit/coordinator/http_test_client.h"

namespace kvgate::coordinator {
namespace {

using nlohmann::json;
using testing::FakeBackend;
using testing::http_call;
using testing::HttpTestClient;
using testing::sse_payloads;
using Headers = std::vector<std::pair<std::string, std::string>>;

const Headers kAuth = {{"Authorization", "Bearer sk-test"}};

// One token per byte: token counts are string lengths.
std::shared_ptr<const engine::Tokenizer> byte_tokenizer() {
  engine::TokenizerSpec spec;
  spec.model = "gpt2";
  spec.pre = "gpt-2";
  for (int b = 0; b < 256; ++b) {
    std::string t;
    engine::unicode::append_utf8(engine::unicode::byte_to_gpt2_codepoint(static_cast<uint8_t>(b)),
                                 t);
    spec.tokens.push_back(t);
  }
  auto tok = engine::Tokenizer::create(std::move(spec));
  EXPECT_TRUE(tok.ok()) << tok.status().to_string();
  return std::make_shared<const engine::Tokenizer>(std::move(*tok));
}

class HttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override { start(2); }
  void TearDown() override {
    if (server_) server_->stop();
  }

  void start(int64_t max_queued) {
    if (server_) server_->stop();
    server_.reset();
    HttpServerOptions o;
    o.config.listen = {"127.0.0.1", 0};
    o.config.http_threads = 2;
    o.config.auth = AuthMode::kRequired;
    o.config.max_body_bytes = 4096;
    o.config.max_queued_requests = max_queued;
    o.config.default_max_tokens = 5;
    auto keys = ApiKeys::parse("sk-test\n", "test");
    ASSERT_TRUE(keys.ok());
    o.api_keys = std::move(*keys);
    ServedModel m;
    m.name = "fake";
    m.context_tokens = 64;
    m.tokenizer = byte_tokenizer();
    auto t = engine::ChatTemplate::parse("<|im_start|>{{ message }}<|im_end|>");
    ASSERT_TRUE(t.ok());
    m.chat_template = std::make_shared<const engine::ChatTemplate>(std::move(*t));
    o.models.push_back(m);
    auto s = HttpServer::start(std::move(o), backend_);
    ASSERT_TRUE(s.ok()) << s.status().to_string();
    server_ = std::move(*s);
    ASSERT_NE(server_->port(), 0);
  }

  std::optional<testing::HttpResponse> post(const std::string& path, const std::string& body,
                                            const Headers& headers = kAuth) {
    return http_call(server_->port(), "POST", path, body, headers);
  }

  FakeBackend backend_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(HttpServerTest, HealthFollowsTheBackendAndNeedsNoKey) {
  auto r = http_call(server_->port(), "GET", "/health");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(json::parse(r->body)["status"], "ok");
  backend_.set_health({false, "no decode node registered"});
  r = http_call(server_->port(), "GET", "/health");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503);
  EXPECT_EQ(json::parse(r->body)["error"]["message"], "no decode node registered");
}

TEST_F(HttpServerTest, ModelsNeedAKey) {
  auto r = http_call(server_->port(), "GET", "/v1/models", {}, kAuth);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  json j = json::parse(r->body);
  EXPECT_EQ(j["object"], "list");
  EXPECT_EQ(j["data"][0]["id"], "fake");
  r = http_call(server_->port(), "GET", "/v1/models");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
}

TEST_F(HttpServerTest, MissingOrWrongKeyIs401) {
  const std::string body = R"({"model":"fake","prompt":"hi"})";
  for (const Headers& h : {Headers{}, Headers{{"Authorization", "Bearer nope"}},
                           Headers{{"Authorization", "sk-test"}}}) {
    auto r = post("/v1/completions", body, h);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 401);
    json e = json::parse(r->body)["error"];
    EXPECT_EQ(e["type"], "invalid_request_error");
    EXPECT_EQ(e["code"], "invalid_api_key");
  }
  auto m = http_call(server_->port(), "GET", "/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200);
  EXPECT_NE(m->body.find("kvgate_coordinator_unauthenticated_requests_total 3"), std::string::npos);
  EXPECT_FALSE(backend_.wait_submitted(1, std::chrono::milliseconds(0)));
}

TEST_F(HttpServerTest, UnknownRouteAndWrongMethod) {
  auto r = http_call(server_->port(), "GET", "/v2/nothing", {}, kAuth);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
  EXPECT_TRUE(json::parse(r->body).contains("error"));
  r = http_call(server_->port(), "GET", "/v1/completions", {}, kAuth);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 405);
  EXPECT_EQ(r->header("allow"), "POST");
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "method_not_allowed");
}

TEST_F(HttpServerTest, BodyOverTheLimitIs413) {
  const std::string body = R"({"model":"fake","prompt":")" + std::string(5000, 'a') + "\"}";
  auto r = post("/v1/completions", body);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 413);
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "request_too_large");
}

TEST_F(HttpServerTest, BadBodiesAre400WithTheParam) {
  struct Case {
    std::string path, body, param;
    int status;
  };
  const std::vector<Case> cases = {
      {"/v1/completions", "{not json", "", 400},
      {"/v1/completions", R"({"model":"fake","prompt":"hi","temperature":5})", "temperature", 400},
      {"/v1/completions", R"({"model":"fake","prompt":"hi","n":3})", "n", 400},
      {"/v1/completions", R"({"model":"other","prompt":"hi"})", "model", 404},
      {"/v1/completions", R"({"model":"fake","prompt":")" + std::string(70, 'x') + "\"}", "prompt",
       400},
      {"/v1/completions", R"({"model":"fake","prompt":"hi","max_tokens":63})", "max_tokens", 400},
      {"/v1/chat/completions", R"({"model":"fake","messages":[{"role":"bot","content":"x"}]})",
       "messages[0].role", 400},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body);
    auto r = post(c.path, c.body);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, c.status);
    json e = json::parse(r->body)["error"];
    if (c.param.empty()) {
      EXPECT_TRUE(e["param"].is_null());
    } else {
      EXPECT_EQ(e["param"], c.param);
    }
  }
  EXPECT_FALSE(backend_.wait_submitted(1, std::chrono::milliseconds(0)));
}

TEST_F(HttpServerTest, NonStreamingCompletion) {
  HttpTestClient c(server_->port());
  ASSERT_TRUE(c.send_all(HttpTestClient::request(
      "POST", "/v1/completions", R"({"model":"fake","prompt":"hello","max_tokens":3,"seed":9})",
      kAuth)));
  ASSERT_TRUE(backend_.wait_submitted(1));
  const GenerationRequest req = backend_.submitted(0);
  EXPECT_EQ(req.prompt_tokens.size(), 5u);  // one token per byte
  EXPECT_EQ(req.max_tokens, 3);
  EXPECT_EQ(req.sampling.seed, 9u);
  auto sink = backend_.sink(req.id);
  ASSERT_TRUE(sink);
  sink->on_started();
  sink->on_tokens("ab", 1);
  sink->on_tokens("", 1);
  sink->on_tokens("c", 1);
  sink.reset();
  backend_.finish(req.id, {"length", {5, 3}});
  auto r = c.read_response();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  json j = json::parse(r->body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "fake");
  EXPECT_EQ(j["choices"][0]["text"], "abc");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  EXPECT_EQ(j["usage"]["total_tokens"], 8);

  // Keep-alive: the same connection serves the next request.
  ASSERT_TRUE(c.send_all(HttpTestClient::request("GET", "/v1/models", {}, kAuth)));
  auto m = c.read_response();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200);
}

TEST_F(HttpServerTest, StreamingChatWithUsage) {
  HttpTestClient c(server_->port());
  ASSERT_TRUE(c.send_all(HttpTestClient::request(
      "POST", "/v1/chat/completions",
      R"({"model":"fake","messages":[{"role":"user","content":"hi"}],"stream":true,
          "stream_options":{"include_usage":true}})",
      kAuth)));
  ASSERT_TRUE(backend_.wait_submitted(1));
  const GenerationRequest req = backend_.submitted(0);
  EXPECT_EQ(req.max_tokens, 5);  // default_max_tokens
  // The role chunk comes before any token.
  const std::string head = c.read_until("\"role\":\"assistant\"");
  EXPECT_NE(head.find("text/event-stream"), std::string::npos);
  auto sink = backend_.sink(req.id);
  ASSERT_TRUE(sink);
  sink->on_tokens("Hel", 1);
  sink->on_tokens("lo", 1);
  sink.reset();
  backend_.finish(req.id, {"stop", {static_cast<int64_t>(req.prompt_tokens.size()), 2}});
  auto r = c.read_response();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  auto events = sse_payloads(r->body);
  ASSERT_EQ(events.size(), 6u) << r->body;
  EXPECT_EQ(json::parse(events[0])["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(json::parse(events[1])["choices"][0]["delta"]["content"], "Hel");
  EXPECT_EQ(json::parse(events[2])["choices"][0]["delta"]["content"], "lo");
  EXPECT_EQ(json::parse(events[3])["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(json::parse(events[4])["usage"]["completion_tokens"], 2);
  EXPECT_EQ(events[5], "[DONE]");
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(json::parse(events[i])["object"], "chat.completion.chunk");
  }
  // Keep-alive after a stream.
  ASSERT_TRUE(c.send_all(HttpTestClient::request("GET", "/health", {})));
  auto h = c.read_response();
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
}

TEST_F(HttpServerTest, ErrorMidStreamEndsWithoutDone) {
  HttpTestClient c(server_->port());
  ASSERT_TRUE(c.send_all(HttpTestClient::request(
      "POST", "/v1/completions", R"({"model":"fake","prompt":"hi","stream":true})", kAuth)));
  ASSERT_TRUE(backend_.wait_submitted(1));
  const GenerationRequest req = backend_.submitted(0);
  backend_.fail(req.id, unavailable("decode node lost"));
  auto r = c.read_response();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  auto events = sse_payloads(r->body);
  ASSERT_EQ(events.size(), 1u);
  json e = json::parse(events[0]);
  EXPECT_EQ(e["error"]["message"], "decode node lost");
  EXPECT_EQ(e["error"]["code"], "service_unavailable");
  EXPECT_TRUE(c.wait_closed());
}

TEST_F(HttpServerTest, BackendRefusalsMapTo429And503) {
  backend_.set_submit_status(resource_exhausted("decode queue full"));
  auto r = post("/v1/completions", R"({"model":"fake","prompt":"hi"})");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 429);
  EXPECT_EQ(json::parse(r->body)["error"]["type"], "rate_limit_error");
  backend_.set_submit_status(unavailable("no decode node has room"));
  r = post("/v1/completions", R"({"model":"fake","prompt":"hi"})");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503);
  EXPECT_EQ(json::parse(r->body)["error"]["message"], "no decode node has room");
  // A failed submit gives its queue slot back.
  EXPECT_NE(server_->metrics().serialize().find("kvgate_coordinator_queue_length 0"),
            std::string::npos);
}

TEST_F(HttpServerTest, QueueFullIs429UntilARequestStarts) {
  HttpTestClient a(server_->port()), b(server_->port());
  const std::string body = R"({"model":"fake","prompt":"hi"})";
  ASSERT_TRUE(a.send_all(HttpTestClient::request("POST", "/v1/completions", body, kAuth)));
  ASSERT_TRUE(backend_.wait_submitted(1));
  ASSERT_TRUE(b.send_all(HttpTestClient::request("POST", "/v1/completions", body, kAuth)));
  ASSERT_TRUE(backend_.wait_submitted(2));
  EXPECT_NE(server_->metrics().serialize().find("kvgate_coordinator_queue_length 2"),
            std::string::npos);
  auto r = post("/v1/completions", body);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 429);
  json e = json::parse(r->body)["error"];
  EXPECT_EQ(e["type"], "rate_limit_error");
  EXPECT_EQ(e["code"], "rate_limit_exceeded");
  // Once the backend starts one, there is room again.
  backend_.sink(backend_.submitted(0).id)->on_started();
  HttpTestClient c(server_->port());
  ASSERT_TRUE(c.send_all(HttpTestClient::request("POST", "/v1/completions", body, kAuth)));
  ASSERT_TRUE(backend_.wait_submitted(3));
  for (size_t i = 0; i < 3; ++i) backend_.finish(backend_.submitted(i).id, {"stop", {2, 0}});
  for (HttpTestClient* cl : {&a, &b, &c}) {
    auto resp = cl->read_response();
    ASSERT_TRUE(resp);
    EXPECT_EQ(resp->status, 200);
  }
}

TEST_F(HttpServerTest, DisconnectMidStreamCancels) {
  auto c = std::make_unique<HttpTestClient>(server_->port());
  ASSERT_TRUE(c->send_all(HttpTestClient::request(
      "POST", "/v1/completions", R"({"model":"fake","prompt":"hi","stream":true})", kAuth)));
  ASSERT_TRUE(backend_.wait_submitted(1));
  const RequestId id = backend_.submitted(0).id;
  backend_.sink(id)->on_tokens("tok", 1);
  c->read_until("tok");
  c.reset();  // the client goes away mid-stream
  ASSERT_TRUE(backend_.wait_cancelled(1));
  EXPECT_EQ(backend_.cancelled()[0], id);
}

TEST_F(HttpServerTest, DisconnectBeforeTheFirstTokenCancels) {
  auto c = std::make_unique<HttpTestClient>(server_->port());
  ASSERT_TRUE(c->send_all(HttpTestClient::request("POST", "/v1/completions",
                                                  R"({"model":"fake","prompt":"hi"})", kAuth)));
  ASSERT_TRUE(backend_.wait_submitted(1));
  c.reset();
  ASSERT_TRUE(backend_.wait_cancelled(1));
  EXPECT_EQ(backend_.cancelled()[0], backend_.submitted(0).id);
}

TEST_F(HttpServerTest, MetricsExposeTheCoordinatorSeries) {
  auto r = post("/v1/completions", R"({"model":"fake","prompt":"hi","temperature":9})");
  ASSERT_TRUE(r);
  auto m = http_call(server_->port(), "GET", "/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200);
  for (const char* name :
       {"kvgate_coordinator_requests_total{code=\"400\",route=\"/v1/completions\"} 1",
        "kvgate_coordinator_request_duration_seconds", "kvgate_coordinator_ttft_seconds",
        "kvgate_coordinator_inter_token_seconds", "kvgate_coordinator_prompt_tokens_total",
        "kvgate_coordinator_completion_tokens_total", "kvgate_coordinator_queue_length",
        "kvgate_coordinator_unauthenticated_requests_total"}) {
    EXPECT_NE(m->body.find(name), std::string::npos) << name;
  }
}

TEST(HttpServerStart, MissingKeyFileIsAnErrorNamingIt) {
  FakeBackend backend;
  HttpServerOptions o;
  o.config.listen = {"127.0.0.1", 0};
  o.config.auth = AuthMode::kRequired;
  o.config.api_keys_file = "/nonexistent/keys.txt";
  o.models.resize(1);
  o.models[0].name = "fake";
  auto s = HttpServer::start(std::move(o), backend);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("/nonexistent/keys.txt"), std::string::npos);
  HttpServerOptions o2;
  o2.config.auth = AuthMode::kRequired;
  o2.models.resize(1);
  auto s2 = HttpServer::start(std::move(o2), backend);
  ASSERT_FALSE(s2.ok());
  EXPECT_NE(s2.status().message().find("api_keys_file"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::coordinator
