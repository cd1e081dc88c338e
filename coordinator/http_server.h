// The coordinator's HTTP/1.1 front end (OpenAI-compatible), on Boost.Beast.
//
// Routes:
//   POST /v1/completions, POST /v1/chat/completions   (API key; stream or not)
//   GET  /v1/models                                    (API key)
//   GET  /health    200 {"status":"ok"} when the backend is ready, else 503
//                   with the reason (no key: load balancers and probes)
//   GET  /metrics   Prometheus text format of the registry (no key: scrapers
//                   on the operator's network; bind the listen address to it)
//   anything else   404, or 405 for a known path with another method
//
// Threads: `http_threads` I/O threads run one io_context; each connection
// lives on its own strand. Nothing here blocks on compute: a completion is
// parsed, tokenized (the coordinator counts tokens; short), admitted and
// handed to the Backend; its output arrives on the backend's thread through a
// sink that only posts to the connection's strand.
//
// Admission: at most coordinator.max_queued_requests requests may be
// admitted and not yet started by the backend (GenerationSink::on_started);
// more get 429. The backend's own refusals map as backend.h says.
//
// Connections: keep-alive (also after a stream); a request must arrive
// within read_timeout, each write must finish within write_timeout; bodies
// over coordinator.max_body_bytes get 413 and the connection closes. A
// client that disconnects while its completion runs has it cancelled
// (Backend::cancel): the server keeps a read pending on the socket while a
// request runs, so a close is seen at once even before the first token.
//
// Blocking: start() binds and returns; stop() blocks until the I/O threads
// have joined. The backend must stay alive until stop() has returned.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/status.h"
#include "coordinator/api_keys.h"
#include "coordinator/backend.h"
#include "coordinator/openai_api.h"

namespace prometheus {
class Registry;
}

namespace kvgate::coordinator {

class CoordinatorMetrics;

struct HttpServerOptions {
  // listen (port 0 = any free port, see port()), http_threads, auth,
  // api_keys_file, max_body_bytes, max_queued_requests, default_max_tokens.
  CoordinatorConfig config;
  std::vector<ServedModel> models;  // at least one
  // Keys to use instead of reading config.api_keys_file (tests).
  std::optional<ApiKeys> api_keys;
  std::chrono::milliseconds read_timeout{30000};   // idle keep-alive and reading one request
  std::chrono::milliseconds write_timeout{30000};  // one write to the client
};

class HttpServer {
 public:
  // Loads the API keys (when config.auth is required: a missing, unreadable
  // or empty file is an error naming it), binds the listen address
  // (UNAVAILABLE naming it when taken) and starts the I/O threads. The
  // metrics go to `registry` (null: a registry of its own), served at /metrics.
  static Result<std::unique_ptr<HttpServer>> start(
      HttpServerOptions options, Backend& backend,
      std::shared_ptr<prometheus::Registry> registry = nullptr);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  uint16_t port() const;    // the bound port
  std::string url() const;  // "http://host:port"
  // Stops accepting, drops open connections and joins the I/O threads.
  // Idempotent. Requests still running in the backend keep their sinks,
  // which then post into the stopped server and are dropped.
  void stop();

  CoordinatorMetrics& metrics();

 private:
  struct Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvgate::coordinator
