// DecodeNode: a decode node's process-level wiring (docs/cluster.md): the
// model, the DecodeEngine (engine thread), the control plane (one
// io_context thread) and the metrics endpoint.
//
// Control plane (io thread):
//   - a registration connection to every cluster.coordinators entry:
//     Hello{role decode, node id, name, served model, control address,
//     transport name and address}; reconnect with backoff 100 ms doubling
//     to 2 s, registering again with the same node id; a Heartbeat every
//     HelloAck::heartbeat_interval with the pool's free/reserved/used bytes,
//     the transfers waiting, the context tokens held and the requests in
//     flight. Reserve/Cancel/Release on it go to the engine; the engine
//     answers on the same connection.
//   - a listener on decode.listen for prefill nodes (TransferManifest,
//     Extend), whose answers (TransferResult, ExtendResult) go back on the
//     connection they came on.
//   - metrics: prometheus-cpp Exposer on metrics.listen (when enabled).
//
// stop() drains: stops accepting, the engine fails in-flight requests with
// a clear Error, the connections are closed once their queued messages are
// written (bounded wait), then the threads are joined.
//
// Threading: start()/stop() from one controlling thread (main); the rest
// runs on the io and engine threads. Accessors are thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "common/config.h"
#include "common/control_protocol.h"
#include "common/status.h"
#include "decode/decode_engine.h"
#include "transport/transport.h"

namespace kvgate::decode {

struct DecodeNodeOptions {
  // Tests only: fault injection into the transport.
  transport::TestHooks transport_hooks;
};

class DecodeNode {
 public:
  // Loads the model (model.path), its tokenizer and gate side file (kv.gate_file,
  // or the one next to the model if present: gate policies need it), starts
  // the engine, the listener, the registration connections and the metrics
  // endpoint. Errors name the config key or the file.
  static Result<std::unique_ptr<DecodeNode>> start(const NodeConfig& config,
                                                   DecodeNodeOptions options = {});
  ~DecodeNode();
  DecodeNode(const DecodeNode&) = delete;
  DecodeNode& operator=(const DecodeNode&) = delete;

  // Drains and stops (see above). Idempotent.
  void stop();

  NodeId node_id() const;
  const std::string& node_name() const;
  // The bound control address (decode.listen with the port filled in).
  HostPort control_address() const;
  // The bound metrics port (0 when metrics are disabled).
  uint16_t metrics_port() const;
  // Registration connections live now (HelloAck received, not closed).
  int registered_coordinators() const;
  DecodeStats stats() const;
  const DecodeEngine& engine() const;

 private:
  struct Impl;
  explicit DecodeNode(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvgate::decode
