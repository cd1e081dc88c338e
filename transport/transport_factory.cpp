// The registry of transports: the one place that knows which are built.
#include "transport/loopback/loopback_transport.h"
#include "transport/nccl/nccl_transport.h"
#include "transport/transport.h"

#if KVGATE_HAVE_UCX
#include "transport/ucx/ucx_transport.h"
#endif

namespace kvgate::transport {

std::string_view transport_kind_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::kUcx: return "ucx";
    case TransportKind::kLoopback: return "loopback";
    case TransportKind::kNccl: return "nccl";
  }
  return "unknown";
}

Result<std::unique_ptr<Transport>> create_transport(const TransportConfig& config,
                                                    const TransportOptions& options) {
  switch (config.kind) {
    case TransportKind::kLoopback:
      return LoopbackTransport::create(options);
    case TransportKind::kUcx:
#if KVGATE_HAVE_UCX
      return UcxTransport::create(config, options);
#else
      return unimplemented("transport: ucx: this build has no UCX (configure with -DKVGATE_UCX=ON and libucx-dev)");
#endif
    case TransportKind::kNccl:
      // Needs this rank's communicator, which a config cannot carry: the
      // node registers it (set_nccl_link_provider); the error names it.
      return create_nccl_transport_from_provider(options);
  }
  return invalid_argument("transport: unknown transport kind");
}

}  // namespace kvgate::transport
