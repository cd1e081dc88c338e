// UcxTransport: the production transport over UCX's UCP layer (DESIGN.md §6).
//
// One worker per Transport (UcxContext); endpoints are created from the
// peer's worker address with peer error handling, so a lost peer fails its
// endpoint and every request on it. Three active-message ids:
//   kAmControl  wire messages (Hello, Manifest, verdicts), forced eager,
//               reassembled by UCX; a control message that arrives as a
//               rendezvous is rejected and counted.
//   kAmData     a segment: the Segment header as the AM header, the bytes
//               as the payload. Rendezvous payloads are received with
//               ucp_am_recv_data_nbx into the posted pages (see "Landing").
//               Eager payloads (small segments) are copied once from UCX's
//               receive buffer into the pages, checksummed as they are.
//   kAmTagHeader (op tag) a segment's header alone, forced eager. The
//               payload follows as a tagged message (ucp_tag_send_nbx from
//               the sender's buffer); the receiver, on the header, posts
//               ucp_tag_recv_nbx straight into the pages (iov across
//               pages). The tag is a 64-bit mix of the sender's connection
//               nonce, the transfer id and the segment index, so only the
//               authenticated peer that announced the segment can match it
//               (an unauthenticated endpoint cannot guess the nonce; the
//               CRC32C check stands behind it). A header the receiver
//               refuses from an authenticated peer gets a zero-byte receive
//               that consumes the sender's message (truncated), so the
//               sender's request completes as with a refused rendezvous.
//               Pre-posted receives are cancelled when their peer is lost,
//               their transfer is erased, or the transport is destroyed.
//               Tagged messages nobody announced (an unauthenticated
//               endpoint's, a payload racing its header) are taken out of
//               UCX's unexpected queue every sweep and held at most
//               kHoldUnexpected, then discarded (truncated): bounded memory.
// Landing: over transports where the CPU copies every received byte out of
// UCX's bounce buffers anyway (transport.ucx_tls naming only tcp, posix,
// sysv, self), a rendezvous or tagged payload is received through a UCX
// generic datatype whose unpack callback copies each fragment into the
// pages and extends the segment's CRC32C over it while it is still in
// cache; the completed segment needs no second pass over its bytes (the
// core checks the CRC against the manifest as always). Fragments out of
// order (not seen over one tcp lane) fall back to a pass after landing.
// Elsewhere (RDMA, cma/knem, or UCX's choice when ucx_tls is empty) the
// payload lands zero-copy in the pages (contiguous or iov) and the core
// checksums it after. `landing_name()` says which.
// On the wire the tag op announces itself as active messages (the segment
// header protocol is the same); a receiver accepts am and tag from any peer.
// With DataOp put the sender writes the pages itself (ucp_put_nbx with the
// rkey from the peer's address), flushes the endpoint, then sends the
// manifest; the receiver only verifies.
//
// ucx_op: am → active messages; tag → tagged messages; put → one-sided
// put; auto → put only when transport.ucx_tls names an RDMA transport (rc*,
// dc*, ud*, ib, mlx5*), else am (README: measured per transport).
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
  // "am", "tag" or "put": the data op this side uses to send.
  std::string_view op_name() const;
  // "copy+crc" (generic datatype, checksummed while landing) or "direct".
  std::string_view landing_name() const { return landing_dt_ ? "copy+crc" : "direct"; }
  // Whether `tls` (transport.ucx_tls) lands received bytes through a CPU
  // copy anyway: every entry tcp, posix, sysv or self.
  static bool lands_by_copy(const std::vector<std::string>& tls);

  // The op `config.ucx_op` selects (see above): kAm, kTag or kPut.
  static Result<UcxOp> choose_op(const TransportConfig& config);

 protected:
  Status link_connect(PeerId peer, std::span<const std::byte> address) override;
  Status link_send_control(PeerId peer, Bytes message) override;
  Status link_send_segment(SegmentOp op) override;
  Status link_flush(PeerId peer, uint64_t cookie) override;
  void link_progress() override;

 private:
  struct Peer;
  struct Op;
  struct LandingDt;  // the generic datatype's callbacks

  UcxTransport(const TransportOptions& options, UcxOp op, std::unique_ptr<UcxContext> ctx);
  Status install_handlers();
  Status create_landing_datatype();
  // Fills the receive's buffer/count/datatype for `op` landing in `pieces`.
  void set_landing(Op* op, std::vector<std::pair<std::byte*, size_t>>&& pieces, uint64_t bytes,
                   ucp_request_param_t& prm, void*& buffer, size_t& count);
  Peer* live_peer(PeerId peer);
  Op* new_op(int kind, uint64_t cookie);
  void track(Op* op, ucs_status_ptr_t request);
  void complete(Op* op, ucs_status_t status);
  void close_peer(Peer& p, bool force);
  Status send_tagged(Peer& p, SegmentOp& seg);
  // Cancels pre-posted tag receives of `peer` (0: all), or, with
  // only_dead, those whose transfer the core erased.
  void cancel_tag_receives(uint64_t peer, bool only_dead);
  // Receives a tagged payload into buffer/count (count 0: discards it).
  void receive_tagged(uint64_t tag, void* buffer, size_t count, ucp_request_param_t prm, Op* op);
  void sweep_unexpected(bool discard_all);

  static void on_send(void* request, ucs_status_t status, void* user_data);
  static void on_recv(void* request, ucs_status_t status, size_t length, void* user_data);
  static void on_tag_recv(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                          void* user_data);
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status);
  static ucs_status_t on_am_control(void* arg, const void* header, size_t header_length, void* data,
                                    size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t on_am_data(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t on_am_tag_header(void* arg, const void* header, size_t header_length, void* data,
                                       size_t length, const ucp_am_recv_param_t* param);

  std::unique_ptr<UcxContext> ctx_;
  UcxOp data_op_;  // kAm, kTag or kPut
  ucp_datatype_t landing_dt_ = 0;  // nonzero: land through the copy+crc generic datatype
  Clock::time_point next_sweep_{};  // next check for tag receives of erased transfers
  struct Held {
    ucp_tag_message_h message;
    Clock::time_point seen;
  };
  std::unordered_map<uint64_t, Held> held_;  // by tag: unexpected, not yet announced
  Bytes address_;
  bool closing_ = false;
  std::unordered_map<uint64_t, std::unique_ptr<Peer>> peers_;
  std::unordered_set<Op*> live_ops_;
  std::vector<uint64_t> failed_peers_;  // reported by on_ep_error, handled after progress
};

}  // namespace kvgate::transport
