#include "coordinator/cluster_backend.h"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <future>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

#include "common/log.h"
#include "engine/kv_policy_spec.h"
#include "engine/policy_cache.h"

namespace kvgate::coordinator {

namespace asio = boost::asio;

namespace {

// A node's registration connection as the scheduler's NodeLink.
class ConnectionLink final : public NodeLink {
 public:
  explicit ConnectionLink(control::ConnectionPtr connection) : connection_(std::move(connection)) {}
  void send(const control::Message& message) override { connection_->send(message); }
  void close(const Status& reason) override { connection_->close(reason); }

 private:
  control::ConnectionPtr connection_;
};

NodeId random_node_id() {
  std::random_device rd;
  std::mt19937_64 gen((static_cast<uint64_t>(rd()) << 32) ^ rd());
  uint64_t v = 0;
  while (v == 0) v = gen();
  return NodeId(v);
}

}  // namespace

struct ClusterBackend::Impl {
  Impl(ClusterBackendOptions o, FootprintPredictor predictor,
       std::shared_ptr<prometheus::Registry> registry, ClusterLog log)
      : options(std::move(o)),
        metrics(registry ? std::make_unique<ClusterMetrics>(std::move(registry)) : nullptr),
        scheduler(options.scheduler, std::move(predictor), metrics.get(),
                  log ? std::move(log) : ClusterLog([](const std::string& line) {
                    log::info(line);
                  })),
        work(asio::make_work_guard(io)),
        timer(io) {}

  void arm_timer() {
    timer.expires_after(options.tick_interval);
    timer.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (stopped) return;
        scheduler.tick(ClusterClock::now());
      }
      arm_timer();
    });
  }

  const ClusterBackendOptions options;
  asio::io_context io;  // declared first: destroyed after everything using it
  std::unique_ptr<ClusterMetrics> metrics;

  mutable std::mutex mu;  // guards the members below
  ClusterScheduler scheduler;
  std::unordered_map<const control::Connection*, std::shared_ptr<ConnectionLink>> links;
  bool stopped = false;

  asio::executor_work_guard<asio::io_context::executor_type> work;
  asio::steady_timer timer;
  std::shared_ptr<control::Listener> listener;
  HostPort bound;
  std::thread thread;
  std::future<void> thread_done;
};

ClusterBackend::ClusterBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<ClusterBackend>> ClusterBackend::start(
    ClusterBackendOptions options, FootprintPredictor predictor,
    std::shared_ptr<prometheus::Registry> registry, ClusterLog log) {
  if (options.tick_interval.count() <= 0) {
    return invalid_argument("cluster backend: tick_interval must be positive");
  }
  if (!options.scheduler.self_id.valid()) options.scheduler.self_id = random_node_id();
  auto impl = std::make_unique<Impl>(std::move(options), std::move(predictor),
                                     std::move(registry), std::move(log));
  Impl* raw = impl.get();

  control::ListenerOptions lo;
  lo.channel = raw->options.channel;
  lo.accept_hello = [raw](const control::Hello& hello) -> Result<control::HelloAck> {
    std::lock_guard<std::mutex> lock(raw->mu);
    return raw->scheduler.check_hello(hello);
  };
  lo.on_open = [raw](const control::ConnectionPtr& conn) {
    auto link = std::make_shared<ConnectionLink>(conn);
    Status s;
    {
      std::lock_guard<std::mutex> lock(raw->mu);
      s = raw->scheduler.node_opened(conn->peer(), link, ClusterClock::now());
      if (s.ok()) raw->links[conn.get()] = link;
    }
    if (!s.ok()) conn->close(s);
  };
  lo.handlers.on_message = [raw](const control::ConnectionPtr& conn, control::Message message) {
    std::lock_guard<std::mutex> lock(raw->mu);
    auto it = raw->links.find(conn.get());
    if (it == raw->links.end()) return;  // refused at on_open
    raw->scheduler.node_message(conn->peer().node_id, it->second.get(), message,
                                ClusterClock::now());
  };
  lo.handlers.on_closed = [raw](const control::ConnectionPtr& conn, const Status& reason) {
    std::lock_guard<std::mutex> lock(raw->mu);
    auto it = raw->links.find(conn.get());
    if (it == raw->links.end()) return;
    std::shared_ptr<ConnectionLink> link = std::move(it->second);
    raw->links.erase(it);
    raw->scheduler.node_closed(conn->peer().node_id, link.get(), reason, ClusterClock::now());
  };
  auto listener = control::listen_control(raw->io, raw->options.control_listen, std::move(lo));
  if (!listener.ok()) return listener.status();
  raw->listener = std::move(*listener);
  raw->bound = raw->listener->local_address();
  raw->arm_timer();

  std::promise<void> done;
  raw->thread_done = done.get_future();
  raw->thread = std::thread([raw, done = std::move(done)]() mutable {
    for (;;) {
      try {
        raw->io.run();
        break;
      } catch (const std::exception& e) {
        // Handlers report errors as values; keep serving if one throws anyway.
        log::error("coordinator: control-plane handler threw", {{"what", e.what()}});
      }
    }
    done.set_value();
  });
  log::info("coordinator: control plane listening",
            {{"address", raw->bound.to_string()}, {"model", raw->options.scheduler.model_name}});
  return std::unique_ptr<ClusterBackend>(new ClusterBackend(std::move(impl)));
}

Result<std::unique_ptr<ClusterBackend>> ClusterBackend::from_config(
    const NodeConfig& config, const engine::LlamaModel& model,
    std::shared_ptr<prometheus::Registry> registry) {
  KVGATE_ASSIGN_OR_RETURN(engine::KvPolicyConfig policy,
                          engine::kv_policy_from_config(config.kv, config.model.path, model));
  KVGATE_ASSIGN_OR_RETURN(auto plan, engine::plan_kv_policy(model.config(), policy));
  KVGATE_ASSIGN_OR_RETURN(FootprintPredictor predictor,
                          FootprintPredictor::create(*plan, config.decode.page_tokens));
  KVGATE_ASSIGN_OR_RETURN(std::string token, control::read_cluster_token(config.cluster));
  ClusterBackendOptions o;
  o.scheduler = ClusterSchedulerOptions::from_config(config, random_node_id(),
                                                     model.config().n_ctx_train,
                                                     engine::kv_policy_spec(policy));
  o.control_listen = config.coordinator.control_listen;
  o.channel = control::channel_options(config.cluster, token);
  return start(std::move(o), std::move(predictor), std::move(registry));
}

ClusterBackend::~ClusterBackend() {
  shutdown();
}

Status ClusterBackend::submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->stopped) return unavailable("the coordinator is shutting down");
  return impl_->scheduler.submit(std::move(request), std::move(sink), ClusterClock::now());
}

void ClusterBackend::cancel(RequestId id) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->scheduler.cancel(id, ClusterClock::now());
}

BackendHealth ClusterBackend::health() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->scheduler.health();
}

std::vector<BackendModel> ClusterBackend::models() const {
  return impl_->scheduler.models();  // options only: immutable
}

HostPort ClusterBackend::control_address() const {
  return impl_->bound;
}

NodeId ClusterBackend::node_id() const {
  return impl_->options.scheduler.self_id;  // set by start()
}

std::vector<ClusterNodeSnapshot> ClusterBackend::nodes() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  const Membership& m = impl_->scheduler.membership();
  std::vector<ClusterNodeSnapshot> out;
  for (const auto& [id, n] : m.nodes()) {
    ClusterNodeSnapshot s;
    s.id = id;
    s.role = n.role;
    s.name = n.name;
    s.state = n.state;
    s.down_reason = n.down_reason;
    s.heartbeats = n.heartbeats;
    s.free_bytes = m.decode_free_bytes(n);
    s.queued_tokens = m.prefill_queued_tokens(n);
    out.push_back(std::move(s));
  }
  return out;
}

control::ListenerCounters ClusterBackend::listener_counters() const {
  return impl_->listener ? impl_->listener->counters() : control::ListenerCounters{};
}

double ClusterBackend::keep_rate(int64_t prompt_tokens) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->scheduler.predictor().bucket_keep_rate(prompt_tokens);
}

void ClusterBackend::shutdown() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.stopped) return;
    m.stopped = true;
    m.scheduler.shutdown();  // sinks get kCancelled, nodes get Cancel
    for (auto& [conn, link] : m.links) link->close(unavailable("the coordinator is shutting down"));
  }
  if (m.listener) m.listener->stop();
  asio::post(m.io, [&m] { m.timer.cancel(); });
  m.work.reset();
  // The connections drain their queued Cancels and close (bounded by the
  // channel's close_timeout); stop the loop if a peer holds it longer.
  if (m.thread.joinable()) {
    if (m.thread_done.wait_for(m.options.channel.close_timeout + std::chrono::seconds(1)) !=
        std::future_status::ready) {
      m.io.stop();
    }
    m.thread.join();
  }
  std::lock_guard<std::mutex> lock(m.mu);
  m.links.clear();
}

}  // namespace kvgate::coordinator
