#include "decode/decode_node.h"

#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "common/control_channel.h"
#include "common/log.h"
#include "engine/gate_file.h"
#include "engine/kv_policy_spec.h"

#if KVGATE_HAVE_CUDA
#include "engine/cuda/cuda_batch_decode.h"
#include "engine/cuda/device_page_pool.h"
#endif

namespace kvgate::decode {

namespace asio = boost::asio;
using control::ConnectionPtr;

namespace {

// engine.backend: cuda — the decode step on the GPU: a DevicePagePool the
// size of the host pool (decode.pool_bytes), the model on the device
// (CudaForward) and CudaBatchDecoder; KV lands in host pages and moves to
// the device at admission (decode/device_pages.h).
Result<std::shared_ptr<DecodeDevice>> cuda_decode_device(const NodeConfig& config,
                                                         const engine::LlamaModel& model) {
#if KVGATE_HAVE_CUDA
  const engine::LlamaConfig& c = model.config();
  const int64_t page_bytes = config.decode.page_tokens * c.head_dim * kvstore::kKvElementBytes;
  auto pool = engine::cuda::DevicePagePool::create(page_bytes, config.decode.pool_bytes);
  if (!pool.ok()) {
    return Status(pool.status().code(), "engine.backend: cuda: decode.pool_bytes on the device: " +
                                            pool.status().message());
  }
  engine::cuda::CudaForwardOptions fo;
  const int64_t context = config.model.max_context_tokens > 0
                              ? std::min<int64_t>(config.model.max_context_tokens, c.n_ctx_train)
                              : c.n_ctx_train;
  fo.max_decode_batch = std::max<int64_t>(1, config.decode.max_batch_requests);
  fo.max_prefill_tokens = std::max<int64_t>(64, fo.max_decode_batch);
  // The forward's own dense cache is unused here (compressed steps only):
  // keep it small.
  fo.max_context_tokens = std::max<int64_t>(fo.max_prefill_tokens, 256);
  auto fwd = engine::cuda::CudaForward::create(engine::cuda::HostWeights::of(model), fo);
  if (!fwd.ok()) {
    return Status(fwd.status().code(), "engine.backend: cuda: " + fwd.status().message());
  }
  struct Owned {
    std::unique_ptr<engine::cuda::DevicePagePool> pool;
    std::unique_ptr<engine::cuda::CudaForward> forward;
    std::unique_ptr<engine::cuda::CudaBatchDecoder> batch;
  };
  auto owned = std::make_shared<Owned>();
  owned->pool = std::move(*pool);
  owned->forward = std::move(*fwd);
  engine::cuda::DevicePagePool* p = owned->pool.get();
  engine::cuda::CudaForward* f = owned->forward.get();
  // Reads (adopt's position check after a move) flush and copy on the
  // forward's stream, ordered with its kernels.
  p->set_read_stream(f->stream());
  owned->batch = std::make_unique<engine::cuda::CudaBatchDecoder>(
      *f, [p](cudaStream_t stream) { return p->flush(stream); });
  auto dev = std::make_shared<DecodeDevice>();
  dev->pool = p;
  dev->step = [b = owned->batch.get()](std::span<const engine::DecodeItem> items,
                                       std::span<float> logits, std::span<Status> statuses) {
    return b->step(items, logits, statuses);
  };
  dev->after_move = [p, f] { return p->flush(f->stream()); };
  dev->name = "cuda";
  dev->keep_alive = owned;
  log::info("decode engine on the GPU",
            {{"backend", "cuda"},
             {"device_pool_bytes", p->capacity_bytes()},
             {"context_tokens", context},
             {"kv_path", "transport -> host pages -> device pages at admission"}});
  return dev;
#else
  (void)config;
  (void)model;
  return unimplemented(
      "engine.backend: cuda: this build has no CUDA backend (configure with -DKVGATE_CUDA=ON "
      "on a machine with the CUDA toolkit)");
#endif
}

constexpr std::chrono::milliseconds kBackoffFirst{100};
constexpr std::chrono::milliseconds kBackoffMax{2000};
constexpr std::chrono::milliseconds kDrainTimeout{3000};

NodeId random_node_id() {
  std::random_device rd;
  std::mt19937_64 rng((static_cast<uint64_t>(rd()) << 32) ^ rd() ^
                      static_cast<uint64_t>(Clock::now().time_since_epoch().count()));
  uint64_t v = 0;
  while (v == 0) v = rng();
  return NodeId(v);
}

engine::cpu::Isa isa_of(IsaChoice choice) {
  switch (choice) {
    case IsaChoice::kScalar: return engine::cpu::Isa::kScalar;
    case IsaChoice::kAvx2: return engine::cpu::Isa::kAvx2;
    case IsaChoice::kAvx512: return engine::cpu::Isa::kAvx512;
    case IsaChoice::kAuto: break;
  }
  return engine::cpu::best_isa();
}

}  // namespace

struct DecodeNode::Impl {
  NodeConfig config;
  NodeId node_id;
  std::string node_name;
  std::unique_ptr<engine::LlamaModel> model;
  std::unique_ptr<engine::Tokenizer> tokenizer;
  std::shared_ptr<prometheus::Registry> registry;
  std::unique_ptr<DecodeMetrics> metrics;
  std::unique_ptr<prometheus::Exposer> exposer;
  uint16_t metrics_port = 0;
  std::unique_ptr<DecodeEngine> engine;

  control::ChannelOptions channel;
  asio::io_context io;
  std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::thread io_thread;
  std::shared_ptr<control::Listener> listener;
  HostPort bound;

  // One per coordinator; io thread only (besides `live`).
  struct Registration {
    HostPort address;
    ConnectionPtr conn;
    std::unique_ptr<asio::steady_timer> retry;
    std::unique_ptr<asio::steady_timer> heartbeat;
    std::chrono::milliseconds backoff = kBackoffFirst;
    std::chrono::milliseconds interval{0};
    uint64_t sequence = 0;
  };
  std::vector<std::unique_ptr<Registration>> registrations;

  // Connections open now (both kinds), for the drain; guarded by mu.
  mutable std::mutex mu;
  std::condition_variable cv;
  std::set<ConnectionPtr> open;
  int registered = 0;
  std::atomic<bool> stopping{false};
  bool stopped = false;

  control::Hello hello() const {
    control::Hello h;
    h.role = control::NodeRole::kDecode;
    h.node_id = node_id;
    h.node_name = node_name;
    h.model_name = served_model_name(config.model);
    const std::string host =
        config.cluster.advertise_host.empty() ? bound.host : config.cluster.advertise_host;
    h.control_address = HostPort{host, bound.port}.to_string();
    h.transport_name = engine->transport_name();
    h.transport_address = engine->transport_address();
    return h;
  }

  void track(const ConnectionPtr& c, bool registration) {
    std::lock_guard<std::mutex> lock(mu);
    open.insert(c);
    if (registration) ++registered;
  }
  void untrack(const ConnectionPtr& c, bool registration) {
    std::lock_guard<std::mutex> lock(mu);
    if (open.erase(c) != 0 && registration) --registered;
    cv.notify_all();
  }

  control::ConnectionHandlers handlers(bool registration, Registration* reg) {
    control::ConnectionHandlers h;
    h.on_message = [this](const ConnectionPtr& c, control::Message m) {
      engine->post(c, std::move(m));
    };
    h.on_closed = [this, registration, reg](const ConnectionPtr& c, const Status& why) {
      engine->post_closed(c);
      untrack(c, registration);
      if (registration && reg != nullptr) {
        log::warn("coordinator connection closed",
                  {{"coordinator", reg->address.to_string()}, {"status", why}});
        if (reg->conn == c) reg->conn.reset();
        if (reg->heartbeat) reg->heartbeat->cancel();
        schedule_connect(reg);
      }
    };
    return h;
  }

  void connect(Registration* reg) {
    if (stopping.load()) return;
    control::connect_control(
        io, reg->address, hello(), channel, handlers(true, reg),
        [this, reg](Result<ConnectionPtr> conn, const control::HelloAck& ack) {
          if (!conn.ok()) {
            log::warn("coordinator registration failed",
                      {{"coordinator", reg->address.to_string()}, {"status", conn.status()}});
            schedule_connect(reg);
            return;
          }
          if (stopping.load()) {
            (*conn)->close(Status(StatusCode::kUnavailable, "decode node shutting down"));
            return;
          }
          reg->conn = *conn;
          reg->backoff = kBackoffFirst;
          reg->interval = ack.heartbeat_interval;
          reg->sequence = 0;
          track(*conn, true);
          log::info("registered with coordinator",
                    {{"coordinator", reg->address.to_string()}, {"coordinator_node", ack.node_id}});
          send_heartbeat(reg);
        });
  }

  void schedule_connect(Registration* reg) {
    if (stopping.load()) return;
    reg->retry->expires_after(reg->backoff);
    reg->backoff = std::min(reg->backoff * 2, kBackoffMax);
    reg->retry->async_wait([this, reg](const boost::system::error_code& ec) {
      if (!ec) connect(reg);
    });
  }

  void send_heartbeat(Registration* reg) {
    if (!reg->conn || !reg->conn->is_open() || stopping.load()) return;
    const DecodeStats s = engine->stats();
    control::Heartbeat hb;
    hb.node_id = node_id;
    hb.sequence = ++reg->sequence;
    hb.pool_free_bytes = static_cast<uint64_t>(s.leases.free_bytes);
    hb.pool_reserved_bytes = static_cast<uint64_t>(s.leases.reserved_bytes);
    hb.pool_used_bytes = static_cast<uint64_t>(s.leases.used_bytes);
    hb.queue_length = s.waiting_transfers;
    hb.queued_tokens = s.context_tokens;
    hb.in_flight_requests = s.waiting_transfers + s.active_sequences;
    reg->conn->send(hb);
    if (reg->interval.count() <= 0) return;
    reg->heartbeat->expires_after(reg->interval);
    reg->heartbeat->async_wait([this, reg](const boost::system::error_code& ec) {
      if (!ec) send_heartbeat(reg);
    });
  }
};

DecodeNode::DecodeNode(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<DecodeNode>> DecodeNode::start(const NodeConfig& config,
                                                      DecodeNodeOptions options) {
  auto impl = std::make_unique<Impl>();
  Impl& n = *impl;
  n.config = config;
  n.node_id = random_node_id();
  n.node_name = config.cluster.node_name.empty()
                    ? "decode-" + config.decode.listen.host + "-" +
                          std::to_string(config.decode.listen.port)
                    : config.cluster.node_name;

  const std::string& path = config.model.path;
  if (path.empty()) return invalid_argument("model.path: required");
  auto with_path = [&](const Status& s) { return Status(s.code(), path + ": " + s.message()); };
  auto model = engine::LlamaModel::load(path);
  if (!model.ok()) return with_path(model.status());
  n.model = std::move(*model);
  auto spec = engine::tokenizer_spec_from_gguf(n.model->gguf());
  if (!spec.ok()) return with_path(spec.status());
  auto tok = engine::Tokenizer::create(std::move(*spec));
  if (!tok.ok()) return with_path(tok.status());
  n.tokenizer = std::make_unique<engine::Tokenizer>(std::move(*tok));
  // The gate model: requests under gate policies need it; others do not.
  std::shared_ptr<const engine::GateModel> gate;
  std::string gate_path = config.kv.gate_file;
  if (gate_path.empty()) {
    std::error_code ec;
    const std::string candidate = engine::default_gate_path(path);
    if (std::filesystem::is_regular_file(candidate, ec)) gate_path = candidate;
  }
  if (!gate_path.empty()) {
    auto g = engine::load_gate_for_model(gate_path, *n.model);
    if (!g.ok()) return Status(g.status().code(), "kv.gate_file: " + g.status().message());
    gate = std::make_shared<const engine::GateModel>(std::move(*g));
  }

  auto token = control::read_cluster_token(config.cluster);
  if (!token.ok()) return token.status();
  n.channel = control::channel_options(config.cluster, *token);

  n.registry = std::make_shared<prometheus::Registry>();
  n.metrics = std::make_unique<DecodeMetrics>(n.registry);
  if (config.metrics.enabled) {
    try {
      n.exposer = std::make_unique<prometheus::Exposer>(config.metrics.listen.to_string());
      n.exposer->RegisterCollectable(n.registry);
      const auto ports = n.exposer->GetListeningPorts();
      if (!ports.empty()) n.metrics_port = static_cast<uint16_t>(ports.front());
    } catch (const std::exception& e) {
      return unavailable("metrics.listen: cannot listen on " + config.metrics.listen.to_string() +
                         ": " + e.what());
    }
  }

  DecodeEngineOptions eo;
  eo.decode = config.decode;
  eo.transport = config.transport;
  eo.cluster_token = *token;
  eo.context_tokens = config.model.max_context_tokens;
  eo.forward.n_threads = static_cast<int>(config.engine.threads);
  eo.forward.max_batch_tokens = std::max<int64_t>(config.engine.max_batch_tokens,
                                                  config.decode.max_batch_requests);
  eo.forward.isa = isa_of(config.engine.isa);
  if (!engine::cpu::isa_supported(eo.forward.isa)) {
    return invalid_argument("engine.isa: this CPU does not support " +
                            std::string(engine::cpu::isa_name(eo.forward.isa)));
  }
  if (config.engine.backend == EngineBackend::kCuda) {
    KVGATE_ASSIGN_OR_RETURN(eo.device, cuda_decode_device(config, *n.model));
  }
  eo.node_name = n.node_name;
  eo.transport_hooks = std::move(options.transport_hooks);
  auto eng = DecodeEngine::start(*n.model, *n.tokenizer, gate, std::move(eo), n.metrics.get());
  if (!eng.ok()) return eng.status();
  n.engine = std::move(*eng);

  // Control plane.
  Impl* self = impl.get();
  control::ListenerOptions lo;
  lo.channel = n.channel;
  lo.accept_hello = [self](const control::Hello& h) -> Result<control::HelloAck> {
    if (h.role != control::NodeRole::kPrefill && h.role != control::NodeRole::kCoordinator) {
      return Status(StatusCode::kInvalidArgument,
                    "decode node: accepts prefill and coordinator connections, not " +
                        std::string(control::node_role_name(h.role)));
    }
    if (self->stopping.load()) return unavailable("decode node shutting down");
    control::HelloAck ack;
    ack.node_id = self->node_id;
    return ack;
  };
  lo.on_open = [self](const ConnectionPtr& c) { self->track(c, false); };
  lo.handlers = n.handlers(false, nullptr);
  auto listener = control::listen_control(n.io, config.decode.listen, std::move(lo));
  if (!listener.ok()) {
    return Status(listener.status().code(), "decode.listen: " + listener.status().message());
  }
  n.listener = std::move(*listener);
  n.bound = n.listener->local_address();
  n.work = std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(
      n.io.get_executor());
  for (const HostPort& c : config.cluster.coordinators) {
    auto reg = std::make_unique<Impl::Registration>();
    reg->address = c;
    reg->retry = std::make_unique<asio::steady_timer>(n.io);
    reg->heartbeat = std::make_unique<asio::steady_timer>(n.io);
    n.registrations.push_back(std::move(reg));
  }
  for (auto& reg : n.registrations) {
    asio::post(n.io, [self, r = reg.get()] { self->connect(r); });
  }
  n.io_thread = std::thread([self] { self->io.run(); });
  log::info("decode node started",
            {{"listen", n.bound.to_string()}, {"transport", n.engine->transport_name()},
             {"pool_bytes", config.decode.pool_bytes}, {"metrics_port", n.metrics_port}});
  return std::unique_ptr<DecodeNode>(new DecodeNode(std::move(impl)));
}

DecodeNode::~DecodeNode() {
  stop();
}

void DecodeNode::stop() {
  if (!impl_ || impl_->stopped) return;
  Impl& n = *impl_;
  n.stopped = true;
  n.stopping.store(true);
  // 1. No new connections, no reconnects, no heartbeats.
  asio::post(n.io, [&n] {
    if (n.listener) n.listener->stop();
    for (auto& reg : n.registrations) {
      reg->retry->cancel();
      reg->heartbeat->cancel();
    }
  });
  // 2. The engine fails what it holds (Errors queued on the connections).
  if (n.engine) n.engine->stop();
  // 3. Close every connection after its queued messages; wait, bounded.
  std::vector<ConnectionPtr> conns;
  {
    std::lock_guard<std::mutex> lock(n.mu);
    conns.assign(n.open.begin(), n.open.end());
  }
  for (const auto& c : conns) c->close(Status(StatusCode::kUnavailable, "decode node shutting down"));
  {
    std::unique_lock<std::mutex> lock(n.mu);
    n.cv.wait_for(lock, kDrainTimeout, [&] { return n.open.empty(); });
  }
  n.work.reset();
  n.io.stop();
  if (n.io_thread.joinable()) n.io_thread.join();
  n.listener.reset();
  n.registrations.clear();
  log::info("decode node stopped");
}

NodeId DecodeNode::node_id() const { return impl_->node_id; }
const std::string& DecodeNode::node_name() const { return impl_->node_name; }
HostPort DecodeNode::control_address() const { return impl_->bound; }
uint16_t DecodeNode::metrics_port() const { return impl_->metrics_port; }
int DecodeNode::registered_coordinators() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->registered;
}
DecodeStats DecodeNode::stats() const { return impl_->engine->stats(); }
const DecodeEngine& DecodeNode::engine() const { return *impl_->engine; }

}  // namespace kvgate::decode
