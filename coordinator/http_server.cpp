// The only translation unit with Beast in it (they are heavy: STACK.md).
#include "coordinator/http_server.h"

#include <prometheus/registry.h>

#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <deque>
#include <thread>

#include "coordinator/metrics.h"
#include "coordinator/openai_format.h"

namespace kvgate::coordinator {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kHeaderLimitBytes = 64 * 1024;
// After an error answered before the body was read, unread bytes are
// drained (up to this many, for up to 2 s) before closing, so the client sees
// the answer instead of a connection reset.
constexpr size_t kLingerDrainBytes = 64 << 20;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

// State shared by the server, its connections and the sinks handed to the
// backend. Sinks may outlive the server object (the backend holds them), so
// they keep this alive; connections only run inside `ioc` and use it by
// reference.
struct Shared {
  Shared(HttpServerOptions opts, Backend& b, std::shared_ptr<prometheus::Registry> registry)
      : options(std::move(opts)), backend(&b), metrics(std::move(registry)) {}

  net::io_context ioc;  // destroyed last: pending handlers hold connections
  HttpServerOptions options;
  Backend* backend;
  CoordinatorMetrics metrics;
  std::optional<ApiKeys> keys;  // set when auth is required
  std::atomic<int64_t> queued{0};
  std::atomic<uint64_t> next_request{1};
  std::optional<tcp::acceptor> acceptor;
};

namespace {

class Session;

// An admission slot: counted in Shared::queued from admission until the
// backend starts the request or ends it, whichever comes first.
class QueueSlot {
 public:
  explicit QueueSlot(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {}
  ~QueueSlot() { release(); }
  void release() {
    if (held_.exchange(false)) {
      const int64_t n = shared_->queued.fetch_sub(1) - 1;
      shared_->metrics.set_queue_length(n);
    }
  }

 private:
  std::shared_ptr<Shared> shared_;
  std::atomic<bool> held_{true};
};

// Generation output crossing from the backend's thread to the connection's
// strand. Timings and token counts are taken here (backend thread, cheap);
// everything else is posted.
class SessionSink final : public GenerationSink {
 public:
  SessionSink(std::weak_ptr<Session> session, net::any_io_executor strand,
              std::shared_ptr<Shared> shared, Clock::time_point admitted)
      : session_(std::move(session)),
        strand_(std::move(strand)),
        shared_(shared),
        slot_(std::move(shared)),
        admitted_(admitted),
        last_token_(admitted) {}

  void on_started() override { slot_.release(); }
  void on_tokens(std::string_view text, int32_t n_tokens) override;
  void on_done(const GenerationResult& result) override;
  void on_error(const Status& status) override;
  void release_slot() { slot_.release(); }

 private:
  std::weak_ptr<Session> session_;
  net::any_io_executor strand_;
  std::shared_ptr<Shared> shared_;
  QueueSlot slot_;
  Clock::time_point admitted_;
  Clock::time_point last_token_;
  bool first_token_seen_ = false;
};

// One connection. Owned by the handlers of its pending operations; every
// member is touched only on its strand (stream_'s executor).
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const std::shared_ptr<Shared>& shared)
      : stream_(std::move(socket)), shared_(*shared), shared_weak_(shared) {}

  void start() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->do_read(); });
  }

  // Sink events, on the strand.
  void on_gen_text(std::string text);
  void on_gen_done(GenerationResult result);
  void on_gen_error(Status status);

 private:
  struct Active {
    RequestId id;
    MetricRoute route = MetricRoute::kOther;
    ResponseContext ctx;
    bool stream = false;
    std::string text;  // non-streaming: the completion so far
    Clock::time_point admitted;
  };
  struct OutItem {
    enum Kind { kRaw, kChunk, kLast } kind;
    std::string data;
  };

  void do_read();
  void on_header(beast::error_code ec);
  void on_body(beast::error_code ec);
  void handle_request();
  void handle_generation(ApiRoute route, MetricRoute metric_route);
  void send_error(const ApiError& error, MetricRoute route, bool close);
  void send_reply(int status, std::string body, const char* content_type, MetricRoute route,
                  bool close, const char* allow = nullptr);
  void after_response();
  void start_watch();
  void on_watch(beast::error_code ec, size_t n);
  void client_gone();
  void stream_push(OutItem::Kind kind, std::string data);
  void pump();
  void end_generation();
  void linger_close();
  void close();

  beast::tcp_stream stream_;
  // By reference: a session only runs inside shared_.ioc, so Shared is alive
  // whenever it runs (an owning pointer here would be a cycle through the
  // io_context's pending handlers). Sinks get an owning pointer from the weak one.
  Shared& shared_;
  std::weak_ptr<Shared> shared_weak_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<http::response<http::string_body>> reply_;
  bool keep_alive_ = false;
  bool closed_ = false;
  // Generation in progress (or its stream still being written).
  std::optional<Active> active_;
  bool gen_finished_ = false;  // the backend's terminal event arrived
  std::deque<OutItem> out_;    // stream writes, front is in flight when writing_
  bool writing_ = false;
  bool stream_done_ = false;  // the last chunk is queued
  // Disconnect watch: a read on the raw socket while a request runs.
  bool watching_ = false;
  bool resume_after_watch_ = false;
  std::array<char, 1> probe_{};
};

void SessionSink::on_tokens(std::string_view text, int32_t n_tokens) {
  if (n_tokens > 0) {
    const auto now = Clock::now();
    if (!first_token_seen_) {
      shared_->metrics.observe_ttft(seconds_between(admitted_, now));
      first_token_seen_ = true;
    } else {
      shared_->metrics.observe_inter_token(seconds_between(last_token_, now) / n_tokens);
    }
    last_token_ = now;
    shared_->metrics.add_completion_tokens(n_tokens);
  }
  if (text.empty()) return;
  net::post(strand_, [w = session_, t = std::string(text)]() mutable {
    if (auto s = w.lock()) s->on_gen_text(std::move(t));
  });
}

void SessionSink::on_done(const GenerationResult& result) {
  slot_.release();
  net::post(strand_, [w = session_, r = result]() mutable {
    if (auto s = w.lock()) s->on_gen_done(std::move(r));
  });
}

void SessionSink::on_error(const Status& status) {
  slot_.release();
  net::post(strand_, [w = session_, st = status]() mutable {
    if (auto s = w.lock()) s->on_gen_error(std::move(st));
  });
}

void Session::do_read() {
  if (closed_) return;
  parser_.emplace();
  parser_->body_limit(static_cast<uint64_t>(shared_.options.config.max_body_bytes));
  parser_->header_limit(kHeaderLimitBytes);
  stream_.expires_after(shared_.options.read_timeout);
  http::async_read_header(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
}

struct RouteInfo {
  MetricRoute metric = MetricRoute::kOther;
  const char* method = nullptr;  // the one allowed; null = unknown path
  bool needs_key = false;
};

RouteInfo route_of(std::string_view path) {
  if (path == "/v1/completions") return {MetricRoute::kCompletions, "POST", true};
  if (path == "/v1/chat/completions") return {MetricRoute::kChatCompletions, "POST", true};
  if (path == "/v1/models") return {MetricRoute::kModels, "GET", true};
  if (path == "/health") return {MetricRoute::kHealth, "GET", false};
  if (path == "/metrics") return {MetricRoute::kMetrics, "GET", false};
  return {};
}

std::string_view sv(beast::string_view s) {
  return std::string_view(s.data(), s.size());
}

std::string_view path_of(beast::string_view target_view) {
  const std::string_view target = sv(target_view);
  const size_t q = target.find('?');
  return q == std::string_view::npos ? target : target.substr(0, q);
}

void Session::on_header(beast::error_code ec) {
  if (closed_) return;
  if (ec == http::error::body_limit) {
    return send_error(body_too_large(shared_.options.config.max_body_bytes), MetricRoute::kOther,
                      true);
  }
  if (ec) return close();  // end of stream, timeout, garbage: nothing to answer
  const auto& req = parser_->get();
  keep_alive_ = req.keep_alive();
  const std::string_view path = path_of(req.target());
  const RouteInfo route = route_of(path);
  const bool body_pending = !parser_->is_done();
  const std::string method(req.method_string());
  if (route.method == nullptr) {
    return send_error(route_not_found(method, std::string(path)), MetricRoute::kOther,
                      body_pending);
  }
  if (method != route.method) {
    ApiError e = method_not_allowed(method, std::string(path));
    return send_reply(e.http_status, error_body(e), "application/json", route.metric, body_pending,
                      route.method);
  }
  if (route.needs_key && shared_.keys) {
    const auto auth = req[http::field::authorization];
    const ApiKeys::Check check = shared_.keys->check(sv(auth));
    if (check != ApiKeys::Check::kOk) {
      shared_.metrics.count_unauthenticated();
      return send_error(invalid_api_key(check == ApiKeys::Check::kMissing), route.metric,
                        body_pending);
    }
  }
  http::async_read(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, size_t) { self->on_body(ec); });
}

void Session::on_body(beast::error_code ec) {
  if (closed_) return;
  if (ec == http::error::body_limit) {
    return send_error(body_too_large(shared_.options.config.max_body_bytes), MetricRoute::kOther,
                      true);
  }
  if (ec) return close();
  handle_request();
}

void Session::handle_request() {
  const auto& req = parser_->get();
  keep_alive_ = req.keep_alive();
  const RouteInfo route = route_of(path_of(req.target()));
  switch (route.metric) {
    case MetricRoute::kCompletions:
      return handle_generation(ApiRoute::kCompletions, route.metric);
    case MetricRoute::kChatCompletions:
      return handle_generation(ApiRoute::kChatCompletions, route.metric);
    case MetricRoute::kModels:
      return send_reply(200, models_body(shared_.options.models), "application/json", route.metric,
                        false);
    case MetricRoute::kHealth: {
      const BackendHealth h = shared_.backend->health();
      if (h.ready) {
        return send_reply(200, R"({"status":"ok"})", "application/json", route.metric, false);
      }
      ApiError e;
      e.http_status = 503;
      e.type = "server_error";
      e.code = "not_ready";
      e.message = h.reason.empty() ? "backend not ready" : h.reason;
      return send_reply(503, error_body(e), "application/json", route.metric, false);
    }
    case MetricRoute::kMetrics:
      return send_reply(200, shared_.metrics.serialize(),
                        "text/plain; version=0.0.4; charset=utf-8", route.metric, false);
    case MetricRoute::kOther:
      break;
  }
  send_error(route_not_found(std::string(req.method_string()), std::string(sv(req.target()))),
             MetricRoute::kOther, false);
}

void Session::handle_generation(ApiRoute route, MetricRoute metric_route) {
  const Clock::time_point admitted = Clock::now();
  auto parsed = parse_request(route, parser_->get().body());
  if (!parsed.ok()) return send_error(parsed.error(), metric_route, false);
  auto model = find_served_model(shared_.options.models, parsed->model);
  if (!model.ok()) return send_error(model.error(), metric_route, false);
  PrepareOptions prep;
  prep.default_max_tokens = shared_.options.config.default_max_tokens;
  auto request = prepare_generation(*parsed, **model, prep);
  if (!request.ok()) return send_error(request.error(), metric_route, false);
  std::shared_ptr<Shared> shared = shared_weak_.lock();
  if (!shared) return close();  // the server is going away

  // Admission: a slot in the bounded queue, held by the sink until the
  // backend starts or ends the request.
  const int64_t limit = shared_.options.config.max_queued_requests;
  const int64_t before = shared_.queued.fetch_add(1);
  if (before >= limit) {
    shared_.queued.fetch_sub(1);
    return send_error(queue_full(limit), metric_route, false);
  }
  shared_.metrics.set_queue_length(before + 1);
  const uint64_t seq = shared_.next_request.fetch_add(1);
  request->id = RequestId(seq);
  auto sink =
      std::make_shared<SessionSink>(weak_from_this(), stream_.get_executor(), shared, admitted);

  Active a;
  a.id = request->id;
  a.route = metric_route;
  a.ctx.route = route;
  a.ctx.id = make_response_id(route, seq);
  a.ctx.created_unix = unix_now();
  a.ctx.model = (*model)->name;
  a.ctx.include_usage = parsed->include_usage;
  a.stream = parsed->stream;
  a.admitted = admitted;
  const int64_t prompt_tokens = static_cast<int64_t>(request->prompt_tokens.size());

  Status submitted = shared_.backend->submit(std::move(*request), sink);
  if (!submitted.ok()) {
    sink->release_slot();
    return send_error(api_error_from_status(submitted), metric_route, false);
  }
  shared_.metrics.add_prompt_tokens(prompt_tokens);
  active_ = std::move(a);
  gen_finished_ = false;
  stream_done_ = false;
  if (active_->stream) {
    shared_.metrics.count_request(metric_route, 200);
    std::string head =
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/event-stream\r\n"
        "Cache-Control: no-cache\r\n"
        "Server: kvgate\r\n"
        "Transfer-Encoding: chunked\r\n";
    head += keep_alive_ ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n";
    stream_push(OutItem::kRaw, std::move(head));
    std::string start = stream_start_events(active_->ctx);
    if (!start.empty()) stream_push(OutItem::kChunk, std::move(start));
  }
  start_watch();
}

void Session::on_gen_text(std::string text) {
  if (closed_ || !active_ || gen_finished_) return;
  if (active_->stream) {
    stream_push(OutItem::kChunk, stream_text_event(active_->ctx, text));
  } else {
    active_->text += text;
  }
}

void Session::on_gen_done(GenerationResult result) {
  if (closed_ || !active_ || gen_finished_) return;
  gen_finished_ = true;
  shared_.metrics.observe_request_duration(active_->route,
                                           seconds_between(active_->admitted, Clock::now()));
  if (active_->stream) {
    stream_push(OutItem::kChunk, stream_end_events(active_->ctx, result));
    stream_push(OutItem::kLast, {});
    stream_done_ = true;
    return;
  }
  std::string body = completion_body(active_->ctx, active_->text, result);
  const MetricRoute route = active_->route;
  active_.reset();
  send_reply(200, std::move(body), "application/json", route, false);
}

void Session::on_gen_error(Status status) {
  if (closed_ || !active_ || gen_finished_) return;
  gen_finished_ = true;
  ApiError e = api_error_from_status(status);
  if (status.code() == StatusCode::kCancelled) {
    // Not by us (a client that left has its connection closed already): the
    // backend gave the request up, e.g. while shutting down.
    e.http_status = 503;
    e.type = "server_error";
    e.code = "service_unavailable";
    e.message = "the request was cancelled by the server: " + status.message();
  }
  if (active_->stream) {
    // The status line is gone already: an error event, then the end of the
    // stream without [DONE], and the connection closes.
    keep_alive_ = false;
    stream_push(OutItem::kChunk, stream_error_event(e));
    stream_push(OutItem::kLast, {});
    stream_done_ = true;
    return;
  }
  const MetricRoute route = active_->route;
  active_.reset();
  send_error(e, route, false);
}

void Session::send_error(const ApiError& error, MetricRoute route, bool close_after) {
  send_reply(error.http_status, error_body(error), "application/json", route, close_after);
}

void Session::send_reply(int status, std::string body, const char* content_type, MetricRoute route,
                         bool close_after, const char* allow) {
  shared_.metrics.count_request(route, status);
  reply_ =
      std::make_shared<http::response<http::string_body>>(static_cast<http::status>(status), 11);
  reply_->set(http::field::server, "kvgate");
  reply_->set(http::field::content_type, content_type);
  if (allow) reply_->set(http::field::allow, allow);
  if (close_after) keep_alive_ = false;
  reply_->keep_alive(keep_alive_);
  reply_->body() = std::move(body);
  reply_->prepare_payload();
  stream_.expires_after(shared_.options.write_timeout);
  http::async_write(stream_, *reply_,
                    [self = shared_from_this(), close_after](beast::error_code ec, size_t) {
                      self->reply_.reset();
                      if (ec) return self->close();
                      if (close_after) return self->linger_close();
                      self->after_response();
                    });
}

// A response is complete: read the next request, once the disconnect watch
// (if any) has been called off.
void Session::after_response() {
  if (closed_) return;
  active_.reset();
  if (!keep_alive_) return linger_close();
  if (watching_) {
    resume_after_watch_ = true;
    beast::error_code ec;
    stream_.socket().cancel(ec);  // no write is in flight now: only the watch is cancelled
    return;
  }
  do_read();
}

void Session::start_watch() {
  if (watching_ || closed_) return;
  watching_ = true;
  // Raw socket read: no tcp_stream timeout applies while the request runs.
  stream_.socket().async_read_some(
      net::buffer(probe_),
      [self = shared_from_this()](beast::error_code ec, size_t n) { self->on_watch(ec, n); });
}

void Session::on_watch(beast::error_code ec, size_t n) {
  watching_ = false;
  if (closed_) return;
  if (!ec) {
    // The client sent more (a pipelined request): keep the byte for the next
    // parse; a close is then seen by a failing write instead.
    auto dst = buffer_.prepare(n);
    net::buffer_copy(dst, net::buffer(probe_, n));
    buffer_.commit(n);
  } else if (ec != net::error::operation_aborted) {
    return client_gone();
  }
  if (resume_after_watch_) {
    resume_after_watch_ = false;
    do_read();
  }
}

void Session::client_gone() {
  if (active_ && !gen_finished_) {
    shared_.backend->cancel(active_->id);
    if (!active_->stream) shared_.metrics.count_request(active_->route, 499);
  }
  close();
}

void Session::stream_push(OutItem::Kind kind, std::string data) {
  out_.push_back(OutItem{kind, std::move(data)});
  pump();
}

void Session::pump() {
  if (writing_ || out_.empty() || closed_) return;
  writing_ = true;
  stream_.expires_after(shared_.options.write_timeout);
  auto done = [self = shared_from_this()](beast::error_code ec, size_t) {
    self->writing_ = false;
    const bool last = self->out_.front().kind == OutItem::kLast;
    self->out_.pop_front();
    if (ec) return self->client_gone();
    if (last) return self->end_generation();
    self->pump();
  };
  const OutItem& item = out_.front();
  switch (item.kind) {
    case OutItem::kRaw:
      net::async_write(stream_, net::buffer(item.data), std::move(done));
      break;
    case OutItem::kChunk:
      net::async_write(stream_, http::make_chunk(net::buffer(item.data)), std::move(done));
      break;
    case OutItem::kLast:
      net::async_write(stream_, http::make_chunk_last(), std::move(done));
      break;
  }
}

void Session::end_generation() {
  out_.clear();
  stream_done_ = false;
  after_response();
}

void Session::linger_close() {
  if (closed_) return;
  // With the disconnect watch pending, the request was read whole: nothing
  // unread can turn the close into a reset, so close at once.
  if (watching_) return close();
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  // Drain what the client still sends (an unread body) so our answer is not
  // lost to a reset; give up after a while.
  stream_.expires_after(std::chrono::seconds(2));
  auto drained = std::make_shared<size_t>(0);
  auto buf = std::make_shared<std::array<char, 16384>>();
  auto step = std::make_shared<std::function<void()>>();
  *step = [self = shared_from_this(), drained, buf, step]() {
    self->stream_.async_read_some(net::buffer(*buf),
                                  [self, drained, buf, step](beast::error_code ec, size_t n) {
                                    *drained += n;
                                    if (ec || *drained > kLingerDrainBytes) {
                                      *step = nullptr;  // break the self-reference
                                      return self->close();
                                    }
                                    (*step)();
                                  });
  };
  (*step)();
}

void Session::close() {
  if (closed_) return;
  closed_ = true;
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
  stream_.close();
}

}  // namespace

struct HttpServer::Impl {
  std::shared_ptr<Shared> shared;
  std::vector<std::thread> threads;
  uint16_t port = 0;
  std::string host;
  bool stopped = false;

  void do_accept() {
    shared->acceptor->async_accept(
        net::make_strand(shared->ioc), [this](beast::error_code ec, tcp::socket socket) {
          if (ec == net::error::operation_aborted || !shared->acceptor->is_open()) return;
          if (!ec) std::make_shared<Session>(std::move(socket), shared)->start();
          do_accept();
        });
  }
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() {
  stop();
}

Result<std::unique_ptr<HttpServer>> HttpServer::start(
    HttpServerOptions options, Backend& backend, std::shared_ptr<prometheus::Registry> registry) {
  if (options.models.empty()) return invalid_argument("http server: no model to serve");
  const CoordinatorConfig& c = options.config;
  if (c.http_threads < 1) return invalid_argument("coordinator.http_threads must be >= 1");
  std::optional<ApiKeys> keys;
  if (c.auth == AuthMode::kRequired) {
    if (options.api_keys) {
      keys = std::move(options.api_keys);
    } else {
      if (c.api_keys_file.empty()) {
        return invalid_argument(
            "coordinator.api_keys_file: required while coordinator.auth is required (or set "
            "coordinator.auth: disabled explicitly)");
      }
      auto loaded = ApiKeys::load_file(c.api_keys_file);
      if (!loaded.ok()) return loaded.status();
      keys = std::move(*loaded);
    }
  }
  if (!registry) registry = std::make_shared<prometheus::Registry>();
  auto impl = std::make_unique<Impl>();
  impl->shared = std::make_shared<Shared>(std::move(options), backend, std::move(registry));
  Shared& sh = *impl->shared;
  sh.keys = std::move(keys);
  const HostPort listen = sh.options.config.listen;
  try {
    tcp::resolver resolver(sh.ioc);
    auto results = resolver.resolve(listen.host, std::to_string(listen.port),
                                    tcp::resolver::passive | tcp::resolver::numeric_service);
    if (results.empty())
      return unavailable("coordinator.listen " + listen.to_string() + ": no address");
    const tcp::endpoint ep = results.begin()->endpoint();
    sh.acceptor.emplace(sh.ioc);
    sh.acceptor->open(ep.protocol());
    sh.acceptor->set_option(net::socket_base::reuse_address(true));
    sh.acceptor->bind(ep);
    sh.acceptor->listen(net::socket_base::max_listen_connections);
    impl->port = sh.acceptor->local_endpoint().port();
    impl->host =
        ep.address().is_v6() ? "[" + ep.address().to_string() + "]" : ep.address().to_string();
  } catch (const boost::system::system_error& e) {
    return unavailable("coordinator.listen " + listen.to_string() + ": " + e.code().message());
  }
  sh.metrics.set_queue_length(0);
  impl->do_accept();
  for (int64_t i = 0; i < sh.options.config.http_threads; ++i) {
    impl->threads.emplace_back([shared = impl->shared.get()] { shared->ioc.run(); });
  }
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

uint16_t HttpServer::port() const {
  return impl_->port;
}

std::string HttpServer::url() const {
  return "http://" + impl_->host + ":" + std::to_string(impl_->port);
}

CoordinatorMetrics& HttpServer::metrics() {
  return impl_->shared->metrics;
}

void HttpServer::stop() {
  if (!impl_ || impl_->stopped) return;
  impl_->stopped = true;
  Shared& sh = *impl_->shared;
  sh.ioc.stop();
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
  beast::error_code ec;
  if (sh.acceptor) sh.acceptor->close(ec);  // no I/O thread runs now
  // Connections still pending in the io_context are destroyed with it, when
  // the last owner of Shared (this server or a sink in the backend) lets go.
}

}  // namespace kvgate::coordinator
