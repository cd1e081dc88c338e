// Helpers of the control channel tests (control_channel_test.cpp,
// control_channel_bad_peer_test.cpp): an io_context on a thread, recorders
// of what a side saw, a listener and a dialer wired to them, raw POSIX
// sockets for misbehaving peers.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "common/control_channel.h"
#include "common/crc32c.h"

namespace kvgate::control::channel_test {

using namespace std::chrono_literals;
namespace asio = boost::asio;

constexpr auto kWait = 10s;  // generous: a failing test waits this long, a passing one never

// An io_context running on one thread for the test's lifetime. Declared
// first in a test so that it is destroyed last.
class IoThread {
 public:
  explicit IoThread(int threads = 1) : guard_(asio::make_work_guard(io_)) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { io_.run(); });
  }
  ~IoThread() {
    guard_.reset();
    io_.stop();
    for (auto& t : threads_) t.join();
  }
  asio::io_context& io() { return io_; }

  // Returns once everything posted to the io_context before it has run
  // (with one thread: FIFO).
  void barrier() {
    std::promise<void> done;
    asio::post(io_, [&] { done.set_value(); });
    done.get_future().wait();
  }

 private:
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> guard_;
  std::vector<std::thread> threads_;
};

// What one side of a connection saw, with waits on it. The handlers share
// its state, so a callback running while a test unwinds finds it alive.
class Recorder {
 public:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<Message> messages;
    std::vector<Status> closed;
    std::vector<ConnectionPtr> opened;
    // For wait() predicates (the lock is held there).
    size_t message_count() const { return messages.size(); }
    size_t closed_count() const { return closed.size(); }
    size_t opened_count() const { return opened.size(); }
  };

  Recorder() = default;
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;
  // The connections' handlers share the state: drop the connections it
  // holds, or each would keep itself alive through them.
  ~Recorder() {
    std::lock_guard<std::mutex> lock(s_->mu);
    s_->opened.clear();
  }

  ConnectionHandlers handlers() {
    ConnectionHandlers h;
    h.on_message = [s = s_](const ConnectionPtr&, Message m) {
      std::lock_guard<std::mutex> lock(s->mu);
      s->messages.push_back(std::move(m));
      s->cv.notify_all();
    };
    h.on_closed = [s = s_](const ConnectionPtr&, const Status& status) {
      std::lock_guard<std::mutex> lock(s->mu);
      s->closed.push_back(status);
      s->cv.notify_all();
    };
    return h;
  }
  std::function<void(const ConnectionPtr&)> on_open() {
    return [s = s_](const ConnectionPtr& c) {
      std::lock_guard<std::mutex> lock(s->mu);
      s->opened.push_back(c);
      s->cv.notify_all();
    };
  }
  template <typename Pred>
  bool wait(Pred pred, std::chrono::milliseconds timeout = kWait) {
    std::unique_lock<std::mutex> lock(s_->mu);
    return s_->cv.wait_for(lock, timeout, [&] { return pred(static_cast<const State&>(*s_)); });
  }
  std::vector<Message> messages() {
    std::lock_guard<std::mutex> lock(s_->mu);
    return s_->messages;
  }
  std::vector<Status> closed() {
    std::lock_guard<std::mutex> lock(s_->mu);
    return s_->closed;
  }
  size_t opened_count() {
    std::lock_guard<std::mutex> lock(s_->mu);
    return s_->opened.size();
  }
  ConnectionPtr first_opened() {
    std::lock_guard<std::mutex> lock(s_->mu);
    return s_->opened.empty() ? nullptr : s_->opened.front();
  }

 private:
  std::shared_ptr<State> s_ = std::make_shared<State>();
};

inline ChannelOptions test_options() {
  ChannelOptions o;
  o.cluster_token = "s3cret-token";
  o.max_frame_bytes = 1 << 20;
  o.connect_timeout = 5000ms;
  o.handshake_timeout = 5000ms;
  o.close_timeout = 5000ms;
  return o;
}

inline Hello test_hello(uint64_t node_id = 42) {
  Hello h;
  h.role = NodeRole::kDecode;
  h.node_id = NodeId(node_id);
  h.node_name = "decode-test";
  h.model_name = "smollm2";
  h.control_address = "127.0.0.1:7200";
  h.transport_name = "loopback";
  h.transport_address = Bytes{std::byte{1}, std::byte{2}, std::byte{3}};
  return h;
}

// A listener and what it saw.
struct Server {
  struct Hellos {
    std::mutex mu;
    std::vector<Hello> seen;  // what accept_hello was asked
    std::function<Result<HelloAck>(const Hello&)> decide = [](const Hello&) -> Result<HelloAck> {
      HelloAck ack;
      ack.node_id = NodeId(7);
      ack.heartbeat_interval = 250ms;
      return ack;
    };
  };
  Recorder recorder;
  std::shared_ptr<Hellos> hello_state = std::make_shared<Hellos>();
  std::shared_ptr<Listener> listener;

  void start(asio::io_context& io, ChannelOptions options = test_options()) {
    ListenerOptions lo;
    lo.channel = options;
    lo.accept_hello = [h = hello_state](const Hello& hello) {
      {
        std::lock_guard<std::mutex> lock(h->mu);
        h->seen.push_back(hello);
      }
      return h->decide(hello);
    };
    lo.on_open = recorder.on_open();
    lo.handlers = recorder.handlers();
    auto l = listen_control(io, HostPort{"127.0.0.1", 0}, std::move(lo));
    ASSERT_TRUE(l.ok()) << l.status().to_string();
    listener = *l;
    ASSERT_NE(listener->local_address().port, 0);
  }
  uint16_t port() const { return listener->local_address().port; }
  std::vector<Hello> hellos() {
    std::lock_guard<std::mutex> lock(hello_state->mu);
    return hello_state->seen;
  }
  size_t hello_count() { return hellos().size(); }
};

// The outcome of connect_control.
struct Dial {
  using Outcome = std::pair<Result<ConnectionPtr>, HelloAck>;
  Recorder recorder;
  std::shared_ptr<std::promise<Outcome>> promise = std::make_shared<std::promise<Outcome>>();
  std::future<Outcome> future = promise->get_future();
  std::string host = "127.0.0.1";

  void start(asio::io_context& io, uint16_t port, ChannelOptions options = test_options(),
             Hello hello = test_hello()) {
    connect_control(io, HostPort{host, port}, std::move(hello), options, recorder.handlers(),
                    [p = promise](Result<ConnectionPtr> c, const HelloAck& ack) {
                      p->set_value({std::move(c), ack});
                    });
  }
  Outcome get() {
    if (future.wait_for(kWait) != std::future_status::ready) {
      ADD_FAILURE() << "connect_control never called back";
      return {unavailable("test: no callback"), HelloAck{}};
    }
    return future.get();
  }
};

// A blocking POSIX socket with a receive timeout, for raw peers.
class RawSocket {
 public:
  explicit RawSocket(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{10, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~RawSocket() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool connected() const { return connected_; }
  void send(std::span<const std::byte> bytes) {
    ASSERT_EQ(::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }
  void send(std::string_view text) { send(std::as_bytes(std::span(text.data(), text.size()))); }
  // Everything until the peer's end of stream (or the timeout: `eof` false).
  std::vector<std::byte> read_to_end(bool* eof) {
    std::vector<std::byte> out;
    std::byte buf[4096];
    while (true) {
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) {
        *eof = n == 0;
        return out;
      }
      out.insert(out.end(), buf, buf + n);
    }
  }
  // The next whole message.
  Result<Message> read_message() {
    std::byte buf[4096];
    while (true) {
      auto m = decoder_.next();
      if (!m.ok()) return m.status();
      if (m->has_value()) return std::move(**m);
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return unavailable("raw: end of stream");
      decoder_.feed(std::span<const std::byte>(buf, static_cast<size_t>(n)));
    }
  }
  void close() {
    ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  FrameDecoder decoder_;
};

inline std::vector<Message> decode_all(const std::vector<std::byte>& bytes) {
  FrameDecoder decoder;
  decoder.feed(bytes);
  std::vector<Message> out;
  while (true) {
    auto m = decoder.next();
    if (!m.ok() || !m->has_value()) return out;
    out.push_back(std::move(**m));
  }
}

// A raw peer sends `bytes`; the listener must answer one connection-level
// Error with `code` whose message contains `needle`, then end the stream.
inline void expect_error_answer(uint16_t port, std::span<const std::byte> bytes, StatusCode code,
                                std::string_view needle) {
  RawSocket raw(port);
  ASSERT_TRUE(raw.connected());
  raw.send(bytes);
  bool eof = false;
  const auto answer = decode_all(raw.read_to_end(&eof));
  EXPECT_TRUE(eof) << "the listener did not close the connection";
  ASSERT_EQ(answer.size(), 1u);
  const auto* error = std::get_if<Error>(&answer[0]);
  ASSERT_NE(error, nullptr) << message_type_name(message_type(answer[0]));
  EXPECT_FALSE(error->request_id.valid());
  EXPECT_EQ(error->code, code) << error->message;
  EXPECT_NE(error->message.find(needle), std::string::npos) << error->message;
}

// A good connection through `server` works end to end.
inline void expect_good_connection(asio::io_context& io, Server& server, uint64_t node_id) {
  Dial dial;
  dial.start(io, server.port(), test_options(), test_hello(node_id));
  auto [conn, ack] = dial.get();
  ASSERT_TRUE(conn.ok()) << conn.status().to_string();
  Heartbeat hb;
  hb.node_id = NodeId(node_id);
  hb.sequence = 99;
  (*conn)->send(hb);
  ASSERT_TRUE(server.recorder.wait([&](const auto& r) {
    for (const auto& m : r.messages) {
      if (const auto* h = std::get_if<Heartbeat>(&m); h && h->node_id == NodeId(node_id))
        return true;
    }
    return false;
  }));
  (*conn)->close(Status());
  ASSERT_TRUE(dial.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
}

inline Heartbeat heartbeat(uint64_t node, uint64_t sequence) {
  Heartbeat hb;
  hb.node_id = NodeId(node);
  hb.sequence = sequence;
  hb.pool_free_bytes = sequence * 4096;
  return hb;
}

// A PrefillJob whose frame is exactly `frame_bytes` long (prompt sized to fit).
inline PrefillJob job_of_frame_size(size_t frame_bytes, uint64_t request) {
  PrefillJob job;
  job.request_id = RequestId(request);
  job.prompt_token_ids.clear();
  const size_t base = encoded_frame_bytes(job);
  job.prompt_token_ids.resize((frame_bytes - base) / sizeof(TokenId));
  for (size_t i = 0; i < job.prompt_token_ids.size(); ++i) {
    job.prompt_token_ids[i] = static_cast<TokenId>((i * 7919 + request) % 49152);
  }
  // Pad to the exact size with the decode address string.
  job.decode_control_address.assign(frame_bytes - encoded_frame_bytes(job), 'x');
  return job;
}

// Both sides connected; the listener's end is `server_conn`.
struct Pair {
  Server server;
  Dial dial;
  ConnectionPtr client_conn;
  ConnectionPtr server_conn;
  HelloAck ack;

  void start(asio::io_context& io, ChannelOptions options = test_options()) {
    server.start(io, options);
    dial.start(io, server.port(), options);
    auto [conn, a] = dial.get();
    ASSERT_TRUE(conn.ok()) << conn.status().to_string();
    client_conn = *conn;
    ack = a;
    ASSERT_TRUE(server.recorder.wait([](const auto& r) { return r.opened_count() == 1; }));
    server_conn = server.recorder.first_opened();
  }
};

inline std::vector<std::byte> header_claiming(MessageType type, uint32_t payload_bytes) {
  std::vector<std::byte> h(kFrameHeaderBytes);
  auto put = [&](size_t at, uint64_t v, size_t n) {
    for (size_t i = 0; i < n; ++i) h[at + i] = static_cast<std::byte>(v >> (8 * i));
  };
  put(0, kFrameMagic, 4);
  put(4, kProtocolVersion, 2);
  put(6, static_cast<uint16_t>(type), 2);
  put(8, 0, 4);
  put(12, payload_bytes, 4);
  put(16, 0, 4);
  put(20, crc32c(h.data(), 20, 0), 4);
  return h;
}

}  // namespace kvgate::control::channel_test
