// The prefill node's control plane (io_context thread) and its assembly.
// Members marked "io" are touched only on the io_context thread (one thread
// runs it, so its callbacks never overlap); those under mu_ also by the
// engine thread (ControlLinks) and the accessors.
#include "prefill/prefill_node.h"

#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <exception>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <type_traits>
#include <variant>
#include <vector>

#include "common/control_channel.h"
#include "common/log.h"
#include "engine/cpu/isa.h"
#include "engine/gate_file.h"
#include "engine/kv_policy_spec.h"
#include "prefill/job_check.h"
#include "prefill/metrics.h"
#include "prefill/prefill_engine.h"
#include "transport/transport.h"

#if KVGATE_HAVE_CUDA
#include "engine/cuda/cuda_prefill.h"
#endif

namespace kvgate::prefill {

namespace asio = boost::asio;
using control::ConnectionPtr;

namespace {

constexpr auto kFirstBackoff = std::chrono::milliseconds(100);
constexpr auto kMaxBackoff = std::chrono::milliseconds(2000);
// stop(): how long the io thread may take to flush the closing connections.
constexpr auto kIoDrainTimeout = std::chrono::seconds(2);

NodeId random_node_id() {
  std::random_device rd;
  std::mt19937_64 rng((uint64_t{rd()} << 32) ^ rd() ^
                      static_cast<uint64_t>(Clock::now().time_since_epoch().count()));
  uint64_t v = 0;
  while (v == 0) v = rng();
  return NodeId(v);
}

Result<engine::cpu::Isa> isa_of(IsaChoice choice) {
  using engine::cpu::Isa;
  Isa isa = engine::cpu::best_isa();
  switch (choice) {
    case IsaChoice::kAuto: break;
    case IsaChoice::kScalar: isa = Isa::kScalar; break;
    case IsaChoice::kAvx2: isa = Isa::kAvx2; break;
    case IsaChoice::kAvx512: isa = Isa::kAvx512; break;
  }
  if (!engine::cpu::isa_supported(isa)) {
    return invalid_argument(std::string("engine.isa: this CPU does not support ") +
                            engine::cpu::isa_name(isa));
  }
  return isa;
}

}  // namespace

class PrefillNode::Impl final : public ControlLinks {
 public:
  explicit Impl(const NodeConfig& config)
      : config_(config),
        io_(std::make_unique<asio::io_context>()),
        queue_(config.prefill.max_queued_jobs, config.prefill.max_queued_tokens) {}

  ~Impl() override { stop(); }

  Status init(PrefillResources resources);
  void stop();

  // ControlLinks (engine thread).
  void reply(const QueuedJob& job, const control::Message& message) override;
  void open_decode(const std::string& address) override;
  Status decode_state(const std::string& address) override;
  Status send_decode(const std::string& address, const control::Message& message) override;

  NodeId node_id_;
  std::string node_name_;
  HostPort listen_address_;
  control::Bytes transport_address_;
  std::optional<HostPort> metrics_address_;
  JobQueue& queue() { return queue_; }
  PrefillMetrics& metrics() { return *metrics_; }
  int registered() const {
    std::lock_guard lock(mu_);
    int n = 0;
    for (const auto& r : regs_) n += (r->conn && r->conn->is_open()) ? 1 : 0;
    return n;
  }

 private:
  // A registration with one coordinator.
  struct Registration {
    int index = 0;
    HostPort address;
    ConnectionPtr conn;  // under mu_ (io writes, the engine reads)
    std::unique_ptr<asio::steady_timer> heartbeat;  // io
    std::unique_ptr<asio::steady_timer> retry;      // io
    std::chrono::milliseconds backoff = kFirstBackoff;  // io
    std::chrono::milliseconds interval{0};              // io
    uint64_t sequence = 0;                              // io
  };
  // A control connection to a decode node, under mu_.
  struct DecodeLink {
    Status state;  // OK open, kInProgress opening, else why not
    ConnectionPtr conn;
  };

  control::Hello make_hello() const;
  // io thread.
  void connect_registration(Registration* r);
  void schedule_reconnect(Registration* r);
  void schedule_heartbeat(Registration* r, const ConnectionPtr& conn);
  void on_message(const ConnectionPtr& conn, int coordinator, control::Message message);
  void accept_job(const ConnectionPtr& conn, int coordinator, control::PrefillJob job);
  void on_cancel(const control::Cancel& cancel);
  void update_queue_gauges();
  // engine.backend: cuda — the model on the GPU (CudaForward), prefills
  // through prefill_compressed_batch_cuda; UNIMPLEMENTED in a build
  // without the CUDA backend.
  Result<PrefillCompute> cuda_compute();

  const NodeConfig config_;
  // Declared first: destroyed last, after everything that posts to it.
  std::unique_ptr<asio::io_context> io_;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_;
  std::shared_ptr<const engine::LlamaModel> model_;
  std::shared_ptr<const engine::GateModel> gate_;
  std::unique_ptr<engine::CpuForward> forward_;
#if KVGATE_HAVE_CUDA
  std::unique_ptr<engine::cuda::CudaForward> cuda_forward_;  // engine.backend: cuda
#endif
  std::unique_ptr<transport::Transport> transport_;
  JobQueue queue_;
  JobLimits limits_;
  control::ChannelOptions channel_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<PrefillMetrics> metrics_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::unique_ptr<PrefillEngine> engine_;
  std::shared_ptr<control::Listener> listener_;
  std::vector<std::unique_ptr<Registration>> regs_;
  mutable std::mutex mu_;
  std::map<std::string, DecodeLink> links_;  // by "host:port"
  std::set<ConnectionPtr> accepted_;         // on the listener
  std::thread io_thread_;
  std::future<void> io_done_;
  std::thread engine_thread_;
  std::atomic<bool> stopping_{false};
  bool stopped_ = false;
};

// ------------------------------------------------------------------ start

Status PrefillNode::Impl::init(PrefillResources resources) {
  KVGATE_ASSIGN_OR_RETURN(std::string token, control::read_cluster_token(config_.cluster));
  channel_ = control::channel_options(config_.cluster, token);

  // Model and gate.
  if (resources.model) {
    model_ = std::move(resources.model);
  } else {
    if (config_.model.path.empty()) return invalid_argument("model.path: required by a prefill node");
    auto model = engine::LlamaModel::load(config_.model.path);
    if (!model.ok()) {
      return Status(model.status().code(), config_.model.path + ": " + model.status().message());
    }
    model_ = std::shared_ptr<const engine::LlamaModel>(std::move(*model));
  }
  if (resources.gate_given) {
    gate_ = std::move(resources.gate);
  } else {
    std::string path = config_.kv.gate_file;
    std::error_code ec;
    const std::string side = engine::default_gate_path(config_.model.path);
    if (path.empty() && !config_.model.path.empty() && std::filesystem::is_regular_file(side, ec)) {
      path = side;
    }
    if (!path.empty()) {
      auto gate = engine::load_gate_for_model(path, *model_);
      if (!gate.ok()) return Status(gate.status().code(), "kv.gate_file: " + path + ": " + gate.status().message());
      gate_ = std::make_shared<const engine::GateModel>(std::move(*gate));
    }
  }
  const engine::LlamaConfig& mc = model_->config();
  limits_.max_context_tokens = config_.model.max_context_tokens > 0 ? config_.model.max_context_tokens
                               : mc.n_ctx_train > 0                 ? mc.n_ctx_train
                                                                    : kvstore::kMaxTokens - 1;
  limits_.page_bytes = config_.decode.page_tokens * mc.head_dim * kvstore::kKvElementBytes;
  if (config_.decode.page_tokens <= 0 || limits_.page_bytes % 64 != 0) {
    return invalid_argument("decode.page_tokens: " + std::to_string(config_.decode.page_tokens) +
                            " tokens x " + std::to_string(mc.head_dim * 2) +
                            " bytes is not a page size in whole 64-byte lines");
  }

  // Engine.
  engine::ForwardOptions fo;
  fo.n_threads = static_cast<int>(config_.engine.threads);
  KVGATE_ASSIGN_OR_RETURN(fo.isa, isa_of(config_.engine.isa));
  fo.max_batch_tokens = std::max<int64_t>(
      1, std::min(config_.engine.max_batch_tokens, config_.prefill.chunk_tokens));
  PrefillCompute compute;
  if (config_.engine.backend == EngineBackend::kCuda) {
    KVGATE_ASSIGN_OR_RETURN(compute, cuda_compute());
  } else {
    forward_ = std::make_unique<engine::CpuForward>(*model_, fo);
    compute = PrefillCompute::cpu(*forward_);
  }

  // Transport: send-only (no region to register).
  transport::TransportOptions to;
  to.cluster_token = token;
  auto transport = transport::create_transport(config_.transport, to);
  if (!transport.ok()) {
    return Status(transport.status().code(), "transport: " + transport.status().message());
  }
  transport_ = std::move(*transport);
  KVGATE_ASSIGN_OR_RETURN(transport_address_, transport_->address());

  node_id_ = random_node_id();

  // Control listener (port 0: any).
  control::ListenerOptions lo;
  lo.channel = channel_;
  lo.accept_hello = [this](const control::Hello& hello) -> Result<control::HelloAck> {
    if (hello.role != control::NodeRole::kCoordinator) {
      return Status(StatusCode::kPermissionDenied,
                    "a prefill node takes connections from coordinators only");
    }
    return control::HelloAck{node_id_, control::kProtocolVersion, std::chrono::milliseconds(0)};
  };
  lo.on_open = [this](const ConnectionPtr& conn) {
    std::lock_guard lock(mu_);
    if (stopping_) {
      conn->close(unavailable("prefill node is shutting down"));
      return;
    }
    accepted_.insert(conn);
  };
  lo.handlers.on_message = [this](const ConnectionPtr& conn, control::Message m) {
    on_message(conn, -1, std::move(m));
  };
  lo.handlers.on_closed = [this](const ConnectionPtr& conn, const Status&) {
    std::lock_guard lock(mu_);
    accepted_.erase(conn);
  };
  auto listener = control::listen_control(*io_, config_.prefill.listen, std::move(lo));
  if (!listener.ok()) return Status(listener.status().code(), "prefill.listen: " + listener.status().message());
  listener_ = std::move(*listener);
  listen_address_ = listener_->local_address();
  node_name_ = !config_.cluster.node_name.empty()
                   ? config_.cluster.node_name
                   : "prefill-" + listen_address_.host + "-" + std::to_string(listen_address_.port);

  // Metrics.
  registry_ = std::make_shared<prometheus::Registry>();
  metrics_ = std::make_unique<PrefillMetrics>(registry_, node_name_);
  if (config_.metrics.enabled) {
    try {
      exposer_ = std::make_unique<prometheus::Exposer>(config_.metrics.listen.to_string());
      exposer_->RegisterCollectable(registry_);
      const auto ports = exposer_->GetListeningPorts();
      metrics_address_ = HostPort{config_.metrics.listen.host,
                                  ports.empty() ? config_.metrics.listen.port
                                                : static_cast<uint16_t>(ports.front())};
    } catch (const std::exception& e) {
      return unavailable("metrics.listen: cannot serve metrics on " +
                         config_.metrics.listen.to_string() + ": " + e.what());
    }
  }

  engine_ = std::make_unique<PrefillEngine>(
      std::move(compute), *transport_, queue_, *this, *metrics_,
      EngineSettings{limits_.page_bytes, config_.transport.transfer_deadline,
                     transport::TransportOptions{}.quiesce_timeout, config_.prefill.max_batch_jobs,
                     config_.prefill.max_batch_tokens});

  for (size_t i = 0; i < config_.cluster.coordinators.size(); ++i) {
    auto r = std::make_unique<Registration>();
    r->index = static_cast<int>(i);
    r->address = config_.cluster.coordinators[i];
    r->heartbeat = std::make_unique<asio::steady_timer>(*io_);
    r->retry = std::make_unique<asio::steady_timer>(*io_);
    regs_.push_back(std::move(r));
  }

  // Threads: the engine, then the io_context with the registrations.
  work_.emplace(asio::make_work_guard(*io_));
  std::promise<void> io_done;
  io_done_ = io_done.get_future();
  io_thread_ = std::thread([this, done = std::move(io_done)]() mutable {
    io_->run();
    done.set_value();
  });
  engine_thread_ = std::thread([this] { engine_->run(); });
  for (auto& r : regs_) {
    asio::post(*io_, [this, p = r.get()] { connect_registration(p); });
  }
  log::info("prefill node started", {{"node_id", node_id_},
                                     {"listen", listen_address_.to_string()},
                                     {"transport", transport_->name()},
                                     {"coordinators", regs_.size()},
                                     {"gate", gate_ != nullptr}});
  return Status();
}

control::Hello PrefillNode::Impl::make_hello() const {
  control::Hello h;
  h.role = control::NodeRole::kPrefill;
  h.node_id = node_id_;
  h.node_name = node_name_;
  h.model_name = served_model_name(config_.model);
  const std::string& host =
      config_.cluster.advertise_host.empty() ? listen_address_.host : config_.cluster.advertise_host;
  h.control_address = HostPort{host, listen_address_.port}.to_string();
  h.transport_name = std::string(transport_->name());
  h.transport_address = transport_address_;
  return h;
}

// ------------------------------------------------------------------- stop

Result<PrefillCompute> PrefillNode::Impl::cuda_compute() {
#if KVGATE_HAVE_CUDA
  engine::cuda::CudaForwardOptions co;
  // The forward's dense cache holds one prompt at a time.
  co.max_context_tokens = limits_.max_context_tokens;
  co.max_prefill_tokens = std::clamp<int64_t>(config_.prefill.chunk_tokens, 1, co.max_context_tokens);
  co.max_decode_batch = std::min<int64_t>(co.max_decode_batch, co.max_prefill_tokens);
  auto forward = engine::cuda::CudaForward::create(engine::cuda::HostWeights::of(*model_), co);
  if (!forward.ok()) {
    return Status(forward.status().code(), "engine.backend: cuda: " + forward.status().message());
  }
  cuda_forward_ = std::move(*forward);
  log::info("prefill engine on the GPU",
            {{"backend", "cuda"},
             {"max_context_tokens", co.max_context_tokens},
             {"chunk_tokens", co.max_prefill_tokens},
             {"weight_bytes", static_cast<int64_t>(cuda_forward_->gemv_weight_bytes() +
                                                   cuda_forward_->gemm_weight_bytes())},
             // The compressed cache is built in host pages from the
             // downloaded K/V and shipped from there.
             {"kv_path", "device K/V -> host pages -> transport"}});
  PrefillCompute c;
  c.config = model_->config();
  c.run = [f = cuda_forward_.get()](std::span<engine::CompressedPrefillJob> jobs,
                                    const std::function<Status(int64_t)>& on_layer) {
    return engine::cuda::prefill_compressed_batch_cuda(*f, jobs, on_layer);
  };
  return c;
#else
  return unimplemented(
      "engine.backend: cuda: this build has no CUDA backend (configure with -DKVGATE_CUDA=ON "
      "on a machine with the CUDA toolkit)");
#endif
}

void PrefillNode::Impl::stop() {
  if (stopped_) return;
  stopped_ = true;
  stopping_ = true;
  queue_.close();
  if (engine_thread_.joinable()) engine_thread_.join();
  if (io_thread_.joinable()) {
    asio::post(*io_, [this] {
      if (listener_) listener_->stop();
      std::vector<ConnectionPtr> to_close;
      {
        std::lock_guard lock(mu_);
        for (auto& r : regs_) {
          r->heartbeat->cancel();
          r->retry->cancel();
          if (r->conn) to_close.push_back(r->conn);
        }
        for (auto& [address, link] : links_) {
          if (link.conn) to_close.push_back(link.conn);
        }
        to_close.insert(to_close.end(), accepted_.begin(), accepted_.end());
      }
      for (const auto& c : to_close) c->close(unavailable("prefill node shutting down"));
    });
    work_.reset();
    if (io_done_.wait_for(kIoDrainTimeout) != std::future_status::ready) {
      log::debug("io thread still busy after the drain timeout: stopping it");
      io_->stop();
    }
    io_thread_.join();
  }
  log::debug("control plane stopped");
  exposer_.reset();
  log::info("prefill node stopped", {{"node_id", node_id_}});
}

// ------------------------------------------------------ coordinators (io)

void PrefillNode::Impl::connect_registration(Registration* r) {
  if (stopping_) return;
  control::ConnectionHandlers handlers;
  const int index = r->index;
  handlers.on_message = [this, index](const ConnectionPtr& conn, control::Message m) {
    on_message(conn, index, std::move(m));
  };
  handlers.on_closed = [this, r](const ConnectionPtr& conn, const Status& why) {
    {
      std::lock_guard lock(mu_);
      if (r->conn != conn) return;
      r->conn.reset();
    }
    r->heartbeat->cancel();
    if (stopping_) return;
    log::warn("coordinator connection closed",
              {{"coordinator", r->address.to_string()}, {"status", why}});
    schedule_reconnect(r);
  };
  control::connect_control(
      *io_, r->address, make_hello(), channel_, std::move(handlers),
      [this, r](Result<ConnectionPtr> conn, const control::HelloAck& ack) {
        if (!conn.ok()) {
          if (stopping_) return;
          log::warn("coordinator registration failed",
                    {{"coordinator", r->address.to_string()},
                     {"status", conn.status()},
                     {"retry_ms", r->backoff}});
          schedule_reconnect(r);
          return;
        }
        {
          std::lock_guard lock(mu_);
          if (stopping_) {
            (*conn)->close(unavailable("prefill node shutting down"));
            return;
          }
          r->conn = *conn;
        }
        r->backoff = kFirstBackoff;
        r->interval = ack.heartbeat_interval;
        r->sequence = 0;
        log::info("registered with coordinator", {{"coordinator", r->address.to_string()},
                                                  {"coordinator_id", ack.node_id},
                                                  {"heartbeat_ms", ack.heartbeat_interval}});
        if (r->interval.count() > 0) schedule_heartbeat(r, *conn);
      });
}

void PrefillNode::Impl::schedule_reconnect(Registration* r) {
  const auto delay = r->backoff;
  r->backoff = std::min(kMaxBackoff, r->backoff * 2);
  r->retry->expires_after(delay);
  r->retry->async_wait([this, r](const boost::system::error_code& ec) {
    if (!ec && !stopping_) connect_registration(r);
  });
}

void PrefillNode::Impl::schedule_heartbeat(Registration* r, const ConnectionPtr& conn) {
  r->heartbeat->expires_after(r->interval);
  r->heartbeat->async_wait(
      [this, r, weak = std::weak_ptr<control::Connection>(conn)](const boost::system::error_code& ec) {
        if (ec || stopping_) return;
        ConnectionPtr c = weak.lock();
        {
          std::lock_guard lock(mu_);
          if (!c || r->conn != c) return;  // a newer connection has its own timer
        }
        const QueueStats q = queue_.stats();
        control::Heartbeat hb;
        hb.node_id = node_id_;
        hb.sequence = ++r->sequence;
        hb.queue_length = static_cast<uint32_t>(q.queued_jobs);
        hb.queued_tokens = static_cast<uint64_t>(q.queued_tokens);
        hb.in_flight_requests = q.running ? 1 : 0;
        c->send(hb);
        schedule_heartbeat(r, c);
      });
}

void PrefillNode::Impl::on_message(const ConnectionPtr& conn, int coordinator,
                                   control::Message message) {
  std::visit(
      [&](auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, control::PrefillJob>) {
          accept_job(conn, coordinator, std::move(m));
        } else if constexpr (std::is_same_v<T, control::Cancel>) {
          on_cancel(m);
        } else if constexpr (std::is_same_v<T, control::Error>) {
          log::warn("error from the coordinator", {{"request", m.request_id}, {"status", m.status()}});
        } else {
          log::debug("unexpected message from the coordinator dropped",
                     {{"type", control::message_type_name(T::kType)}});
        }
      },
      message);
}

void PrefillNode::Impl::accept_job(const ConnectionPtr& conn, int coordinator,
                                   control::PrefillJob job) {
  const RequestId id = job.request_id;
  auto plan = check_job(job, *model_, gate_, limits_);
  if (!plan.ok()) {
    metrics_->job_failed(JobFailure::kInvalid);
    log::warn("prefill job refused", {{"request", id}, {"status", plan.status()}});
    conn->send(control::Error{id, plan.status().code(), plan.status().message()});
    return;
  }
  QueuedJob q;
  q.received_at = Clock::now();
  if (job.deadline_in.count() > 0) q.deadline = q.received_at + job.deadline_in;
  q.plan = std::move(*plan);
  q.origin = conn;
  q.coordinator = coordinator;
  const size_t tokens = job.prompt_token_ids.size();
  q.job = std::move(job);
  if (Status s = queue_.push(std::move(q)); !s.ok()) {
    metrics_->job_failed(s.code() == StatusCode::kResourceExhausted ? JobFailure::kQueueFull
                                                                    : JobFailure::kInvalid);
    log::warn("prefill job refused", {{"request", id}, {"status", s}});
    conn->send(control::Error{id, s.code(), s.message()});
    return;
  }
  metrics_->job_queued();
  update_queue_gauges();
  log::info("prefill job queued", {{"request", id}, {"prompt_tokens", tokens}});
}

void PrefillNode::Impl::on_cancel(const control::Cancel& cancel) {
  switch (queue_.cancel(cancel.request_id)) {
    case CancelOutcome::kDroppedQueued:
      metrics_->job_failed(JobFailure::kCancelled);
      update_queue_gauges();
      log::info("queued prefill job cancelled",
                {{"request", cancel.request_id}, {"reason", cancel.reason}});
      break;
    case CancelOutcome::kRunning:
      log::info("cancelling the running prefill job",
                {{"request", cancel.request_id}, {"reason", cancel.reason}});
      break;
    case CancelOutcome::kUnknown:
      log::debug("cancel for no job of this node", {{"request", cancel.request_id}});
      break;
  }
}

void PrefillNode::Impl::update_queue_gauges() {
  const QueueStats q = queue_.stats();
  metrics_->set_queue(q.queued_jobs, q.queued_tokens);
}

// ------------------------------------------------ ControlLinks (engine)

void PrefillNode::Impl::reply(const QueuedJob& job, const control::Message& message) {
  ConnectionPtr conn = job.origin.lock();
  if (!conn || !conn->is_open()) {
    std::lock_guard lock(mu_);
    conn.reset();
    if (job.coordinator >= 0 && static_cast<size_t>(job.coordinator) < regs_.size()) {
      conn = regs_[static_cast<size_t>(job.coordinator)]->conn;
    }
  }
  if (!conn) {
    log::warn("reply to the coordinator dropped: not connected",
              {{"request", job.job.request_id},
               {"type", control::message_type_name(control::message_type(message))}});
    return;
  }
  conn->send(message);
}

void PrefillNode::Impl::open_decode(const std::string& address) {
  std::lock_guard lock(mu_);
  if (stopping_) return;
  auto it = links_.find(address);
  if (it != links_.end() &&
      (it->second.state.ok() || it->second.state.code() == StatusCode::kInProgress)) {
    return;
  }
  DecodeLink& link = links_[address];
  link.conn.reset();
  auto hp = parse_host_port(address);
  if (!hp.ok()) {
    link.state = invalid_argument("decode_control_address: " + hp.status().message());
    return;
  }
  link.state = Status(StatusCode::kInProgress, "connecting");
  asio::post(*io_, [this, address, hp = *hp] {
    control::ConnectionHandlers handlers;
    handlers.on_message = [this, address](const ConnectionPtr&, control::Message m) {
      if (std::holds_alternative<control::ExtendResult>(m) ||
          std::holds_alternative<control::TransferResult>(m) ||
          std::holds_alternative<control::Error>(m)) {
        queue_.post(std::move(m));
      } else {
        log::debug("unexpected message from a decode node dropped",
                   {{"decode", address},
                    {"type", control::message_type_name(control::message_type(m))}});
      }
    };
    handlers.on_closed = [this, address](const ConnectionPtr& conn, const Status& why) {
      {
        std::lock_guard lock(mu_);
        auto it = links_.find(address);
        if (it == links_.end() || it->second.conn != conn) return;
        it->second.conn.reset();
        it->second.state = unavailable("closed: " + why.to_string());
      }
      if (!stopping_) log::warn("decode node connection closed", {{"decode", address}, {"status", why}});
    };
    control::connect_control(
        *io_, hp, make_hello(), channel_, std::move(handlers),
        [this, address](Result<ConnectionPtr> conn, const control::HelloAck&) {
          std::lock_guard lock(mu_);
          DecodeLink& link = links_[address];
          if (!conn.ok()) {
            link.state = conn.status();
            log::warn("decode node connection failed", {{"decode", address}, {"status", conn.status()}});
            return;
          }
          if (stopping_) {
            (*conn)->close(unavailable("prefill node shutting down"));
            link.state = unavailable("prefill node shutting down");
            return;
          }
          link.conn = *conn;
          link.state = Status();
          log::info("connected to decode node", {{"decode", address}});
        });
  });
}

Status PrefillNode::Impl::decode_state(const std::string& address) {
  std::lock_guard lock(mu_);
  auto it = links_.find(address);
  if (it == links_.end()) return unavailable("not connected");
  return it->second.state;
}

Status PrefillNode::Impl::send_decode(const std::string& address, const control::Message& message) {
  ConnectionPtr conn;
  {
    std::lock_guard lock(mu_);
    auto it = links_.find(address);
    if (it != links_.end()) conn = it->second.conn;
  }
  if (!conn || !conn->is_open()) {
    return unavailable("decode node " + address + ": control connection is not open");
  }
  conn->send(message);
  return Status();
}

// ------------------------------------------------------------- PrefillNode

PrefillNode::PrefillNode(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PrefillNode::~PrefillNode() { stop(); }

Result<std::unique_ptr<PrefillNode>> PrefillNode::start(const NodeConfig& config,
                                                        PrefillResources resources) {
  auto impl = std::make_unique<Impl>(config);
  KVGATE_RETURN_IF_ERROR(impl->init(std::move(resources)));
  return std::unique_ptr<PrefillNode>(new PrefillNode(std::move(impl)));
}

void PrefillNode::stop() {
  if (impl_) impl_->stop();
}

NodeId PrefillNode::node_id() const { return impl_->node_id_; }
const std::string& PrefillNode::node_name() const { return impl_->node_name_; }
HostPort PrefillNode::listen_address() const { return impl_->listen_address_; }
const control::Bytes& PrefillNode::transport_address() const { return impl_->transport_address_; }
std::optional<HostPort> PrefillNode::metrics_address() const { return impl_->metrics_address_; }
int PrefillNode::registered_coordinators() const { return impl_->registered(); }
QueueStats PrefillNode::queue_stats() const { return impl_->queue().stats(); }
std::string PrefillNode::metrics_text() const { return impl_->metrics().serialize(); }
void PrefillNode::set_paused_for_test(bool paused) { impl_->queue().set_paused(paused); }

}  // namespace kvgate::prefill
