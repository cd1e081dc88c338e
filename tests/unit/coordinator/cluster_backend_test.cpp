// ClusterBackend end to end over real control connections on 127.0.0.1:
// fake decode and prefill nodes written here register, heartbeat and answer
// the coordinator's messages; a recording sink sees what a client would.
#include "coordinator/cluster_backend.h"

#include <gtest/gtest.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <atomic>
#include <condition_variable>
#include <future>
#include <functional>
#include <mutex>
#include <thread>

#include "tests/unit/coordinator/cluster_test_util.h"

namespace kvgate::coordinator {
namespace {

using namespace std::chrono_literals;
using control::NodeRole;
using testing::RecordingSink;
namespace asio = boost::asio;

constexpr const char* kToken = "test-cluster-token";

// Polls `pred` until it holds or `timeout` passes (a condition with a
// deadline; the backend offers no event to wait on for these).
bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 10s) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// A node that registers with the coordinator over the real control channel,
// heartbeats on its own io thread, records what it receives and sends what
// the test tells it to.
class FakeNode {
 public:
  FakeNode(NodeRole role, uint64_t id, uint64_t free_bytes = 0)
      : role_(role), id_(id), free_bytes_(free_bytes), work_(asio::make_work_guard(io_)),
        timer_(io_) {
    thread_ = std::thread([this] { io_.run(); });
  }
  ~FakeNode() {
    close();
    asio::post(io_, [this] { timer_.cancel(); });
    work_.reset();
    io_.stop();
    thread_.join();
  }

  Status connect(const HostPort& coordinator, const std::string& token = kToken,
                 const std::string& model = "m") {
    control::Hello hello;
    hello.role = role_;
    hello.node_id = NodeId(id_);
    hello.node_name = std::string(role_ == NodeRole::kDecode ? "decode-" : "prefill-") +
                      std::to_string(id_);
    hello.model_name = model;
    hello.control_address = "127.0.0.1:" + std::to_string(7000 + id_);
    hello.transport_name = "loopback";
    hello.transport_address = {std::byte(id_)};
    control::ChannelOptions options;
    options.cluster_token = token;
    control::ConnectionHandlers handlers;
    handlers.on_message = [this](const control::ConnectionPtr&, control::Message m) {
      std::lock_guard<std::mutex> lock(mu_);
      received_.push_back(std::move(m));
      cv_.notify_all();
    };
    handlers.on_closed = [this](const control::ConnectionPtr&, const Status&) {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      cv_.notify_all();
    };
    // Shared: the callback may outlive this call if connecting hangs.
    auto result = std::make_shared<std::promise<Status>>();
    auto future = result->get_future();
    control::connect_control(
        io_, coordinator, hello, options, handlers,
        [this, result](Result<control::ConnectionPtr> conn, const control::HelloAck& ack) {
          if (!conn.ok()) {
            result->set_value(conn.status());
            return;
          }
          {
            std::lock_guard<std::mutex> lock(mu_);
            conn_ = *conn;
            interval_ = ack.heartbeat_interval;
          }
          heartbeat();  // at once, then every interval
          result->set_value(Status());
        });
    if (future.wait_for(10s) != std::future_status::ready) {
      return Status(StatusCode::kDeadlineExceeded, "connect did not finish");
    }
    return future.get();
  }

  void send(const control::Message& m) {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn_) conn_->send(m);
  }
  void set_heartbeats(bool on) { heartbeats_on_ = on; }
  void close() {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn_) conn_->close(Status(StatusCode::kCancelled, "test closes"));
  }

  // The n-th (0-based) message of type T, waiting for it.
  template <typename T>
  std::optional<T> wait(size_t n = 0, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mu_);
    std::optional<T> out;
    cv_.wait_for(lock, timeout, [&] {
      size_t seen = 0;
      for (const auto& m : received_) {
        if (const T* t = std::get_if<T>(&m)) {
          if (seen++ == n) {
            out = *t;
            return true;
          }
        }
      }
      return false;
    });
    return out;
  }
  template <typename T>
  size_t count() {
    std::lock_guard<std::mutex> lock(mu_);
    size_t n = 0;
    for (const auto& m : received_) n += std::holds_alternative<T>(m) ? 1 : 0;
    return n;
  }
  bool wait_closed(std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return closed_; });
  }
  NodeId id() const { return NodeId(id_); }

 private:
  void heartbeat() {
    control::Heartbeat hb;
    hb.node_id = NodeId(id_);
    hb.sequence = ++sequence_;
    hb.pool_free_bytes = free_bytes_;
    std::chrono::milliseconds interval;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!conn_ || closed_) return;
      if (heartbeats_on_) conn_->send(hb);
      interval = interval_;
    }
    timer_.expires_after(interval.count() > 0 ? interval : 50ms);
    timer_.async_wait([this](const boost::system::error_code& ec) {
      if (!ec) heartbeat();
    });
  }

  const NodeRole role_;
  const uint64_t id_;
  const uint64_t free_bytes_;
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  asio::steady_timer timer_;  // io thread only
  uint64_t sequence_ = 0;     // io thread only
  std::atomic<bool> heartbeats_on_{true};
  std::thread thread_;

  std::mutex mu_;
  std::condition_variable cv_;
  control::ConnectionPtr conn_;
  std::chrono::milliseconds interval_{0};
  std::vector<control::Message> received_;
  bool closed_ = false;
};

class ClusterBackendTest : public ::testing::Test {
 protected:
  void start(int64_t max_attempts = 3) {
    ClusterBackendOptions o;
    o.scheduler.model_name = "m";
    o.scheduler.context_tokens = 4096;
    o.scheduler.heartbeat_interval = 30ms;
    o.scheduler.node_deadline = 400ms;
    o.scheduler.placement_wait = 5000ms;
    o.scheduler.request_timeout = 30000ms;
    o.scheduler.lease_ttl = 5000ms;
    o.scheduler.max_attempts = max_attempts;
    o.scheduler.kv_policy.name = "h2o";
    o.control_listen = HostPort{"127.0.0.1", 0};
    o.channel.cluster_token = kToken;
    o.channel.close_timeout = 500ms;
    o.tick_interval = 10ms;
    auto b = ClusterBackend::start(o, testing::small_predictor(), nullptr,
                                   [](const std::string&) {});
    ASSERT_TRUE(b.ok()) << b.status().to_string();
    backend_ = std::move(*b);
  }
  // Waits until every node is live and has sent at least one heartbeat.
  bool all_heartbeating(size_t n) {
    return wait_until([&] {
      auto nodes = backend_->nodes();
      if (nodes.size() < n) return false;
      for (const auto& s : nodes) {
        if (s.state != NodeState::kLive || s.heartbeats == 0) return false;
      }
      return true;
    });
  }
  GenerationRequest request(uint64_t id) {
    GenerationRequest r;
    r.id = RequestId(id);
    r.model = "m";
    r.prompt_tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    r.max_tokens = 8;
    return r;
  }
  control::ReserveGrant grant(const control::Reserve& r, uint64_t lease) {
    return control::ReserveGrant{r.request_id, LeaseId(lease), r.size_bytes, 5000ms,
                                 {std::byte{1}, std::byte{2}, std::byte{3}}};
  }

  std::unique_ptr<ClusterBackend> backend_;
};

TEST_F(ClusterBackendTest, RequestFlowsReserveGrantJobCommitTokens) {
  start();
  EXPECT_FALSE(backend_->health().ready);
  FakeNode d(NodeRole::kDecode, 11, 64 << 20);
  FakeNode p(NodeRole::kPrefill, 22);
  ASSERT_TRUE(d.connect(backend_->control_address()).ok());
  ASSERT_TRUE(p.connect(backend_->control_address()).ok());
  ASSERT_TRUE(all_heartbeating(2));
  EXPECT_TRUE(backend_->health().ready);
  ASSERT_EQ(backend_->models().size(), 1u);
  EXPECT_EQ(backend_->models()[0].name, "m");
  EXPECT_EQ(backend_->models()[0].context_tokens, 4096);

  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(backend_->submit(request(100), sink).ok());
  auto reserve = d.wait<control::Reserve>();
  ASSERT_TRUE(reserve);
  EXPECT_EQ(reserve->request_id, RequestId(100));
  EXPECT_GT(reserve->size_bytes, 0u);
  // decode.lease_ttl plus the time the prefill may take (cluster_scheduler.h).
  EXPECT_GT(reserve->lease_ttl, 5000ms);
  d.send(grant(*reserve, 7));
  auto job = p.wait<control::PrefillJob>();
  ASSERT_TRUE(job);
  EXPECT_EQ(job->request_id, RequestId(100));
  EXPECT_EQ(job->prompt_token_ids, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(job->lease_id, LeaseId(7));
  EXPECT_EQ(job->decode_node, NodeId(11));
  EXPECT_EQ(job->decode_control_address, "127.0.0.1:7011");
  EXPECT_EQ(job->decode_transport_address, control::Bytes{std::byte(11)});
  EXPECT_EQ(job->pool_descriptor, (control::Bytes{std::byte{1}, std::byte{2}, std::byte{3}}));
  EXPECT_EQ(job->kv_policy.name, "h2o");
  EXPECT_EQ(job->generation.max_new_tokens, 8u);
  ASSERT_TRUE(sink->wait_started());

  d.send(control::Commit{RequestId(100), LeaseId(7), 2048, 0.6});
  d.send(control::TokenChunk{RequestId(100), 0, {40, 41}, "Hello", control::FinishReason::kNone, {}});
  d.send(control::TokenChunk{RequestId(100), 2, {42}, ", world", control::FinishReason::kLength,
                             {10, 3}});
  ASSERT_TRUE(sink->wait_terminal());
  ASSERT_TRUE(sink->done()) << (sink->error() ? sink->error()->to_string() : "");
  EXPECT_EQ(sink->text(), "Hello, world");
  EXPECT_EQ(sink->tokens(), 3);
  EXPECT_EQ(sink->done()->finish_reason, "length");
  EXPECT_EQ(sink->done()->usage.prompt_tokens, 10);
  EXPECT_EQ(sink->done()->usage.completion_tokens, 3);
  // The Commit's keep-rate reached the predictor: (0.3 prior + 0.6) / 2.
  EXPECT_NEAR(backend_->keep_rate(10), 0.45, 1e-12);
}

TEST_F(ClusterBackendTest, DenyOnTheFirstDecodeNodePlacesOnTheSecond) {
  start();
  FakeNode d1(NodeRole::kDecode, 1, 128 << 20);
  FakeNode d2(NodeRole::kDecode, 2, 64 << 20);
  FakeNode p(NodeRole::kPrefill, 3);
  for (FakeNode* n : {&d1, &d2, &p}) ASSERT_TRUE(n->connect(backend_->control_address()).ok());
  ASSERT_TRUE(all_heartbeating(3));
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(backend_->submit(request(5), sink).ok());
  auto r1 = d1.wait<control::Reserve>();
  ASSERT_TRUE(r1);
  d1.send(control::ReserveDeny{RequestId(5), StatusCode::kResourceExhausted, "full", 0});
  auto r2 = d2.wait<control::Reserve>();
  ASSERT_TRUE(r2);
  EXPECT_EQ(r2->request_id, RequestId(5));
  d2.send(grant(*r2, 9));
  auto job = p.wait<control::PrefillJob>();
  ASSERT_TRUE(job);
  EXPECT_EQ(job->decode_node, NodeId(2));
  EXPECT_EQ(job->lease_id, LeaseId(9));
}

TEST_F(ClusterBackendTest, SilentNodeIsMarkedDownAndItsRequestReplaced) {
  start();
  FakeNode d1(NodeRole::kDecode, 1, 128 << 20);
  FakeNode d2(NodeRole::kDecode, 2, 64 << 20);
  FakeNode p(NodeRole::kPrefill, 3);
  for (FakeNode* n : {&d1, &d2, &p}) ASSERT_TRUE(n->connect(backend_->control_address()).ok());
  ASSERT_TRUE(all_heartbeating(3));
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(backend_->submit(request(6), sink).ok());
  ASSERT_TRUE(d1.wait<control::Reserve>());
  d1.set_heartbeats(false);  // hangs: no answer, no heartbeat
  auto r2 = d2.wait<control::Reserve>();
  ASSERT_TRUE(r2) << "not re-placed after node_deadline";
  EXPECT_TRUE(d1.wait_closed());  // the coordinator dropped its connection
  bool d1_down = false;
  for (const auto& s : backend_->nodes()) {
    if (s.id == NodeId(1)) d1_down = s.state == NodeState::kDown;
  }
  EXPECT_TRUE(d1_down);
  d2.send(grant(*r2, 1));
  ASSERT_TRUE(p.wait<control::PrefillJob>());
  EXPECT_TRUE(sink->wait_started());
  EXPECT_EQ(sink->terminal(), 0);
}

TEST_F(ClusterBackendTest, PrefillErrorReplacesUpToMaxAttemptsThenFails) {
  start(/*max_attempts=*/2);
  FakeNode d(NodeRole::kDecode, 1, 64 << 20);
  FakeNode p(NodeRole::kPrefill, 2);
  for (FakeNode* n : {&d, &p}) ASSERT_TRUE(n->connect(backend_->control_address()).ok());
  ASSERT_TRUE(all_heartbeating(2));
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(backend_->submit(request(7), sink).ok());
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto r = d.wait<control::Reserve>(attempt);
    ASSERT_TRUE(r) << "attempt " << attempt;
    d.send(grant(*r, 10 + attempt));
    auto job = p.wait<control::PrefillJob>(attempt);
    ASSERT_TRUE(job) << "attempt " << attempt;
    EXPECT_EQ(job->lease_id, LeaseId(10 + attempt));
    p.send(control::Error{RequestId(7), StatusCode::kDeadlineExceeded, "transfer timed out"});
    ASSERT_TRUE(d.wait<control::Cancel>(attempt)) << "attempt " << attempt;
  }
  ASSERT_TRUE(sink->wait_terminal());
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(sink->error()->message().find("transfer timed out"), std::string::npos);
  EXPECT_EQ(d.count<control::Reserve>(), 2u);
}

TEST_F(ClusterBackendTest, CancelSendsCancelToBothNodes) {
  start();
  FakeNode d(NodeRole::kDecode, 1, 64 << 20);
  FakeNode p(NodeRole::kPrefill, 2);
  for (FakeNode* n : {&d, &p}) ASSERT_TRUE(n->connect(backend_->control_address()).ok());
  ASSERT_TRUE(all_heartbeating(2));
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(backend_->submit(request(8), sink).ok());
  auto r = d.wait<control::Reserve>();
  ASSERT_TRUE(r);
  d.send(grant(*r, 3));
  ASSERT_TRUE(p.wait<control::PrefillJob>());
  backend_->cancel(RequestId(8));
  ASSERT_TRUE(sink->wait_terminal());
  ASSERT_TRUE(sink->error());
  EXPECT_EQ(sink->error()->code(), StatusCode::kCancelled);
  auto cd = d.wait<control::Cancel>();
  auto cp = p.wait<control::Cancel>();
  ASSERT_TRUE(cd);
  ASSERT_TRUE(cp);
  EXPECT_EQ(cd->request_id, RequestId(8));
  EXPECT_EQ(cp->request_id, RequestId(8));
}

TEST_F(ClusterBackendTest, WrongClusterTokenOrModelIsRefused) {
  start();
  FakeNode bad(NodeRole::kDecode, 1, 64 << 20);
  Status s = bad.connect(backend_->control_address(), "wrong-token");
  EXPECT_EQ(s.code(), StatusCode::kPermissionDenied) << s.to_string();
  FakeNode other(NodeRole::kDecode, 2, 64 << 20);
  s = other.connect(backend_->control_address(), kToken, "another-model");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  EXPECT_TRUE(backend_->nodes().empty());
  EXPECT_EQ(backend_->listener_counters().refused_peers, 1u);
  EXPECT_FALSE(backend_->health().ready);
}

TEST_F(ClusterBackendTest, HealthFlipsAsNodesRegisterAndLeave) {
  start();
  EXPECT_FALSE(backend_->health().ready);
  auto p = std::make_unique<FakeNode>(NodeRole::kPrefill, 2);
  FakeNode d(NodeRole::kDecode, 1, 64 << 20);
  ASSERT_TRUE(d.connect(backend_->control_address()).ok());
  ASSERT_TRUE(wait_until([&] { return backend_->nodes().size() == 1; }));
  EXPECT_FALSE(backend_->health().ready);
  EXPECT_NE(backend_->health().reason.find("prefill"), std::string::npos);
  ASSERT_TRUE(p->connect(backend_->control_address()).ok());
  ASSERT_TRUE(wait_until([&] { return backend_->health().ready; }));
  p->close();
  ASSERT_TRUE(wait_until([&] { return !backend_->health().ready; }));
  EXPECT_NE(backend_->health().reason.find("no live prefill node"), std::string::npos);
  // The same node id may register again once it is down (reconnect).
  p = std::make_unique<FakeNode>(NodeRole::kPrefill, 2);
  ASSERT_TRUE(p->connect(backend_->control_address()).ok());
  ASSERT_TRUE(wait_until([&] { return backend_->health().ready; }));
}

}  // namespace
}  // namespace kvgate::coordinator
