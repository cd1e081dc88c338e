// A fake coordinator and a fake decode node around a real PrefillNode, all
// in one process: real control connections on 127.0.0.1 (ephemeral ports),
// the loopback transport, the real model.
//
// Threads: the fakes' control listeners run on one io_context thread
// (FakeCluster::io_); their messages land in mutex-guarded lists. The
// decode side's transport, page pool and leases belong to the test thread,
// which polls the transport while it waits (pump()).
#pragma once

#include <gtest/gtest.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/control_channel.h"
#include "kvstore/lease_manager.h"
#include "kvstore/page_pool.h"
#include "transport/transport.h"

namespace kvgate::prefill::testing {

using Clock = std::chrono::steady_clock;
inline constexpr char kToken[] = "prefill-test-token";

// Messages one fake received, with a condition to wait on.
class Inbox {
 public:
  void push(control::Message m) {
    std::lock_guard lock(mu_);
    messages_.push_back(std::move(m));
  }
  template <typename T>
  std::vector<T> all() const {
    std::lock_guard lock(mu_);
    std::vector<T> out;
    for (const auto& m : messages_) {
      if (const T* t = std::get_if<T>(&m)) out.push_back(*t);
    }
    return out;
  }
  // The first T with `pred`, if one arrived.
  template <typename T>
  std::optional<T> find(std::function<bool(const T&)> pred) const {
    for (const T& t : all<T>()) {
      if (pred(t)) return t;
    }
    return std::nullopt;
  }

 private:
  mutable std::mutex mu_;
  std::vector<control::Message> messages_;
};

class FakeCluster {
 public:
  // Decode pool: pages of `page_bytes` (the node's decode.page_tokens x
  // head_dim x 2), `pool_bytes` in all.
  FakeCluster(int64_t page_bytes, int64_t pool_bytes) : work_(boost::asio::make_work_guard(io_)) {
    io_thread_ = std::thread([this] { io_.run(); });
    pool_ = kvstore::PagePool::create(page_bytes, pool_bytes).value();
    leases_ = kvstore::LeaseManager::create(pool_.get()).value();
    TransportConfig tc;
    tc.kind = TransportKind::kLoopback;
    transport::TransportOptions to;
    to.cluster_token = kToken;
    to.region = pool_->arena();
    to.region_bytes = static_cast<size_t>(pool_->capacity_bytes());
    decode_transport_ = transport::create_transport(tc, to).value();
    decode_address_ = decode_transport_->address().value();

    control::ChannelOptions ch;
    ch.cluster_token = kToken;
    // Coordinator: nodes register here.
    control::ListenerOptions co;
    co.channel = ch;
    co.accept_hello = [this](const control::Hello& h) -> Result<control::HelloAck> {
      std::lock_guard lock(mu_);
      node_hello_ = h;
      ++hellos_;
      return control::HelloAck{NodeId(1), control::kProtocolVersion, std::chrono::milliseconds(50)};
    };
    co.on_open = [this](const control::ConnectionPtr& c) {
      std::lock_guard lock(mu_);
      coordinator_conn_ = c;
    };
    co.handlers.on_message = [this](const control::ConnectionPtr&, control::Message m) {
      coordinator_inbox_.push(std::move(m));
    };
    co.handlers.on_closed = [](const control::ConnectionPtr&, const Status&) {};
    coordinator_ = control::listen_control(io_, {"127.0.0.1", 0}, std::move(co)).value();

    // Decode node: prefill nodes connect here.
    control::ListenerOptions dl;
    dl.channel = ch;
    dl.accept_hello = [](const control::Hello&) -> Result<control::HelloAck> {
      return control::HelloAck{NodeId(2), control::kProtocolVersion, std::chrono::milliseconds(0)};
    };
    dl.on_open = [](const control::ConnectionPtr&) {};
    dl.handlers.on_message = [this](const control::ConnectionPtr& c, control::Message m) {
      if (auto* ext = std::get_if<control::Extend>(&m)) {
        std::function<control::ExtendResult(const control::Extend&)> answer;
        {
          std::lock_guard lock(mu_);
          answer = extend_answer_;
        }
        if (answer) c->send(answer(*ext));
      }
      std::lock_guard lock(mu_);
      decode_conn_ = c;
      decode_inbox_.push(std::move(m));
    };
    dl.handlers.on_closed = [](const control::ConnectionPtr&, const Status&) {};
    decode_listener_ = control::listen_control(io_, {"127.0.0.1", 0}, std::move(dl)).value();
  }

  ~FakeCluster() {
    coordinator_->stop();
    decode_listener_->stop();
    {
      std::lock_guard lock(mu_);
      if (coordinator_conn_) coordinator_conn_->close(Status(StatusCode::kCancelled, "test over"));
      if (decode_conn_) decode_conn_->close(Status(StatusCode::kCancelled, "test over"));
      coordinator_conn_.reset();
      decode_conn_.reset();
    }
    work_.reset();
    io_.stop();
    io_thread_.join();
  }

  HostPort coordinator_address() const { return coordinator_->local_address(); }
  std::string decode_control_address() const {
    return decode_listener_->local_address().to_string();
  }
  const control::Bytes& decode_transport_address() const { return decode_address_; }

  std::optional<control::Hello> node_hello() const {
    std::lock_guard lock(mu_);
    return node_hello_;
  }
  bool coordinator_connected() const {
    std::lock_guard lock(mu_);
    return coordinator_conn_ != nullptr;
  }
  // Sends as the coordinator on the node's registration connection.
  void send_to_node(const control::Message& m) {
    control::ConnectionPtr c;
    {
      std::lock_guard lock(mu_);
      c = coordinator_conn_;
    }
    ASSERT_NE(c, nullptr);
    c->send(m);
  }
  void send_to_prefill_from_decode(const control::Message& m) {
    control::ConnectionPtr c;
    {
      std::lock_guard lock(mu_);
      c = decode_conn_;
    }
    if (c) c->send(m);
  }
  // Closes the node's registration connection (the node must reconnect).
  void drop_node_connection() {
    control::ConnectionPtr c;
    {
      std::lock_guard lock(mu_);
      c = std::move(coordinator_conn_);
    }
    if (c) c->close(unavailable("test drops the node"));
  }
  int hellos() const {
    std::lock_guard lock(mu_);
    return hellos_;
  }

  void set_extend_answer(std::function<control::ExtendResult(const control::Extend&)> f) {
    std::lock_guard lock(mu_);
    extend_answer_ = std::move(f);
  }

  const Inbox& coordinator_inbox() const { return coordinator_inbox_; }
  const Inbox& decode_inbox() const { return decode_inbox_; }

  // ---- decode side (test thread)
  struct Grant {
    LeaseId lease;
    uint64_t granted_bytes = 0;
    control::Bytes descriptor;
  };
  // A lease of `bytes` with its pages taken and a receive posted over them.
  Grant reserve(RequestId request, int64_t bytes) {
    std::lock_guard lock(decode_mu_);
    Grant g;
    auto lease = leases_->grant(request, bytes, std::chrono::seconds(120), Clock::now());
    EXPECT_TRUE(lease.ok()) << lease.status().to_string();
    g.lease = *lease;
    g.granted_bytes = static_cast<uint64_t>(leases_->info(g.lease)->granted_bytes);
    const int64_t pages = static_cast<int64_t>(g.granted_bytes) / pool_->page_bytes();
    auto taken = leases_->take_pages(g.lease, pages);
    EXPECT_TRUE(taken.ok()) << taken.status().to_string();
    transport::ReceiveSpec spec;
    spec.id = transport::TransferId(g.lease.value());
    for (kvstore::PageId p : *taken) {
      spec.ranges.push_back({static_cast<uint64_t>(p.value) * pool_->page_bytes(),
                             static_cast<uint64_t>(pool_->page_bytes())});
    }
    spec.deadline = Clock::now() + std::chrono::seconds(60);
    auto grant = decode_transport_->post_receive(spec);
    EXPECT_TRUE(grant.ok()) << grant.status().to_string();
    g.descriptor = *grant;
    return g;
  }

  // Polls the decode transport once; receive events are kept.
  void pump() {
    std::lock_guard lock(decode_mu_);
    decode_transport_->progress(events_);
  }

  // What a decode node does on Extend (decode/decode_engine.cpp): grows the
  // lease and its live receive in place, answering with the new grant.
  // Runs on the io thread (an extend answer); the decode side's lock keeps
  // it off the test thread's pump().
  control::ExtendResult extend_in_place(const control::Extend& e) {
    std::lock_guard lock(decode_mu_);
    control::ExtendResult r;
    r.request_id = e.request_id;
    r.lease_id = e.lease_id;
    auto grown = leases_->extend(e.lease_id, static_cast<int64_t>(e.extra_bytes), Clock::now());
    if (!grown.ok()) {
      r.code = grown.status().code();
      r.message = grown.status().message();
      return r;
    }
    auto more = leases_->take_pages(e.lease_id, leases_->pages_left(e.lease_id));
    EXPECT_TRUE(more.ok()) << more.status().to_string();
    std::vector<transport::DestRange> ranges;
    for (kvstore::PageId p : *more) {
      ranges.push_back({static_cast<uint64_t>(p.value) * pool_->page_bytes(),
                        static_cast<uint64_t>(pool_->page_bytes())});
    }
    auto grant = decode_transport_->extend_receive(transport::TransferId(e.lease_id.value()), ranges);
    if (!grant.ok()) {
      r.code = grant.status().code();
      r.message = grant.status().message();
      return r;
    }
    ++extends_in_place_;
    r.granted_bytes = static_cast<uint64_t>(*grown);
    r.expires_in = std::chrono::seconds(60);
    r.pool_descriptor = *grant;
    return r;
  }
  int extends_in_place() const {
    std::lock_guard lock(decode_mu_);
    return extends_in_place_;
  }
  std::optional<transport::TransferEvent> receive_event(LeaseId lease) const {
    for (const auto& e : events_) {
      if (e.side == transport::TransferSide::kReceive && e.id.value() == lease.value()) return e;
    }
    return std::nullopt;
  }
  size_t receive_events() const { return events_.size(); }

  // Waits for `ready` (pumping the decode transport) up to `timeout`.
  bool wait_until(const std::function<bool()>& ready,
                  std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      pump();
      if (ready()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling the transport
    }
    pump();
    return ready();
  }

  kvstore::LeaseManager& leases() { return *leases_; }
  kvstore::PagePool& pool() { return *pool_; }

 private:
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::thread io_thread_;
  mutable std::mutex mu_;
  std::optional<control::Hello> node_hello_;
  int hellos_ = 0;
  control::ConnectionPtr coordinator_conn_;
  control::ConnectionPtr decode_conn_;
  std::function<control::ExtendResult(const control::Extend&)> extend_answer_;
  Inbox coordinator_inbox_;
  Inbox decode_inbox_;
  std::shared_ptr<control::Listener> coordinator_;
  std::shared_ptr<control::Listener> decode_listener_;

  std::unique_ptr<kvstore::PagePool> pool_;
  std::unique_ptr<kvstore::LeaseManager> leases_;
  std::unique_ptr<transport::Transport> decode_transport_;
  control::Bytes decode_address_;
  std::vector<transport::TransferEvent> events_;
  // The decode side (transport, leases): the test thread, or the io thread
  // in extend_in_place().
  mutable std::mutex decode_mu_;
  int extends_in_place_ = 0;
};

}  // namespace kvgate::prefill::testing
