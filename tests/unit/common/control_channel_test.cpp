// Control connections over real TCP on 127.0.0.1 (port 0), with the
// io_context on its own thread: handshake, messages, closing, connecting,
// and the configuration helpers. Misbehaving peers:
// control_channel_bad_peer_test.cpp.
#include <gtest/gtest.h>

#include "tests/unit/common/control_channel_test_util.h"

namespace kvgate::control {
namespace {

using namespace channel_test;

// ---------------------------------------------------------------- handshake

TEST(ControlChannel, HandshakeExchangesHelloAndAck) {
  IoThread io;
  Pair p;
  p.start(io.io());

  EXPECT_EQ(p.ack.node_id, NodeId(7));
  EXPECT_EQ(p.ack.heartbeat_interval, 250ms);
  ASSERT_EQ(p.server.hello_count(), 1u);
  Hello asked = p.server.hellos()[0];
  // The connector filled in the token from its options (else it would be
  // refused); accept_hello and peer() see the Hello without the secret.
  const Hello expected = test_hello();
  EXPECT_EQ(asked, expected);
  EXPECT_EQ(p.server_conn->peer(), expected);
  // The connector knows the peer's id from the HelloAck.
  EXPECT_EQ(p.client_conn->peer().node_id, NodeId(7));
  EXPECT_EQ(p.client_conn->peer().control_address, "127.0.0.1:" + std::to_string(p.server.port()));

  EXPECT_TRUE(p.client_conn->is_open());
  EXPECT_TRUE(p.server_conn->is_open());
  EXPECT_EQ(p.client_conn->remote_address(), "127.0.0.1:" + std::to_string(p.server.port()));
  EXPECT_EQ(p.server_conn->remote_address().rfind("127.0.0.1:", 0), 0u);
  const ListenerCounters c = p.server.listener->counters();
  EXPECT_EQ(c.accepted, 1u);
  EXPECT_EQ(c.refused_peers, 0u);
  EXPECT_EQ(c.rejected_hello, 0u);
  EXPECT_EQ(c.malformed, 0u);
}

TEST(ControlChannel, ManyMessagesBothWaysInOrder) {
  IoThread io;
  Pair p;
  p.start(io.io());
  constexpr uint64_t kCount = 2000;
  for (uint64_t i = 0; i < kCount; ++i) {
    p.client_conn->send(heartbeat(1, i));
    p.server_conn->send(heartbeat(2, i));
  }
  ASSERT_TRUE(p.server.recorder.wait([&](const auto& r) { return r.message_count() == kCount; }));
  ASSERT_TRUE(p.dial.recorder.wait([&](const auto& r) { return r.message_count() == kCount; }));
  const auto at_server = p.server.recorder.messages();
  const auto at_client = p.dial.recorder.messages();
  for (uint64_t i = 0; i < kCount; ++i) {
    ASSERT_EQ(std::get<Heartbeat>(at_server[i]), heartbeat(1, i)) << i;
    ASSERT_EQ(std::get<Heartbeat>(at_client[i]), heartbeat(2, i)) << i;
  }
}

TEST(ControlChannel, LargeMessagesUpToMaxFrameBytes) {
  IoThread io;
  Pair p;
  ChannelOptions options = test_options();
  p.start(io.io(), options);
  // Exactly the limit, and just under it, both ways.
  std::vector<PrefillJob> jobs;
  for (uint64_t i = 0; i < 6; ++i) {
    jobs.push_back(job_of_frame_size(options.max_frame_bytes - (i % 2) * 3, i + 1));
    ASSERT_EQ(encoded_frame_bytes(jobs.back()), options.max_frame_bytes - (i % 2) * 3);
  }
  for (const auto& job : jobs) {
    p.client_conn->send(job);
    p.server_conn->send(job);
  }
  ASSERT_TRUE(
      p.server.recorder.wait([&](const auto& r) { return r.message_count() == jobs.size(); }));
  ASSERT_TRUE(
      p.dial.recorder.wait([&](const auto& r) { return r.message_count() == jobs.size(); }));
  const auto at_server = p.server.recorder.messages();
  const auto at_client = p.dial.recorder.messages();
  for (size_t i = 0; i < jobs.size(); ++i) {
    EXPECT_TRUE(std::get<PrefillJob>(at_server[i]) == jobs[i]) << i;
    EXPECT_TRUE(std::get<PrefillJob>(at_client[i]) == jobs[i]) << i;
  }
  EXPECT_TRUE(p.client_conn->is_open());
  EXPECT_TRUE(p.server_conn->is_open());
}

TEST(ControlChannel, SendOverMaxFrameBytesClosesTheSenderNamingIt) {
  IoThread io;
  Pair p;
  ChannelOptions options = test_options();
  p.start(io.io(), options);
  p.client_conn->send(job_of_frame_size(options.max_frame_bytes + 1, 1));
  ASSERT_TRUE(p.dial.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  const Status s = p.dial.recorder.closed()[0];
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_NE(s.message().find("PrefillJob"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("max_frame_bytes"), std::string::npos) << s.message();
  // The listener never got the frame and saw a clean end of stream.
  ASSERT_TRUE(p.server.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  EXPECT_EQ(p.server.recorder.closed()[0].code(), StatusCode::kUnavailable);
  EXPECT_EQ(p.server.recorder.messages().size(), 0u);
  EXPECT_EQ(p.server.listener->counters().malformed, 0u);
}

TEST(ControlChannel, InterleavedSendsFromSeveralThreadsKeepEachThreadsOrder) {
  IoThread io;
  Pair p;
  p.start(io.io());
  constexpr int kThreads = 4;
  constexpr uint64_t kEach = 500;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t i = 0; i < kEach; ++i) {
        p.client_conn->send(heartbeat(100 + t, i));
        p.server_conn->send(heartbeat(200 + t, i));
      }
    });
  }
  for (auto& t : threads) t.join();
  const size_t total = kThreads * kEach;
  ASSERT_TRUE(p.server.recorder.wait([&](const auto& r) { return r.message_count() == total; }));
  ASSERT_TRUE(p.dial.recorder.wait([&](const auto& r) { return r.message_count() == total; }));
  auto check = [&](const std::vector<Message>& got, uint64_t base) {
    std::vector<uint64_t> next(kThreads, 0);
    for (const auto& m : got) {
      const auto& hb = std::get<Heartbeat>(m);
      const uint64_t t = hb.node_id.value() - base;
      ASSERT_LT(t, static_cast<uint64_t>(kThreads));
      ASSERT_EQ(hb.sequence, next[t]) << "thread " << t;
      ASSERT_EQ(hb, heartbeat(base + t, hb.sequence));
      ++next[t];
    }
    for (int t = 0; t < kThreads; ++t) EXPECT_EQ(next[t], kEach);
  };
  check(p.server.recorder.messages(), 100);
  check(p.dial.recorder.messages(), 200);
}

// With the io_context on several threads, connections run in parallel but
// one connection's callbacks never overlap and keep their order.
TEST(ControlChannel, OneConnectionsCallbacksNeverOverlapOnAThreadPool) {
  IoThread io(4);
  struct PerConnection {
    std::atomic<int> inside{0};
    uint64_t next = 0;  // touched only by the connection's callbacks
  };
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    std::map<Connection*, std::shared_ptr<PerConnection>> conns;
    std::atomic<bool> overlap{false};
    std::atomic<bool> out_of_order{false};
    std::atomic<uint64_t> received{0};
  };
  auto shared = std::make_shared<Shared>();
  ListenerOptions lo;
  lo.channel = test_options();
  lo.on_open = [shared](const ConnectionPtr& c) {
    std::lock_guard<std::mutex> lock(shared->mu);
    shared->conns[c.get()] = std::make_shared<PerConnection>();
  };
  lo.handlers.on_message = [shared](const ConnectionPtr& c, Message m) {
    std::shared_ptr<PerConnection> pc;
    {
      std::lock_guard<std::mutex> lock(shared->mu);
      pc = shared->conns.at(c.get());
    }
    if (pc->inside.fetch_add(1) != 0) shared->overlap = true;
    // Some work, so that an overlap would be seen.
    volatile uint64_t x = 0;
    for (int i = 0; i < 2000; ++i) x = x + static_cast<uint64_t>(i);
    if (std::get<Heartbeat>(m).sequence != pc->next++) shared->out_of_order = true;
    pc->inside.fetch_sub(1);
    shared->received.fetch_add(1);
    std::lock_guard<std::mutex> lock(shared->mu);
    shared->cv.notify_all();
  };
  auto listener = listen_control(io.io(), HostPort{"127.0.0.1", 0}, std::move(lo));
  ASSERT_TRUE(listener.ok());
  constexpr int kClients = 4;
  constexpr uint64_t kEach = 1000;
  std::vector<std::unique_ptr<Dial>> dials;
  std::vector<ConnectionPtr> clients;
  for (int i = 0; i < kClients; ++i) {
    dials.push_back(std::make_unique<Dial>());
    dials.back()->start(io.io(), (*listener)->local_address().port, test_options(),
                        test_hello(100 + i));
    auto [conn, ack] = dials.back()->get();
    ASSERT_TRUE(conn.ok()) << conn.status().to_string();
    clients.push_back(*conn);
  }
  for (uint64_t i = 0; i < kEach; ++i) {
    for (auto& c : clients) c->send(heartbeat(1, i));
  }
  std::unique_lock<std::mutex> lock(shared->mu);
  ASSERT_TRUE(
      shared->cv.wait_for(lock, kWait, [&] { return shared->received == kClients * kEach; }));
  EXPECT_FALSE(shared->overlap);
  EXPECT_FALSE(shared->out_of_order);
  EXPECT_EQ(shared->conns.size(), size_t{kClients});
}

TEST(ControlChannel, WrongClusterTokenIsRefused) {
  IoThread io;
  Server server;
  server.start(io.io());
  ChannelOptions bad = test_options();
  bad.cluster_token = "s3cret-tokem";
  Dial dial;
  dial.start(io.io(), server.port(), bad);
  auto [conn, ack] = dial.get();
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(conn.status().code(), StatusCode::kPermissionDenied) << conn.status().to_string();
  EXPECT_NE(conn.status().message().find("cluster token"), std::string::npos);
  EXPECT_EQ(ack, HelloAck{});

  // A token that is a prefix of the right one is refused too.
  ChannelOptions prefix = test_options();
  prefix.cluster_token = "s3cret";
  Dial dial2;
  dial2.start(io.io(), server.port(), prefix);
  EXPECT_EQ(dial2.get().first.status().code(), StatusCode::kPermissionDenied);

  io.barrier();
  const ListenerCounters c = server.listener->counters();
  EXPECT_EQ(c.accepted, 2u);
  EXPECT_EQ(c.refused_peers, 2u);
  EXPECT_EQ(c.rejected_hello, 0u);
  EXPECT_EQ(server.hello_count(), 0u) << "accept_hello must not see unauthenticated peers";
  EXPECT_EQ(server.recorder.opened_count(), 0u);
  // No on_closed for connections that never opened (on either side).
  EXPECT_EQ(server.recorder.closed().size(), 0u);
  EXPECT_EQ(dial.recorder.closed().size(), 0u);
}

TEST(ControlChannel, AuthDisabledAcceptsAnyToken) {
  IoThread io;
  ChannelOptions open = test_options();
  open.auth_required = false;
  Server server;
  server.start(io.io(), open);
  ChannelOptions other = test_options();
  other.cluster_token = "whatever";
  Dial dial;
  dial.start(io.io(), server.port(), other);
  EXPECT_TRUE(dial.get().first.ok());
}

TEST(ControlChannel, AcceptHelloRejectionReachesTheConnector) {
  IoThread io;
  Server server;
  server.hello_state->decide = [](const Hello& h) -> Result<HelloAck> {
    return Status(StatusCode::kFailedPrecondition,
                  "node id " + std::to_string(h.node_id.value()) + " is already registered");
  };
  server.start(io.io());
  Dial dial;
  dial.start(io.io(), server.port());
  auto [conn, ack] = dial.get();
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(conn.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(conn.status().message().find("node id 42 is already registered"), std::string::npos)
      << conn.status().message();
  io.barrier();
  EXPECT_EQ(server.listener->counters().rejected_hello, 1u);
  EXPECT_EQ(server.listener->counters().refused_peers, 0u);
  EXPECT_EQ(server.recorder.opened_count(), 0u);
}

TEST(ControlChannel, OtherProtocolVersionInHelloIsUnimplemented) {
  IoThread io;
  Server server;
  server.start(io.io());
  Hello h = test_hello();
  h.protocol_version = kProtocolVersion + 1;
  Dial dial;
  dial.start(io.io(), server.port(), test_options(), h);
  auto [conn, ack] = dial.get();
  EXPECT_EQ(conn.status().code(), StatusCode::kUnimplemented) << conn.status().to_string();
  EXPECT_EQ(server.hello_count(), 0u);
}

TEST(ControlChannel, NoHelloWithinHandshakeTimeoutIsClosedAndCounted) {
  IoThread io;
  Server server;
  ChannelOptions o = test_options();
  o.handshake_timeout = 200ms;
  server.start(io.io(), o);
  RawSocket raw(server.port());
  ASSERT_TRUE(raw.connected());
  const auto start = std::chrono::steady_clock::now();
  bool eof = false;
  const auto answer = decode_all(raw.read_to_end(&eof));  // sends nothing, waits
  EXPECT_GE(std::chrono::steady_clock::now() - start, 150ms);
  EXPECT_TRUE(eof);
  ASSERT_EQ(answer.size(), 1u);
  const auto& error = std::get<Error>(answer[0]);
  EXPECT_EQ(error.code, StatusCode::kDeadlineExceeded);
  EXPECT_NE(error.message.find("no Hello"), std::string::npos) << error.message;
  EXPECT_EQ(server.listener->counters().refused_peers, 1u);
  EXPECT_EQ(server.recorder.opened_count(), 0u);
}

// ----------------------------------------------------------------- closing

TEST(ControlChannel, PeerCloseIsUnavailableExactlyOnceOnBothSides) {
  IoThread io;
  Pair p;
  p.start(io.io());
  // The client closes: it hears its own reason, the listener kUnavailable.
  p.client_conn->close(Status(StatusCode::kCancelled, "test: done"));
  ASSERT_TRUE(p.dial.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  ASSERT_TRUE(p.server.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  EXPECT_EQ(p.dial.recorder.closed()[0].code(), StatusCode::kCancelled);
  EXPECT_EQ(p.dial.recorder.closed()[0].message(), "test: done");
  EXPECT_EQ(p.server.recorder.closed()[0].code(), StatusCode::kUnavailable)
      << p.server.recorder.closed()[0].to_string();
  EXPECT_FALSE(p.client_conn->is_open());
  EXPECT_FALSE(p.server_conn->is_open());
  // Closing again, sending after close: nothing more happens.
  p.client_conn->close(Status(StatusCode::kInternal, "again"));
  p.server_conn->close(Status(StatusCode::kInternal, "again"));
  p.client_conn->send(heartbeat(1, 1));
  p.server_conn->send(heartbeat(1, 1));
  io.barrier();
  io.barrier();
  EXPECT_EQ(p.dial.recorder.closed().size(), 1u);
  EXPECT_EQ(p.server.recorder.closed().size(), 1u);
  EXPECT_EQ(p.dial.recorder.messages().size(), 0u);
  EXPECT_EQ(p.server.recorder.messages().size(), 0u);
}

TEST(ControlChannel, ListenerSideCloseIsUnavailableOnTheConnector) {
  IoThread io;
  Pair p;
  p.start(io.io());
  p.server_conn->close(Status(StatusCode::kFailedPrecondition, "node marked down"));
  ASSERT_TRUE(p.dial.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  ASSERT_TRUE(p.server.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  EXPECT_EQ(p.dial.recorder.closed()[0].code(), StatusCode::kUnavailable);
  EXPECT_EQ(p.server.recorder.closed()[0].code(), StatusCode::kFailedPrecondition);
  io.barrier();
  EXPECT_EQ(p.dial.recorder.closed().size(), 1u);
  EXPECT_EQ(p.server.recorder.closed().size(), 1u);
}

TEST(ControlChannel, AbruptPeerDisconnectIsUnavailable) {
  IoThread io;
  Server server;
  server.start(io.io());
  RawSocket raw(server.port());
  ASSERT_TRUE(raw.connected());
  Hello h = test_hello();
  h.cluster_token = test_options().cluster_token;
  raw.send(encode(h));
  ASSERT_TRUE(raw.read_message().ok());
  // Half a frame, then gone.
  std::vector<std::byte> frame = encode(heartbeat(1, 1));
  frame.resize(frame.size() / 2);
  raw.send(frame);
  raw.close();
  ASSERT_TRUE(server.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  EXPECT_EQ(server.recorder.closed()[0].code(), StatusCode::kUnavailable);
  EXPECT_EQ(server.recorder.messages().size(), 0u);
  io.barrier();
  EXPECT_EQ(server.recorder.closed().size(), 1u);
}

TEST(ControlChannel, CloseDeliversQueuedMessagesFirst) {
  IoThread io;
  Pair p;
  p.start(io.io());
  // Enough bytes that most are still queued when close() runs.
  constexpr uint64_t kCount = 40;
  std::vector<PrefillJob> jobs;
  for (uint64_t i = 0; i < kCount; ++i) jobs.push_back(job_of_frame_size(512 * 1024, i + 1));
  for (const auto& job : jobs) p.client_conn->send(job);
  p.client_conn->close(Status(StatusCode::kCancelled, "shutting down"));
  p.client_conn->send(heartbeat(1, 1));  // after close(): dropped
  ASSERT_TRUE(p.server.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  const auto got = p.server.recorder.messages();
  ASSERT_EQ(got.size(), kCount);
  for (uint64_t i = 0; i < kCount; ++i) EXPECT_TRUE(std::get<PrefillJob>(got[i]) == jobs[i]) << i;
  EXPECT_EQ(p.server.recorder.closed()[0].code(), StatusCode::kUnavailable);
  ASSERT_TRUE(p.dial.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  EXPECT_EQ(p.dial.recorder.closed()[0].code(), StatusCode::kCancelled);
}

// ----------------------------------------------------------------- connect

TEST(ControlChannel, ConnectToAClosedPortIsUnavailable) {
  IoThread io;
  uint16_t port = 0;
  {
    asio::ip::tcp::acceptor acceptor(io.io(), {asio::ip::make_address("127.0.0.1"), 0});
    port = acceptor.local_endpoint().port();
  }  // closed: nothing listens there now
  Dial dial;
  dial.start(io.io(), port);
  auto [conn, ack] = dial.get();
  EXPECT_EQ(conn.status().code(), StatusCode::kUnavailable) << conn.status().to_string();
  EXPECT_NE(conn.status().message().find("127.0.0.1:" + std::to_string(port)), std::string::npos);
}

TEST(ControlChannel, ConnectToASilentListenerIsDeadlineExceeded) {
  IoThread io;
  // Accepts (the kernel completes the TCP handshake) but never answers.
  asio::ip::tcp::acceptor acceptor(io.io(), {asio::ip::make_address("127.0.0.1"), 0});
  ChannelOptions o = test_options();
  o.connect_timeout = 300ms;
  Dial dial;
  const auto start = std::chrono::steady_clock::now();
  dial.start(io.io(), acceptor.local_endpoint().port(), o);
  auto [conn, ack] = dial.get();
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(conn.status().code(), StatusCode::kDeadlineExceeded) << conn.status().to_string();
  EXPECT_GE(elapsed, 300ms);
  EXPECT_LT(elapsed, 300ms + 3s);
}

TEST(ControlChannel, ConnectsByHostName) {
  IoThread io;
  Server server;
  server.start(io.io());
  Dial dial;
  dial.host = "localhost";  // may resolve to ::1 first: the next address is tried
  dial.start(io.io(), server.port());
  auto [conn, ack] = dial.get();
  ASSERT_TRUE(conn.ok()) << conn.status().to_string();
  EXPECT_EQ((*conn)->peer().control_address, "localhost:" + std::to_string(server.port()));
}

TEST(ControlChannel, ListenOnAPortInUseIsUnavailableNamingIt) {
  IoThread io;
  Server server;
  server.start(io.io());
  // Not through reuse_address: a listening socket holds the port.
  auto second = listen_control(io.io(), HostPort{"127.0.0.1", server.port()}, ListenerOptions{});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find("127.0.0.1:" + std::to_string(server.port())),
            std::string::npos);
}

TEST(ControlChannel, StoppedListenerRefusesNewConnections) {
  IoThread io;
  Server server;
  server.start(io.io());
  Dial first;
  first.start(io.io(), server.port());
  auto [conn, ack] = first.get();
  ASSERT_TRUE(conn.ok());
  server.listener->stop();
  io.barrier();
  Dial second;
  second.start(io.io(), server.port());
  EXPECT_EQ(second.get().first.status().code(), StatusCode::kUnavailable);
  // The live connection still works.
  (*conn)->send(heartbeat(9, 9));
  ASSERT_TRUE(server.recorder.wait([](const auto& r) { return r.message_count() == 1; }));
}

// ------------------------------------------------------------------ config

class TokenFile {
 public:
  explicit TokenFile(const std::string& content) {
    path_ = std::filesystem::temp_directory_path() /
            ("kvgate_token_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    std::ofstream(path_) << content;
  }
  ~TokenFile() { std::filesystem::remove(path_); }
  std::string path() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  std::filesystem::path path_;
};

TEST(ControlChannelConfig, ReadClusterToken) {
  PeerConfig c;
  c.token = "inline";
  EXPECT_EQ(*read_cluster_token(c), "inline");

  c.token.clear();
  TokenFile file("  from-file\t\r\nsecond line\n");
  c.token_file = file.path();
  auto t = read_cluster_token(c);
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  EXPECT_EQ(*t, "from-file");

  TokenFile empty("\n\nsecret on line 3\n");
  c.token_file = empty.path();
  t = read_cluster_token(c);
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("cluster.token_file"), std::string::npos);

  c.token_file = "/nonexistent/kvgate/token";
  t = read_cluster_token(c);
  EXPECT_EQ(t.status().code(), StatusCode::kNotFound);
  EXPECT_NE(t.status().message().find("cluster.token_file"), std::string::npos);
  EXPECT_NE(t.status().message().find("/nonexistent/kvgate/token"), std::string::npos);

  c.token_file.clear();
  t = read_cluster_token(c);
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("cluster.token"), std::string::npos);

  c.auth = AuthMode::kDisabled;
  EXPECT_EQ(*read_cluster_token(c), "");
}

TEST(ControlChannelConfig, ChannelOptionsFromCluster) {
  PeerConfig c;
  c.auth = AuthMode::kDisabled;
  c.connect_timeout = 1234ms;
  c.max_frame_bytes = 4 << 20;
  const ChannelOptions o = channel_options(c, "tok");
  EXPECT_EQ(o.cluster_token, "tok");
  EXPECT_FALSE(o.auth_required);
  EXPECT_EQ(o.max_frame_bytes, size_t{4} << 20);
  EXPECT_EQ(o.connect_timeout, 1234ms);
  EXPECT_EQ(o.handshake_timeout, 1234ms);
  c.auth = AuthMode::kRequired;
  EXPECT_TRUE(channel_options(c, "tok").auth_required);
}

}  // namespace
}  // namespace kvgate::control
