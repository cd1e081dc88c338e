// ClusterBackend: the coordinator's Backend over the control plane
// (DESIGN.md §1, §7; docs/cluster.md). Each request gets a reservation on a
// decode node, a prefill job on a prefill node, and its tokens relayed from
// the decode node to the HTTP sink; membership, footprint prediction,
// placement and failure handling live in ClusterScheduler
// (coordinator/cluster_scheduler.h), which this class drives.
//
// Owns one io_context and its thread: the control listener on
// coordinator.control_listen (nodes register there; the cluster token, the
// role and the served model name are checked before HelloAck), every node
// connection, and a timer that ticks the scheduler's deadlines every
// tick_interval.
//
// Threads: submit/cancel/health/models may be called from any thread and
// never block on I/O: they take the backend's lock for the scheduler's
// bookkeeping (microseconds) and queue messages on the connections. Node
// events run on the io thread under the same lock. Sinks are called under
// that lock, one call at a time (backend.h's contract): they must only
// record and post, never call back into the backend.
//
// Shutdown: shutdown() (or the destructor) fails the requests still running
// (kCancelled, 503), sends Cancel to their nodes, closes the node
// connections (letting queued messages drain, bounded by the channel's
// close_timeout) and joins the thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/control_channel.h"
#include "common/status.h"
#include "coordinator/backend.h"
#include "coordinator/cluster_scheduler.h"
#include "coordinator/footprint_predictor.h"
#include "coordinator/membership.h"
#include "engine/model.h"

namespace prometheus {
class Registry;
}

namespace kvgate::coordinator {

struct ClusterBackendOptions {
  ClusterSchedulerOptions scheduler;
  HostPort control_listen{"127.0.0.1", 7000};  // port 0: any free port (control_address())
  control::ChannelOptions channel;             // cluster token, frame limit, timeouts
  std::chrono::milliseconds tick_interval{20};
};

// A node as the coordinator sees it (for tests, tools and logs).
struct ClusterNodeSnapshot {
  NodeId id;
  control::NodeRole role = control::NodeRole::kPrefill;
  std::string name;
  NodeState state = NodeState::kLive;
  std::string down_reason;
  uint64_t heartbeats = 0;
  uint64_t free_bytes = 0;     // decode: for placement (heartbeat minus outstanding)
  uint64_t queued_tokens = 0;  // prefill: heartbeat plus jobs sent since
};

class ClusterBackend final : public Backend {
 public:
  // Binds the control listener (UNAVAILABLE naming the address when taken)
  // and starts the io thread. Metrics go to `registry` (null: none); log
  // lines to `log` (null: common/log.h at info level).
  static Result<std::unique_ptr<ClusterBackend>> start(
      ClusterBackendOptions options, FootprintPredictor predictor,
      std::shared_ptr<prometheus::Registry> registry = nullptr, ClusterLog log = nullptr);

  // Everything from a coordinator's config and its (mapped) model: the KV
  // policy of the `kv` section (the gate side file is read for gate
  // policies), decode.page_tokens and decode.lease_ttl of the cluster's
  // shared config, the cluster token (cluster.token / token_file). Errors
  // name the key or file.
  static Result<std::unique_ptr<ClusterBackend>> from_config(
      const NodeConfig& config, const engine::LlamaModel& model,
      std::shared_ptr<prometheus::Registry> registry = nullptr);

  ~ClusterBackend() override;  // shutdown()
  ClusterBackend(const ClusterBackend&) = delete;
  ClusterBackend& operator=(const ClusterBackend&) = delete;

  Status submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink) override;
  void cancel(RequestId id) override;
  // Ready when at least one live prefill and one live decode node serve
  // the model; otherwise the reason.
  BackendHealth health() const override;
  std::vector<BackendModel> models() const override;

  // The bound control address (the port filled in when 0 was asked).
  HostPort control_address() const;
  NodeId node_id() const;
  std::vector<ClusterNodeSnapshot> nodes() const;
  control::ListenerCounters listener_counters() const;
  // Running keep-rate of the prompt length's bucket.
  double keep_rate(int64_t prompt_tokens) const;

  // Idempotent; blocks until the io thread has joined (at most about the
  // channel's close_timeout). submit() fails afterwards (kUnavailable).
  void shutdown();

 private:
  struct Impl;
  explicit ClusterBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvgate::coordinator
