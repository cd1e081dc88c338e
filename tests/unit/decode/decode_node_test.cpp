// The decode node over real TCP control connections on 127.0.0.1 (port 0):
// a fake coordinator listens and takes the node's registration, heartbeats,
// grants and tokens; a fake prefill node connects to decode.listen and sends
// the manifest; the KV goes through the loopback transport. Also: metrics
// over HTTP, re-registration after the coordinator drops the connection,
// and the drain on stop().
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <thread>

#include "decode/decode_node.h"
#include "engine/generate.h"
#include "tests/unit/decode/decode_test_util.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::decode::testing {
namespace {

namespace asio = boost::asio;

// GET http://127.0.0.1:port/metrics, the whole answer ("" on failure).
std::string http_get_metrics(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (::write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  return out;
}

// A coordinator's control listener that records what nodes send.
class FakeCoordinator {
 public:
  FakeCoordinator() : work_(io_.get_executor()) {
    control::ListenerOptions o;
    o.channel.cluster_token = "secret";
    o.accept_hello = [this](const control::Hello& h) -> Result<control::HelloAck> {
      {
        std::lock_guard<std::mutex> lock(mu_);
        hellos_.push_back(h);
      }
      control::HelloAck ack;
      ack.node_id = NodeId(99);
      ack.heartbeat_interval = std::chrono::milliseconds(30);
      return ack;
    };
    o.on_open = [this](const control::ConnectionPtr& c) {
      std::lock_guard<std::mutex> lock(mu_);
      conn_ = c;
      cv_.notify_all();
    };
    o.handlers.on_message = [this](const control::ConnectionPtr&, control::Message m) {
      std::lock_guard<std::mutex> lock(mu_);
      messages_.push_back(std::move(m));
      cv_.notify_all();
    };
    o.handlers.on_closed = [this](const control::ConnectionPtr& c, const Status&) {
      std::lock_guard<std::mutex> lock(mu_);
      if (conn_ == c) conn_.reset();
      ++closed_;
      cv_.notify_all();
    };
    auto l = control::listen_control(io_, HostPort{"127.0.0.1", 0}, std::move(o));
    EXPECT_TRUE(l.ok()) << l.status().to_string();
    if (l.ok()) listener_ = *l;
    thread_ = std::thread([this] { io_.run(); });
  }
  ~FakeCoordinator() {
    if (listener_) listener_->stop();
    control::ConnectionPtr c;
    {
      std::lock_guard<std::mutex> lock(mu_);
      c = conn_;
    }
    if (c) c->close(Status(StatusCode::kUnavailable, "test over"));
    work_.reset();
    io_.stop();
    thread_.join();
  }
  HostPort address() const { return listener_->local_address(); }

  bool wait(const std::function<bool()>& done, std::chrono::milliseconds limit = 60000ms) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, limit, done);
  }
  // Under mu_ (inside wait predicates) or after.
  template <typename T>
  std::vector<T> all_locked(RequestId id = RequestId()) const {
    std::vector<T> out;
    for (const auto& m : messages_) {
      if (const T* t = std::get_if<T>(&m)) {
        if constexpr (requires { t->request_id; }) {
          if (id.valid() && t->request_id != id) continue;
        }
        out.push_back(*t);
      }
    }
    return out;
  }
  template <typename T>
  std::vector<T> all(RequestId id = RequestId()) const {
    std::lock_guard<std::mutex> lock(mu_);
    return all_locked<T>(id);
  }
  void send(const control::Message& m) {
    std::lock_guard<std::mutex> lock(mu_);
    ASSERT_TRUE(conn_);
    conn_->send(m);
  }
  void drop_connection() {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn_) conn_->close(Status(StatusCode::kUnavailable, "test drops the node"));
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<control::Hello> hellos_;
  Messages messages_;
  control::ConnectionPtr conn_;
  int closed_ = 0;

 private:
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::shared_ptr<control::Listener> listener_;
  std::thread thread_;
};

TEST(DecodeNode, RegistersStreamsOverTcpReconnectsAndDrains) {
  const engine::testing::TestModel* L = engine::testing::test_model();
  if (!L->model) GTEST_SKIP() << "model not found at " KVGATE_TEST_MODEL;
  FakeCoordinator coord;

  NodeConfig c;
  c.model.path = KVGATE_TEST_MODEL;
  c.model.served_name = "smol";
  c.cluster.coordinators = {coord.address()};
  c.cluster.token = "secret";
  c.cluster.node_name = "decode-a";
  c.decode.listen = HostPort{"127.0.0.1", 0};
  c.decode.pool_bytes = 16 << 20;
  c.decode.page_tokens = 16;
  c.kv.gate_file = "";
  c.transport.kind = TransportKind::kLoopback;
  c.metrics.listen = HostPort{"127.0.0.1", 0};
  auto started = DecodeNode::start(c);
  ASSERT_TRUE(started.ok()) << started.status().to_string();
  std::unique_ptr<DecodeNode> node = std::move(*started);

  // Registration: the Hello says who and where; heartbeats follow.
  ASSERT_TRUE(coord.wait([&] { return coord.conn_ != nullptr; }));
  control::Hello hello;
  {
    std::lock_guard<std::mutex> lock(coord.mu_);
    hello = coord.hellos_.at(0);
  }
  EXPECT_EQ(hello.role, control::NodeRole::kDecode);
  EXPECT_EQ(hello.node_id, node->node_id());
  EXPECT_EQ(hello.node_name, "decode-a");
  EXPECT_EQ(hello.model_name, "smol");
  EXPECT_EQ(hello.transport_name, "loopback");
  EXPECT_EQ(hello.control_address, node->control_address().to_string());
  EXPECT_NE(node->control_address().port, 0);
  ASSERT_TRUE(coord.wait([&] { return coord.all_locked<control::Heartbeat>().size() >= 2; }));
  const auto beats = coord.all<control::Heartbeat>();
  EXPECT_EQ(beats[1].sequence, beats[0].sequence + 1);
  EXPECT_EQ(beats[0].node_id, node->node_id());
  EXPECT_EQ(beats[0].pool_free_bytes, static_cast<uint64_t>(node->stats().leases.capacity_bytes));
  EXPECT_GT(beats[0].pool_free_bytes, 0u);

  // A request end to end over TCP: Reserve -> grant; KV through the
  // transport; the manifest from a prefill connection; tokens back.
  engine::CpuForward forward(*L->model, engine::ForwardOptions{});
  engine::KvPolicyConfig dense;
  const auto prompt = L->tokenizer->encode("The capital of France is", false, false);
  constexpr uint32_t kMaxNew = 5;
  auto p = prefill(forward, dense, prompt, 16 * 64 * 2);
  ASSERT_NE(p, nullptr);
  const RequestId id(5);
  auto bytes = engine::compressed_pool_bytes(p->plan->layout, p->prompt_tokens + kMaxNew, 2048);
  ASSERT_TRUE(bytes.ok());
  coord.send(control::Reserve{id, static_cast<uint64_t>(*bytes), std::chrono::milliseconds(30000)});
  ASSERT_TRUE(coord.wait([&] { return !coord.all_locked<control::ReserveGrant>(id).empty(); }));
  const auto grant = coord.all<control::ReserveGrant>(id).at(0);

  transport::TransportOptions so;
  so.cluster_token = "secret";
  TransportConfig loopback;
  loopback.kind = TransportKind::kLoopback;
  auto sender = transport::create_transport(loopback, so);
  ASSERT_TRUE(sender.ok());
  auto peer = (*sender)->connect(node->engine().transport_address());
  ASSERT_TRUE(peer.ok());
  const Status shipped = ship(**sender, *peer, grant.pool_descriptor, *p);
  ASSERT_TRUE(shipped.ok()) << shipped.to_string();

  // The prefill node's control connection to decode.listen.
  asio::io_context pio;
  auto pwork = asio::make_work_guard(pio);
  std::thread pthread([&] { pio.run(); });
  auto prefill_conn = std::make_shared<FakeConnection>();  // records its answers
  std::mutex pmu;
  std::condition_variable pcv;
  control::ConnectionPtr to_decode;
  control::Hello phello;
  phello.role = control::NodeRole::kPrefill;
  phello.node_id = NodeId(7);
  phello.node_name = "prefill-test";
  control::ChannelOptions pch;
  pch.cluster_token = "secret";
  control::ConnectionHandlers ph;
  ph.on_message = [&](const control::ConnectionPtr&, control::Message m) { prefill_conn->send(m); };
  ph.on_closed = [](const control::ConnectionPtr&, const Status&) {};
  control::connect_control(pio, node->control_address(), phello, pch, ph,
                           [&](Result<control::ConnectionPtr> r, const control::HelloAck&) {
                             std::lock_guard<std::mutex> lock(pmu);
                             EXPECT_TRUE(r.ok()) << r.status().to_string();
                             if (r.ok()) to_decode = *r;
                             pcv.notify_all();
                           });
  {
    std::unique_lock<std::mutex> lock(pmu);
    ASSERT_TRUE(pcv.wait_for(lock, 10s, [&] { return to_decode != nullptr; }));
  }
  to_decode->send(manifest_for(*p, id, grant.lease_id, kMaxNew));
  const auto result = prefill_conn->wait_for<control::TransferResult>(id);
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(result->code, StatusCode::kOk) << result->message;
  ASSERT_TRUE(coord.wait([&] {
    for (const auto& ch : coord.all_locked<control::TokenChunk>(id)) {
      if (ch.finish_reason != control::FinishReason::kNone) return true;
    }
    return false;
  }));
  std::vector<int32_t> got;
  for (const auto& ch : coord.all<control::TokenChunk>(id)) {
    got.insert(got.end(), ch.token_ids.begin(), ch.token_ids.end());
  }
  engine::GenerateOptions go;
  go.max_tokens = kMaxNew;
  auto ref = engine::generate(forward, *L->tokenizer, prompt, go);
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(got, ref->tokens);
  EXPECT_EQ(coord.all<control::Commit>(id).size(), 1u);

  // Metrics over HTTP.
  ASSERT_NE(node->metrics_port(), 0);
  const std::string metrics = http_get_metrics(node->metrics_port());
  EXPECT_NE(metrics.find("kvgate_decode_pool_free_bytes"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("kvgate_decode_generated_tokens_total " + std::to_string(got.size())),
            std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("kvgate_decode_transfers_total{result=\"ok\"} 1"), std::string::npos);

  // The coordinator drops the node: it registers again, same node id.
  coord.drop_connection();
  ASSERT_TRUE(coord.wait([&] { return coord.hellos_.size() >= 2 && coord.conn_ != nullptr; }));
  {
    std::lock_guard<std::mutex> lock(coord.mu_);
    EXPECT_EQ(coord.hellos_[1].node_id, node->node_id());
  }
  ASSERT_TRUE(coord.wait([&] { return node->registered_coordinators() == 1; }, 10000ms));

  // Drain: a request holding a lease gets a clear Error when the node stops.
  const RequestId pending(6);
  coord.send(control::Reserve{pending, 4096, std::chrono::milliseconds(30000)});
  ASSERT_TRUE(coord.wait([&] { return !coord.all_locked<control::ReserveGrant>(pending).empty(); }));
  node->stop();
  ASSERT_TRUE(coord.wait([&] { return !coord.all_locked<control::Error>(pending).empty(); }));
  const auto err = coord.all<control::Error>(pending).at(0);
  EXPECT_EQ(err.code, StatusCode::kUnavailable);
  EXPECT_NE(err.message.find("shutting down"), std::string::npos);
  ASSERT_TRUE(coord.wait([&] { return coord.conn_ == nullptr; }));
  node.reset();

  to_decode->close(Status(StatusCode::kCancelled, "test over"));
  pwork.reset();
  pio.stop();
  pthread.join();
  sender->reset();
}

}  // namespace
}  // namespace kvgate::decode::testing
