// UcxContext: the UCP objects one UcxTransport owns — context, worker, the
// registration of its memory region — created together, destroyed in
// reverse order. Nothing here sends or receives.
//
// Threading: the worker is created UCS_THREAD_MODE_SINGLE; the owner
// thread of the UcxTransport is the only one that touches it.
#pragma once

#include <ucp/api/ucp.h>

#include <memory>
#include <string_view>

#include "transport/transport.h"

namespace kvgate::transport {

// A UCS status as a kvgate Status: network failures are kUnavailable,
// cancellation kCancelled, out of memory kResourceExhausted, unsupported
// kUnimplemented, the rest kInternal. The message is "ucx: <what>: <ucs>".
Status ucx_status(ucs_status_t status, std::string_view what);

class UcxContext {
 public:
  // Reads UCX's environment, then applies config.ucx_tls/ucx_net_devices
  // (they win over UCX_TLS/UCX_NET_DEVICES), then kvgate's own UCX defaults
  // for variables the environment does not set (today only
  // UCX_TCP_RX_SEG_SIZE=512K; see ucx_context.cpp and the README). Enables
  // AM, RMA and TAG. Registers [region, +bytes) when region is not null.
  static Result<std::unique_ptr<UcxContext>> create(const TransportConfig& config, std::byte* region,
                                                    size_t region_bytes);
  ~UcxContext();
  UcxContext(const UcxContext&) = delete;
  UcxContext& operator=(const UcxContext&) = delete;

  ucp_context_h context() const { return context_; }
  ucp_worker_h worker() const { return worker_; }
  const Bytes& worker_address() const { return worker_address_; }
  const Bytes& packed_rkey() const { return packed_rkey_; }  // empty without a region

 private:
  UcxContext() = default;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_mem_h memh_ = nullptr;
  Bytes worker_address_;
  Bytes packed_rkey_;
};

}  // namespace kvgate::transport
