// UcxTransport: the production transport over UCX's UCP layer (DESIGN.md §6).
//
// One worker per Transport (UcxContext); endpoints are created from the
// peer's worker address with peer error handling, so a lost peer fails its
// endpoint and every request on it. Two active-message ids:
//   kAmControl  wire messages (Hello, Manifest, verdicts), forced eager,
//               reassembled by UCX; a control message that arrives as a
//               rendezvous is rejected and counted.
//   kAmData     a segment: the Segment header as the AM header, the bytes
//               as the payload. Rendezvous payloads are received with
//               ucp_am_recv_data_nbx straight into the posted pages (an iov
//               when the segment spans several pages): no extra copy.
//               Eager payloads (small segments) are copied once from UCX's
//               receive buffer into the pages.
// With DataOp put the sender writes the pages itself (ucp_put_nbx with the
// rkey from the peer's address), flushes the endpoint, then sends the
// manifest; the receiver only verifies.
//
// ucx_op: am → active messages; put → one-sided put; auto → put only when
// transport.ucx_tls names an RDMA transport (rc*, dc*, ud*, ib, mlx5*),
// else am (STACK.md: put over UCX 1.13 tcp collapses to ~0.16 GB/s at
// 16 MiB while AM rendezvous does 5–6 GB/s); tag → UNIMPLEMENTED (the AM
// path is the same rendezvous without receiver pre-posting).
//
// Address blob: "KVGU", version u8, worker address (u32 length + bytes),
// region base u64, region bytes u64, packed rkey (u32 length + bytes).
//
// Threading: owner thread only. All UCX callbacks run inside progress()
// (ucp_worker_progress), so no locks are needed. The destructor blocks for
// at most ~1.5 s: it says goodbye to peers and closes endpoints gracefully.
#pragma once

#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "transport/transport_core.h"
#include "transport/ucx/ucx_context.h"

namespace kvgate::transport {

class UcxTransport final : public TransportCore {
 public:
  static Result<std::unique_ptr<Transport>> create(const TransportConfig& config,
                                                   const TransportOptions& options);
  ~UcxTransport() override;

  std::string_view name() const override { return "ucx"; }
  Result<Bytes> address() override { return address_; }
  // "am" or "put": the data op this side uses to send.
  std::string_view op_name() const;

  // The op `config.ucx_op` selects (see above).
  static Result<wire::DataOp> choose_op(const TransportConfig& config);

 protected:
  Status link_connect(PeerId peer, std::span<const std::byte> address) override;
  Status link_send_control(PeerId peer, Bytes message) override;
  Status link_send_segment(SegmentOp op) override;
  Status link_flush(PeerId peer, uint64_t cookie) override;
  void link_progress() override;

 private:
  struct Peer;
  struct Op;

  UcxTransport(const TransportOptions& options, wire::DataOp op, std::unique_ptr<UcxContext> ctx);
  Status install_handlers();
  Peer* live_peer(PeerId peer);
  Op* new_op(int kind, uint64_t cookie);
  void track(Op* op, ucs_status_ptr_t request);
  void complete(Op* op, ucs_status_t status);
  void close_peer(Peer& p, bool force);

  static void on_send(void* request, ucs_status_t status, void* user_data);
  static void on_recv(void* request, ucs_status_t status, size_t length, void* user_data);
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status);
  static ucs_status_t on_am_control(void* arg, const void* header, size_t header_length, void* data,
                                    size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t on_am_data(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param);

  std::unique_ptr<UcxContext> ctx_;
  Bytes address_;
  bool closing_ = false;
  std::unordered_map<uint64_t, std::unique_ptr<Peer>> peers_;
  std::unordered_set<Op*> live_ops_;
  std::vector<uint64_t> failed_peers_;  // reported by on_ep_error, handled after progress
};

}  // namespace kvgate::transport
