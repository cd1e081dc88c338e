// Control connections over Asio. One ConnectionImpl per TCP connection;
// every member not marked otherwise is touched only on its strand.
//
// Life of a connection (state_):
//   kConnecting  connector: resolving and connecting (connect timer armed)
//   kHandshake   Hello sent / awaited; frames limited to kHandshakeMaxFrameBytes
//   kOpen        reported (on_open or the connect callback); messages flow
//   kClosing     no more messages in or out except what is queued; once the
//                queue drained, shutdown(send) and wait for the peer's end
//                of stream, all within close_timeout
//   kClosed      socket closed; on_closed (if reported) or the connect
//                callback (if not) has run
// The lingering close matters: closing a socket with unread input sends a
// reset, which can destroy the Error or HelloReject we just queued before
// the peer reads it.
#include "common/control_channel.h"

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fstream>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "common/log.h"

namespace kvgate::control {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Strand = asio::strand<asio::io_context::executor_type>;
using ErrorCode = boost::system::error_code;

constexpr size_t kReadChunkBytes = 64 * 1024;
// One async_write gathers up to this much of the queue.
constexpr size_t kMaxGatherBytes = size_t{1} << 20;
constexpr size_t kMaxGatherFrames = 64;
constexpr std::chrono::milliseconds kAcceptRetryDelay{100};

// Equal iff same length and bytes; the time taken depends on the lengths
// only, not on where the first difference is.
bool tokens_equal(std::string_view a, std::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const auto x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0u;
    const auto y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0u;
    diff |= x ^ y;
  }
  return diff == 0;
}

std::string endpoint_string(const tcp::endpoint& ep) {
  const auto address = ep.address();
  std::string host = address.to_string();
  if (address.is_v6()) host = "[" + host + "]";
  return host + ":" + std::to_string(ep.port());
}

std::string ms_string(std::chrono::milliseconds d) {
  return std::to_string(d.count()) + " ms";
}

// The side of the listener every accepted connection shares; outlives the
// Listener handle as long as one of its connections lives.
struct ListenerShared {
  ListenerOptions options;
  std::string local;  // "host:port", for logs
  std::atomic<uint64_t> accepted{0};
  std::atomic<uint64_t> refused_peers{0};
  std::atomic<uint64_t> rejected_hello{0};
  std::atomic<uint64_t> malformed{0};
};

class ConnectionImpl final : public Connection {
 public:
  // Accepted by a listener.
  ConnectionImpl(asio::io_context& io, tcp::socket socket, std::shared_ptr<ListenerShared> listener)
      : strand_(asio::make_strand(io)),
        socket_(std::move(socket)),
        resolver_(io),
        handshake_timer_(io),
        close_timer_(io),
        options_(listener->options.channel),
        handlers_(listener->options.handlers),
        listener_(std::move(listener)) {
    ErrorCode ec;
    const auto remote = socket_.remote_endpoint(ec);
    remote_ = ec ? std::string("?") : endpoint_string(remote);
  }

  // Dialing `target`.
  ConnectionImpl(asio::io_context& io, const HostPort& target, const ChannelOptions& options,
                 ConnectionHandlers handlers, ConnectDone done)
      : strand_(asio::make_strand(io)),
        socket_(io),
        resolver_(io),
        handshake_timer_(io),
        close_timer_(io),
        options_(options),
        handlers_(std::move(handlers)),
        done_(std::move(done)),
        target_(target),
        remote_(target.to_string()) {}

  void start_accepted() {
    asio::post(strand_, [self = self()] { self->begin_accepted(); });
  }

  void start_connect(Hello hello) {
    asio::post(strand_, [self = self(), hello = std::move(hello)]() mutable {
      self->begin_connect(std::move(hello));
    });
  }

  // ------------------------------------------------------------ Connection

  void send(const Message& message) override {
    if (!open_.load(std::memory_order_acquire)) return;
    std::vector<std::byte> frame = encode(message);
    if (frame.size() > options_.max_frame_bytes) {
      // The peer would close the connection on it; fail here, naming it.
      const Status status = out_of_range(
          "control: " + std::string(message_type_name(message_type(message))) + " of " +
          std::to_string(frame.size()) + " bytes exceeds max_frame_bytes (" +
          std::to_string(options_.max_frame_bytes) + ") on the connection to " + remote_);
      log::error("control: message too large, closing", {{"remote", remote_}, {"status", status}});
      close(status);
      return;
    }
    asio::post(strand_, [self = self(), frame = std::move(frame)]() mutable {
      if (self->state_ != State::kOpen) return;  // closed meanwhile: dropped
      self->queue_frame(std::move(frame));
    });
  }

  void close(const Status& reason) override {
    asio::post(strand_, [self = self(), reason] { self->begin_close(reason); });
  }

  bool is_open() const override { return open_.load(std::memory_order_acquire); }
  const Hello& peer() const override { return peer_; }
  std::string remote_address() const override { return remote_; }

 private:
  enum class State { kConnecting, kHandshake, kOpen, kClosing, kClosed };

  std::shared_ptr<ConnectionImpl> self() {
    return std::static_pointer_cast<ConnectionImpl>(shared_from_this());
  }
  bool is_listener_side() const { return listener_ != nullptr; }

  // ------------------------------------------------------------ start-up

  void begin_accepted() {
    state_ = State::kHandshake;
    set_no_delay();
    decoder_.set_max_frame_bytes(std::min(kHandshakeMaxFrameBytes, options_.max_frame_bytes));
    handshake_timer_.expires_after(options_.handshake_timeout);
    handshake_timer_.async_wait(asio::bind_executor(
        strand_, [self = self()](const ErrorCode& ec) { self->on_handshake_timer(ec); }));
    start_read();
  }

  void begin_connect(Hello hello) {
    state_ = State::kConnecting;
    hello.cluster_token = options_.cluster_token;
    hello_ = std::move(hello);
    handshake_timer_.expires_after(options_.connect_timeout);
    handshake_timer_.async_wait(asio::bind_executor(
        strand_, [self = self()](const ErrorCode& ec) { self->on_handshake_timer(ec); }));
    ErrorCode ec;
    const auto address = asio::ip::make_address(target_.host, ec);
    if (!ec) {
      connect_to(std::vector<tcp::endpoint>{tcp::endpoint(address, target_.port)});
      return;
    }
    resolver_.async_resolve(
        target_.host, std::to_string(target_.port),
        asio::bind_executor(
            strand_, [self = self()](const ErrorCode& ec2, tcp::resolver::results_type results) {
              if (self->state_ != State::kConnecting) return;
              if (ec2) {
                self->finish_close(unavailable("control: cannot resolve " +
                                               self->target_.to_string() + ": " + ec2.message()));
                return;
              }
              std::vector<tcp::endpoint> endpoints;
              for (const auto& entry : results) endpoints.push_back(entry.endpoint());
              self->connect_to(std::move(endpoints));
            }));
  }

  void connect_to(std::vector<tcp::endpoint> endpoints) {
    auto shared_endpoints = std::make_shared<std::vector<tcp::endpoint>>(std::move(endpoints));
    asio::async_connect(
        socket_, *shared_endpoints,
        asio::bind_executor(strand_, [self = self(), shared_endpoints](const ErrorCode& ec,
                                                                       const tcp::endpoint& ep) {
          self->on_connected(ec, ep);
        }));
  }

  void on_connected(const ErrorCode& ec, const tcp::endpoint& endpoint) {
    if (state_ != State::kConnecting) return;  // timed out meanwhile
    if (ec) {
      finish_close(
          unavailable("control: cannot connect to " + target_.to_string() + ": " + ec.message()));
      return;
    }
    state_ = State::kHandshake;
    set_no_delay();
    remote_ = endpoint_string(endpoint);
    decoder_.set_max_frame_bytes(std::min(kHandshakeMaxFrameBytes, options_.max_frame_bytes));
    queue_frame(encode(hello_));
    hello_ = Hello();  // the token is not kept
    start_read();
  }

  void set_no_delay() {
    ErrorCode ec;
    socket_.set_option(tcp::no_delay(true), ec);  // best effort: latency, not correctness
  }

  void on_handshake_timer(const ErrorCode& ec) {
    if (ec == asio::error::operation_aborted) return;
    if (state_ != State::kConnecting && state_ != State::kHandshake) return;
    if (is_listener_side()) {
      const Status status(StatusCode::kDeadlineExceeded,
                          "control: no Hello within " + ms_string(options_.handshake_timeout));
      listener_->refused_peers.fetch_add(1, std::memory_order_relaxed);
      log::warn("control: peer sent no Hello in time",
                {{"remote", remote_}, {"listen", listener_->local}});
      send_error_and_close(status);
      return;
    }
    finish_close(Status(StatusCode::kDeadlineExceeded,
                        "control: connect to " + target_.to_string() + ": no HelloAck within " +
                            ms_string(options_.connect_timeout)));
  }

  // ---------------------------------------------------------------- reading

  void start_read() {
    socket_.async_read_some(
        asio::buffer(read_buffer_),
        asio::bind_executor(
            strand_, [self = self()](const ErrorCode& ec, size_t n) { self->on_read(ec, n); }));
  }

  void on_read(const ErrorCode& ec, size_t n) {
    if (state_ == State::kClosed) return;
    if (ec) {
      if (state_ == State::kClosing) {
        finish_close(close_reason_);
        return;
      }
      std::string what;
      if (ec == asio::error::eof) {
        what = "control: " + remote_ + " closed the connection";
      } else {
        what = "control: connection to " + remote_ + " failed: " + ec.message();
      }
      if (state_ == State::kHandshake) what += " during the handshake";
      if (last_peer_error_) what += " after Error: " + last_peer_error_->status().to_string();
      finish_close(unavailable(std::move(what)));
      return;
    }
    if (state_ != State::kClosing) {
      decoder_.feed(std::span<const std::byte>(read_buffer_.data(), n));
      drain();
    }
    // Reading goes on while closing, to see the peer's end of stream.
    if (state_ != State::kClosed) start_read();
  }

  void drain() {
    while (state_ == State::kHandshake || state_ == State::kOpen) {
      auto next = decoder_.next();
      if (!next.ok()) {
        protocol_error(next.status());
        return;
      }
      if (!next->has_value()) return;
      Message message = std::move(**next);
      if (state_ == State::kHandshake) {
        if (is_listener_side()) {
          on_hello(std::move(message));
        } else {
          on_hello_answer(std::move(message));
        }
      } else {
        deliver(std::move(message));
      }
    }
  }

  void deliver(Message message) {
    if (const auto* e = std::get_if<Error>(&message); e != nullptr && !e->request_id.valid()) {
      last_peer_error_ = *e;  // the peer says why it is about to close
    }
    if (handlers_.on_message) handlers_.on_message(self(), std::move(message));
  }

  void protocol_error(const Status& status) {
    if (is_listener_side()) {
      listener_->malformed.fetch_add(1, std::memory_order_relaxed);
    }
    log::warn("control: bad frame from peer, closing",
              {{"remote", remote_}, {"status", status}, {"reported", reported_}});
    send_error_and_close(status);
  }

  // Queues Error{none, status} and closes once it is written.
  void send_error_and_close(const Status& status) {
    if (!reported_) report_connect_failure(status);
    queue_frame(encode(Error{RequestId(), status.code(), status.message()}));
    begin_close(status);
  }

  // ------------------------------------------------------------- handshake

  // Listener side: the first message must be a Hello with the right token.
  void on_hello(Message message) {
    auto* hello = std::get_if<Hello>(&message);
    if (hello == nullptr) {
      listener_->malformed.fetch_add(1, std::memory_order_relaxed);
      const Status status = invalid_argument("control: expected Hello first, got " +
                                             std::string(message_type_name(message_type(message))));
      log::warn("control: peer did not start with Hello",
                {{"remote", remote_}, {"status", status}});
      send_error_and_close(status);
      return;
    }
    if (options_.auth_required && !tokens_equal(hello->cluster_token, options_.cluster_token)) {
      listener_->refused_peers.fetch_add(1, std::memory_order_relaxed);
      log::warn("control: peer refused: wrong cluster token",
                {{"remote", remote_}, {"listen", listener_->local}, {"node", hello->node_name}});
      reject_hello(Status(StatusCode::kPermissionDenied, "control: wrong cluster token"));
      return;
    }
    hello->cluster_token.clear();  // the secret is not kept
    if (hello->protocol_version != kProtocolVersion) {
      listener_->rejected_hello.fetch_add(1, std::memory_order_relaxed);
      reject_hello(unimplemented("control: Hello.protocol_version is " +
                                 std::to_string(hello->protocol_version) + ", this node speaks " +
                                 std::to_string(kProtocolVersion)));
      return;
    }
    Result<HelloAck> ack = listener_->options.accept_hello ? listener_->options.accept_hello(*hello)
                                                           : Result<HelloAck>(HelloAck{});
    if (!ack.ok()) {
      listener_->rejected_hello.fetch_add(1, std::memory_order_relaxed);
      log::info("control: Hello rejected", {{"remote", remote_},
                                            {"node", hello->node_name},
                                            {"node_id", hello->node_id},
                                            {"status", ack.status()}});
      reject_hello(ack.status());
      return;
    }
    handshake_timer_.cancel();
    peer_ = std::move(*hello);
    state_ = State::kOpen;
    decoder_.set_max_frame_bytes(options_.max_frame_bytes);
    queue_frame(encode(*ack));
    reported_ = true;
    open_.store(true, std::memory_order_release);
    if (listener_->options.on_open) listener_->options.on_open(self());
  }

  void reject_hello(const Status& status) {
    HelloReject reject;
    // HelloReject is never OK; a callback returning one would be our bug.
    reject.code = status.ok() ? StatusCode::kInternal : status.code();
    reject.reason = status.message();
    queue_frame(encode(reject));
    begin_close(Status(reject.code, reject.reason));
  }

  // Connecting side: HelloAck, HelloReject, or an Error explaining a refusal.
  void on_hello_answer(Message message) {
    if (auto* ack = std::get_if<HelloAck>(&message)) {
      if (ack->protocol_version != kProtocolVersion) {
        send_error_and_close(unimplemented("control: HelloAck.protocol_version from " + remote_ +
                                           " is " + std::to_string(ack->protocol_version) +
                                           ", this node speaks " +
                                           std::to_string(kProtocolVersion)));
        return;
      }
      handshake_timer_.cancel();
      peer_ = Hello();
      peer_.node_id = ack->node_id;
      peer_.protocol_version = ack->protocol_version;
      peer_.control_address = target_.to_string();
      state_ = State::kOpen;
      decoder_.set_max_frame_bytes(options_.max_frame_bytes);
      reported_ = true;
      open_.store(true, std::memory_order_release);
      ConnectDone done = std::move(done_);
      done_ = nullptr;
      if (done) done(ConnectionPtr(self()), *ack);
      return;
    }
    if (const auto* reject = std::get_if<HelloReject>(&message)) {
      const StatusCode code =
          reject->code == StatusCode::kOk ? StatusCode::kPermissionDenied : reject->code;
      finish_close(Status(code, "control: " + remote_ + " rejected the Hello: " + reject->reason));
      return;
    }
    if (const auto* error = std::get_if<Error>(&message)) {
      const StatusCode code =
          error->code == StatusCode::kOk ? StatusCode::kUnavailable : error->code;
      finish_close(Status(
          code, "control: " + remote_ + " answered the Hello with Error: " + error->message));
      return;
    }
    send_error_and_close(invalid_argument("control: expected HelloAck or HelloReject, got " +
                                          std::string(message_type_name(message_type(message)))));
  }

  void report_connect_failure(const Status& status) {
    if (!done_) return;
    ConnectDone done = std::move(done_);
    done_ = nullptr;
    done(status.ok() ? unavailable("control: connection to " + remote_ + " closed")
                     : Result<ConnectionPtr>(status),
         HelloAck{});
  }

  // ---------------------------------------------------------------- writing

  void queue_frame(std::vector<std::byte> frame) {
    queue_.push_back(std::move(frame));
    start_write();
  }

  void start_write() {
    if (writing_ || queue_.empty() || state_ == State::kClosed || state_ == State::kConnecting) {
      return;
    }
    in_flight_.clear();
    write_buffers_.clear();
    size_t bytes = 0;
    while (!queue_.empty() && in_flight_.size() < kMaxGatherFrames &&
           (in_flight_.empty() || bytes + queue_.front().size() <= kMaxGatherBytes)) {
      bytes += queue_.front().size();
      in_flight_.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    for (const auto& frame : in_flight_) write_buffers_.push_back(asio::buffer(frame));
    writing_ = true;
    asio::async_write(socket_, write_buffers_,
                      asio::bind_executor(strand_, [self = self()](const ErrorCode& ec, size_t) {
                        self->on_write(ec);
                      }));
  }

  void on_write(const ErrorCode& ec) {
    writing_ = false;
    in_flight_.clear();
    if (state_ == State::kClosed) return;
    if (ec) {
      finish_close(unavailable("control: write to " + remote_ + " failed: " + ec.message()));
      return;
    }
    start_write();
    maybe_shutdown_send();
  }

  // ---------------------------------------------------------------- closing

  void begin_close(const Status& reason) {
    if (state_ == State::kClosing || state_ == State::kClosed) return;
    open_.store(false, std::memory_order_release);
    if (state_ == State::kConnecting) {
      finish_close(reason);
      return;
    }
    state_ = State::kClosing;
    close_reason_ = reason;
    handshake_timer_.cancel();
    close_timer_.expires_after(options_.close_timeout);
    close_timer_.async_wait(asio::bind_executor(strand_, [self = self()](const ErrorCode& ec) {
      if (ec == asio::error::operation_aborted || self->state_ != State::kClosing) return;
      self->finish_close(self->close_reason_);
    }));
    maybe_shutdown_send();
  }

  // Once the queue drained while closing: end our half of the stream and
  // wait for the peer's end (on_read) or the close timer.
  void maybe_shutdown_send() {
    if (state_ != State::kClosing || writing_ || !queue_.empty() || send_shut_down_) return;
    send_shut_down_ = true;
    ErrorCode ec;
    socket_.shutdown(tcp::socket::shutdown_send, ec);
    if (ec) finish_close(close_reason_);
  }

  // `reason` counts unless close() already gave one.
  void finish_close(Status reason) {
    if (state_ == State::kClosed) return;
    if (state_ != State::kClosing) close_reason_ = std::move(reason);
    state_ = State::kClosed;
    open_.store(false, std::memory_order_release);
    handshake_timer_.cancel();
    close_timer_.cancel();
    resolver_.cancel();
    ErrorCode ec;
    socket_.close(ec);
    queue_.clear();
    // Drop the callbacks (and what they capture) once they cannot run again.
    ConnectionHandlers handlers = std::move(handlers_);
    handlers_ = ConnectionHandlers();
    if (reported_) {
      if (handlers.on_closed) handlers.on_closed(self(), close_reason_);
    } else {
      report_connect_failure(close_reason_);
    }
    listener_.reset();
  }

  Strand strand_;
  tcp::socket socket_;
  tcp::resolver resolver_;
  asio::steady_timer handshake_timer_;  // Hello deadline, or connect + handshake deadline
  asio::steady_timer close_timer_;
  const ChannelOptions options_;
  ConnectionHandlers handlers_;
  std::shared_ptr<ListenerShared> listener_;  // set on the listener side only
  ConnectDone done_;                          // connector side, until called
  HostPort target_;                           // connector side
  Hello hello_;                               // connector side, until written

  State state_ = State::kHandshake;
  bool reported_ = false;
  bool writing_ = false;
  bool send_shut_down_ = false;
  Status close_reason_;
  std::optional<Error> last_peer_error_;
  FrameDecoder decoder_;
  std::vector<std::byte> read_buffer_ = std::vector<std::byte>(kReadChunkBytes);
  std::deque<std::vector<std::byte>> queue_;
  std::vector<std::vector<std::byte>> in_flight_;
  std::vector<asio::const_buffer> write_buffers_;

  // Any thread.
  std::atomic<bool> open_{false};
  // Written before the connection is reported, read-only after.
  Hello peer_;
  std::string remote_;
};

// The accept loop; owned by its pending accept and by the Listener handle.
class ListenerCore : public std::enable_shared_from_this<ListenerCore> {
 public:
  ListenerCore(asio::io_context& io, tcp::acceptor acceptor, std::shared_ptr<ListenerShared> shared)
      : io_(io),
        strand_(asio::make_strand(io)),
        acceptor_(std::move(acceptor)),
        retry_timer_(io),
        shared_(std::move(shared)) {}

  void start() {
    asio::post(strand_, [self = shared_from_this()] { self->accept_next(); });
  }

  void stop() {
    asio::post(strand_, [self = shared_from_this()] {
      self->stopped_ = true;
      ErrorCode ec;
      self->acceptor_.close(ec);
      self->retry_timer_.cancel();
    });
  }

  const std::shared_ptr<ListenerShared>& shared() const { return shared_; }

 private:
  void accept_next() {
    if (stopped_) return;
    acceptor_.async_accept(asio::bind_executor(
        strand_, [self = shared_from_this()](const ErrorCode& ec, tcp::socket socket) {
          self->on_accept(ec, std::move(socket));
        }));
  }

  void on_accept(const ErrorCode& ec, tcp::socket socket) {
    if (stopped_ || ec == asio::error::operation_aborted) return;
    if (ec) {
      // Out of descriptors, say: try again shortly instead of spinning.
      log::warn("control: accept failed", {{"listen", shared_->local}, {"error", ec.message()}});
      retry_timer_.expires_after(kAcceptRetryDelay);
      retry_timer_.async_wait(
          asio::bind_executor(strand_, [self = shared_from_this()](const ErrorCode& ec2) {
            if (!ec2) self->accept_next();
          }));
      return;
    }
    shared_->accepted.fetch_add(1, std::memory_order_relaxed);
    auto connection = std::make_shared<ConnectionImpl>(io_, std::move(socket), shared_);
    connection->start_accepted();
    accept_next();
  }

  asio::io_context& io_;
  Strand strand_;
  tcp::acceptor acceptor_;
  asio::steady_timer retry_timer_;
  std::shared_ptr<ListenerShared> shared_;
  bool stopped_ = false;  // strand
};

class ListenerImpl final : public Listener {
 public:
  ListenerImpl(std::shared_ptr<ListenerCore> core, HostPort local)
      : core_(std::move(core)), local_(std::move(local)) {}
  ~ListenerImpl() override { core_->stop(); }

  HostPort local_address() const override { return local_; }
  void stop() override { core_->stop(); }
  ListenerCounters counters() const override {
    const ListenerShared& s = *core_->shared();
    ListenerCounters c;
    c.accepted = s.accepted.load(std::memory_order_relaxed);
    c.refused_peers = s.refused_peers.load(std::memory_order_relaxed);
    c.rejected_hello = s.rejected_hello.load(std::memory_order_relaxed);
    c.malformed = s.malformed.load(std::memory_order_relaxed);
    return c;
  }

 private:
  std::shared_ptr<ListenerCore> core_;
  HostPort local_;
};

std::string_view trim(std::string_view s) {
  constexpr std::string_view kSpace = " \t\r\n\v\f";
  const size_t begin = s.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) return {};
  const size_t end = s.find_last_not_of(kSpace);
  return s.substr(begin, end - begin + 1);
}

}  // namespace

Result<std::shared_ptr<Listener>> listen_control(asio::io_context& io, const HostPort& address,
                                                 ListenerOptions options) {
  const std::string where = address.to_string();
  std::vector<tcp::endpoint> endpoints;
  ErrorCode ec;
  const auto ip = asio::ip::make_address(address.host, ec);
  if (!ec) {
    endpoints.emplace_back(ip, address.port);
  } else {
    tcp::resolver resolver(io);
    const auto results = resolver.resolve(address.host, std::to_string(address.port), ec);
    if (ec)
      return unavailable("control: cannot resolve listen address " + where + ": " + ec.message());
    for (const auto& entry : results) endpoints.push_back(entry.endpoint());
  }
  tcp::acceptor acceptor(io);
  std::string last_error = "no address";
  for (const auto& endpoint : endpoints) {
    ErrorCode e;
    acceptor.open(endpoint.protocol(), e);
    if (!e) acceptor.set_option(asio::socket_base::reuse_address(true), e);
    if (!e) acceptor.bind(endpoint, e);
    if (!e) acceptor.listen(asio::socket_base::max_listen_connections, e);
    if (!e) break;
    last_error = e.message();
    ErrorCode ignored;
    acceptor.close(ignored);
  }
  if (!acceptor.is_open()) {
    return unavailable("control: cannot listen on " + where + ": " + last_error);
  }
  const auto local_endpoint = acceptor.local_endpoint(ec);
  if (ec) return unavailable("control: cannot listen on " + where + ": " + ec.message());
  HostPort local{address.host, local_endpoint.port()};

  auto shared = std::make_shared<ListenerShared>();
  shared->options = std::move(options);
  shared->local = local.to_string();
  auto core = std::make_shared<ListenerCore>(io, std::move(acceptor), std::move(shared));
  core->start();
  return std::shared_ptr<Listener>(
      std::make_shared<ListenerImpl>(std::move(core), std::move(local)));
}

void connect_control(asio::io_context& io, const HostPort& address, Hello hello,
                     const ChannelOptions& options, ConnectionHandlers handlers, ConnectDone done) {
  auto connection =
      std::make_shared<ConnectionImpl>(io, address, options, std::move(handlers), std::move(done));
  connection->start_connect(std::move(hello));
}

ChannelOptions channel_options(const PeerConfig& cluster, const std::string& token) {
  ChannelOptions options;
  options.cluster_token = token;
  options.auth_required = cluster.auth == AuthMode::kRequired;
  if (cluster.max_frame_bytes > 0) {
    options.max_frame_bytes = static_cast<size_t>(cluster.max_frame_bytes);
  }
  options.connect_timeout = cluster.connect_timeout;
  options.handshake_timeout = cluster.connect_timeout;
  return options;
}

Result<std::string> read_cluster_token(const PeerConfig& cluster) {
  if (cluster.auth == AuthMode::kDisabled) return std::string();
  if (!cluster.token.empty()) return cluster.token;
  if (cluster.token_file.empty()) {
    return invalid_argument(
        "cluster.token: set cluster.token or cluster.token_file (cluster.auth is required)");
  }
  std::ifstream in(cluster.token_file);
  if (!in) {
    return not_found("cluster.token_file: cannot read " + cluster.token_file + ": " +
                     std::strerror(errno));
  }
  std::string line;
  std::getline(in, line);
  if (in.bad()) {
    return not_found("cluster.token_file: cannot read " + cluster.token_file);
  }
  const std::string_view token = trim(line);
  if (token.empty()) {
    return invalid_argument("cluster.token_file: the first line of " + cluster.token_file +
                            " is empty (it must hold the cluster token)");
  }
  return std::string(token);
}

}  // namespace kvgate::control
