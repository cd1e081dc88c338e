// PrefillNode: the prefill node service (DESIGN.md §1, docs/cluster.md).
//
//   auto node = PrefillNode::start(config);   // model, transport, threads
//   ...                                       // serves until
//   (*node)->stop();                          // (or the destructor)
//
// What it runs:
//   - an io_context thread with the control connections: a registration
//     connection to every cluster.coordinators entry (Hello role prefill,
//     reconnect with backoff 100 ms doubling to 2 s, Heartbeat with the
//     queued jobs and prompt tokens every HelloAck::heartbeat_interval), a
//     listener on prefill.listen (jobs accepted there too), and one control
//     connection per decode node, opened on first use and kept;
//   - the engine thread (PrefillEngine): the CpuForward, the transport and
//     the page pools; one job at a time;
//   - with metrics.enabled, a Prometheus exposer on metrics.listen.
// Jobs are checked as they arrive (check_job: a bad one is answered with
// Error kInvalidArgument naming the field and takes no queue slot), queued
// up to prefill.max_queued_jobs / max_queued_tokens (then Error
// kResourceExhausted) and dropped again by Cancel{request} while queued.
//
// Threads: start/stop and the accessors may be called from any thread;
// stop() blocks until both threads have ended (a running job is aborted:
// its transfer cancelled and waited for).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "common/config.h"
#include "common/control_protocol.h"
#include "common/status.h"
#include "engine/gate.h"
#include "engine/model.h"
#include "prefill/job_queue.h"

namespace kvgate::prefill {

// What a caller may provide instead of having start() load it.
struct PrefillResources {
  // The model; null: loaded from config.model.path.
  std::shared_ptr<const engine::LlamaModel> model;
  // true: `gate` is this node's gate as given (null: none). false: the gate
  // file kv.gate_file, or the side file next to the model if it exists.
  bool gate_given = false;
  std::shared_ptr<const engine::GateModel> gate;
};

class PrefillNode {
 public:
  // Loads the model (and gate), creates the transport (transport section),
  // binds prefill.listen (port 0: any) and the metrics port, starts the
  // threads and the registrations. Errors name the key or file: the model
  // or gate cannot load, the listen address cannot bind, the transport
  // cannot start, the cluster token is missing.
  static Result<std::unique_ptr<PrefillNode>> start(const NodeConfig& config,
                                                    PrefillResources resources = {});
  ~PrefillNode();
  PrefillNode(const PrefillNode&) = delete;
  PrefillNode& operator=(const PrefillNode&) = delete;

  // Stops serving: listener, connections, engine. Idempotent.
  void stop();

  NodeId node_id() const;
  const std::string& node_name() const;
  // The bound control listener (prefill.listen with the real port).
  HostPort listen_address() const;
  // The transport's address blob (Hello::transport_address).
  const control::Bytes& transport_address() const;
  // The bound metrics address, when metrics are enabled.
  std::optional<HostPort> metrics_address() const;
  // Coordinators with a live registration (HelloAck received).
  int registered_coordinators() const;
  QueueStats queue_stats() const;
  // Every metric in the Prometheus text format.
  std::string metrics_text() const;

  // Tests: while paused the engine takes no new job (they stay queued).
  void set_paused_for_test(bool paused);

  class Impl;

 private:
  explicit PrefillNode(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvgate::prefill
