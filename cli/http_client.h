// A small blocking HTTP/1.1 client for the CLI (`kvgate up` health checks
// and its demo request, `kvgate bench load`): one request per connection
// (Connection: close), a deadline on the whole exchange, chunked bodies
// decoded, and an optional callback that sees the body as it arrives (for
// SSE streams, timed by the load generator).
//
// Blocks the calling thread; no shared state (one call per thread at a time
// is fine from many threads).
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

#include "common/config.h"
#include "common/status.h"

namespace kvgate::cli {

struct HttpReply {
  int status = 0;
  std::string body;  // de-chunked
};

// Called with each piece of the de-chunked body as it is received.
using BodyChunkFn = std::function<void(std::string_view)>;

// Sends `request` (a whole HTTP/1.1 request with Connection: close) to `at`
// and reads the reply. Errors: UNAVAILABLE (resolve, connect, reset),
// DEADLINE_EXCEEDED (not done within `timeout`), DATA_LOSS (not HTTP, bad
// chunk framing).
Result<HttpReply> http_exchange(const HostPort& at, const std::string& request,
                                std::chrono::milliseconds timeout,
                                const BodyChunkFn& on_body = {});

// "GET|POST path" with Host, Connection: close, optional bearer key and a
// JSON body.
std::string http_request(const std::string& method, const HostPort& at, const std::string& path,
                         const std::string& api_key = {}, const std::string& json_body = {});

// 0.0.0.0 / :: / "" -> the loopback address of the same family.
std::string reachable_host(const std::string& listen_host);

}  // namespace kvgate::cli
