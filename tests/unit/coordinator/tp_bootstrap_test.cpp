// The tensor-parallel bootstrap end to end over real control connections on
// 127.0.0.1: a ClusterBackend (the coordinator's dispatch) and ranks that
// register as nodes, each on its own io thread, joining one group with
// engine/tp/tp_bootstrap.h from their own threads.
#include <gtest/gtest.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <future>
#include <mutex>
#include <random>
#include <thread>

#include "coordinator/cluster_backend.h"
#include "engine/tp/tp_bootstrap.h"
#include "tests/unit/coordinator/cluster_test_util.h"

namespace kvgate::coordinator {
namespace {

using namespace std::chrono_literals;
namespace asio = boost::asio;
using control::Bytes;
using control::TpReady;
using engine::tp::TpBootstrap;

constexpr const char* kToken = "tp-test-token";

// One rank: a node registered with the coordinator whose connection feeds a
// TpBootstrap.
class Rank {
 public:
  explicit Rank(uint64_t id) : id_(id), work_(asio::make_work_guard(io_)) {
    thread_ = std::thread([this] { io_.run(); });
  }
  ~Rank() {
    close();
    work_.reset();
    io_.stop();
    thread_.join();
  }

  Status connect(const HostPort& coordinator) {
    control::Hello hello;
    hello.role = control::NodeRole::kDecode;
    hello.node_id = NodeId(id_);
    hello.node_name = "gpu-" + std::to_string(id_);
    hello.model_name = "m";
    hello.control_address = "127.0.0.1:1";
    hello.transport_name = "loopback";
    control::ChannelOptions options;
    options.cluster_token = kToken;
    options.close_timeout = 500ms;
    control::ConnectionHandlers handlers;
    handlers.on_message = [this](const control::ConnectionPtr&, control::Message m) {
      bootstrap_.on_message(m);
    };
    handlers.on_closed = [this](const control::ConnectionPtr&, const Status& s) {
      bootstrap_.on_closed(s);
    };
    auto result = std::make_shared<std::promise<Status>>();
    auto future = result->get_future();
    control::connect_control(io_, coordinator, hello, options, handlers,
                             [this, result](Result<control::ConnectionPtr> conn,
                                            const control::HelloAck&) {
                               if (conn.ok()) {
                                 std::lock_guard<std::mutex> lock(mu_);
                                 conn_ = *conn;
                               }
                               result->set_value(conn.status());
                             });
    if (future.wait_for(10s) != std::future_status::ready) {
      return Status(StatusCode::kDeadlineExceeded, "connect did not finish");
    }
    return future.get();
  }

  Result<TpReady> join(const std::string& group, uint32_t rank, uint32_t world,
                       std::optional<Bytes> id, std::chrono::milliseconds timeout = 10s) {
    control::ConnectionPtr conn;
    {
      std::lock_guard<std::mutex> lock(mu_);
      conn = conn_;
    }
    if (!conn) return unavailable("not connected");
    return engine::tp::join_tp_group(bootstrap_, *conn, group, rank, world, id,
                                     std::chrono::steady_clock::now() + timeout);
  }

  // Returns once the coordinator has processed this rank's pending join of
  // `group`: the join is queued (pending), then a one-rank probe group is
  // joined on the same connection; messages of a connection are handled in
  // order, so its TpReady comes after the coordinator saw the first join.
  ::testing::AssertionResult synced(const std::string& group) {
    const auto end = std::chrono::steady_clock::now() + 10s;
    while (!bootstrap_.pending(group)) {
      if (std::chrono::steady_clock::now() > end) {
        return ::testing::AssertionFailure() << "no pending join of " << group;
      }
      std::this_thread::yield();
    }
    auto probe = join("probe-" + std::to_string(id_) + "-" + std::to_string(probes_++), 0, 1,
                      Bytes(control::kTpUniqueIdBytes));
    if (!probe.ok()) return ::testing::AssertionFailure() << probe.status().to_string();
    return ::testing::AssertionSuccess();
  }

  void close() {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn_) conn_->close(Status(StatusCode::kCancelled, "rank leaves"));
    conn_.reset();
  }

  uint64_t id() const { return id_; }

 private:
  const uint64_t id_;
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::thread thread_;
  TpBootstrap bootstrap_;
  std::mutex mu_;
  control::ConnectionPtr conn_;
  int probes_ = 0;
};

class TpBootstrapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ClusterBackendOptions o;
    o.scheduler.model_name = "m";
    o.scheduler.context_tokens = 4096;
    o.scheduler.heartbeat_interval = 0ms;  // the ranks send none
    o.scheduler.node_deadline = 60000ms;
    o.scheduler.tp_join_timeout = 30000ms;
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

  // Waits (with a deadline) until the coordinator lists `n` nodes.
  bool registered(size_t n) {
    const auto end = std::chrono::steady_clock::now() + 10s;
    while (backend_->nodes().size() < n) {
      if (std::chrono::steady_clock::now() > end) return false;
      std::this_thread::sleep_for(1ms);
    }
    return true;
  }

  std::unique_ptr<ClusterBackend> backend_;
};

Bytes random_id() {
  std::random_device rd;
  std::mt19937_64 rng(rd());
  Bytes id(control::kTpUniqueIdBytes);
  for (auto& b : id) b = std::byte(static_cast<uint8_t>(rng()));
  return id;
}

TEST_F(TpBootstrapTest, ThreeRanksGetTheSameIdAndMembers) {
  // Node ids in another order than the ranks.
  std::vector<std::unique_ptr<Rank>> ranks;
  for (uint64_t id : {30, 10, 20}) ranks.push_back(std::make_unique<Rank>(id));
  for (auto& r : ranks) ASSERT_TRUE(r->connect(backend_->control_address()).ok());
  ASSERT_TRUE(registered(3));

  const Bytes id = random_id();
  std::vector<std::future<Result<TpReady>>> results;
  // Rank 2 first, rank 0 last: the group completes on rank 0's join.
  for (uint32_t rank : {2u, 1u, 0u}) {
    results.push_back(std::async(std::launch::async, [&, rank] {
      return ranks[rank]->join("llama/tp-a", rank, 3, rank == 0 ? std::optional(id) : std::nullopt);
    }));
  }
  std::vector<TpReady> got;
  for (auto& f : results) {
    auto r = f.get();
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    got.push_back(*r);
  }
  for (const TpReady& ready : got) {
    EXPECT_EQ(ready.group, "llama/tp-a");
    EXPECT_EQ(ready.world, 3u);
    EXPECT_EQ(ready.unique_id, id);
    ASSERT_EQ(ready.members.size(), 3u);
    for (uint32_t r = 0; r < 3; ++r) {
      EXPECT_EQ(ready.members[r].node_id, NodeId(ranks[r]->id()));
      EXPECT_EQ(ready.members[r].node_name, "gpu-" + std::to_string(ranks[r]->id()));
    }
    EXPECT_EQ(ready, got.front());
  }
}

TEST_F(TpBootstrapTest, ARankLeavingBeforeCompletionFailsTheOthersNamingTheGroup) {
  std::vector<std::unique_ptr<Rank>> ranks;
  for (uint64_t id : {1, 2, 3}) ranks.push_back(std::make_unique<Rank>(id));
  for (auto& r : ranks) ASSERT_TRUE(r->connect(backend_->control_address()).ok());
  ASSERT_TRUE(registered(3));

  auto r0 = std::async(std::launch::async,
                       [&] { return ranks[0]->join("grp-b", 0, 3, random_id()); });
  auto r2 = std::async(std::launch::async,
                       [&] { return ranks[2]->join("grp-b", 2, 3, std::nullopt); });
  // Both joins are at the coordinator; rank 1 has not joined. Rank 2 leaves.
  ASSERT_TRUE(ranks[0]->synced("grp-b"));
  ASSERT_TRUE(ranks[2]->synced("grp-b"));
  ranks[2]->close();
  auto got2 = r2.get();
  EXPECT_FALSE(got2.ok());  // its own connection closed

  auto got0 = r0.get();
  ASSERT_FALSE(got0.ok());
  EXPECT_EQ(got0.status().code(), StatusCode::kUnavailable) << got0.status().to_string();
  EXPECT_EQ(got0.status().message(),
            "tp group 'grp-b': rank 2 (node 'gpu-3' (3)) left before the group completed; "
            "join again");

  // The group is gone; the two left start it again with a world of 2.
  const Bytes id = random_id();
  auto a = std::async(std::launch::async, [&] { return ranks[0]->join("grp-b", 0, 2, id); });
  auto b = ranks[1]->join("grp-b", 1, 2, std::nullopt);
  ASSERT_TRUE(b.ok()) << b.status().to_string();
  auto a_got = a.get();
  ASSERT_TRUE(a_got.ok()) << a_got.status().to_string();
  EXPECT_EQ(a_got->unique_id, id);
  EXPECT_EQ(b->unique_id, id);
  EXPECT_EQ(b->members, a_got->members);
}

TEST_F(TpBootstrapTest, ARefusedJoinComesBackAsAnErrorAndTheConnectionStays) {
  Rank rank(5);
  ASSERT_TRUE(rank.connect(backend_->control_address()).ok());
  ASSERT_TRUE(registered(1));
  // Checked before sending: nothing reaches the coordinator.
  auto bad = rank.join("g", 3, 3, std::nullopt);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "control: TpJoin.rank: 3 >= world 3");
  // A world that differs from the group's: the coordinator refuses it.
  Rank other(6);
  ASSERT_TRUE(other.connect(backend_->control_address()).ok());
  ASSERT_TRUE(registered(2));
  auto first = std::async(std::launch::async,
                          [&] { return other.join("g", 1, 2, std::nullopt, 5s); });
  ASSERT_TRUE(other.synced("g"));  // "g" exists with world 2
  auto refused = rank.join("g", 0, 3, random_id(), 5s);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(refused.status().message(),
            "tp group 'g': TpJoin.world 3 differs from the group's world 2");
  // Same connection, a valid join: the group completes.
  const Bytes id = random_id();
  auto ok = rank.join("g", 0, 2, id);
  ASSERT_TRUE(ok.ok()) << ok.status().to_string();
  auto other_got = first.get();
  ASSERT_TRUE(other_got.ok()) << other_got.status().to_string();
  EXPECT_EQ(other_got->unique_id, id);
  EXPECT_EQ(other_got->members[0].node_id, NodeId(5));
  EXPECT_EQ(other_got->members[1].node_id, NodeId(6));
}

}  // namespace
}  // namespace kvgate::coordinator
