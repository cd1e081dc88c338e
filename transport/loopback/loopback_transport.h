// LoopbackTransport: in-process transport for tests and single-process use.
//
// Transports of one process find each other through a process-wide
// registry; the address blob names a registry entry. Messages go into the
// peer's inbox (a mutex-guarded queue, so the two Transports may be owned
// by different threads). A data segment travels as a reference to the
// sender's bytes, like a rendezvous: the receiver's progress() validates
// the header and copies straight into the posted pages (the one copy of
// the transfer), then tells the sender the segment completed. The copy
// runs under the registry lock and only while the sender is registered, so
// a sender destroyed mid-transfer is never read after its destructor ran.
//
// Data op: always active-message style (ucx_op does not apply).
// Threading: one owner thread per Transport, as for every Transport.
#pragma once

#include <memory>
#include <unordered_map>

#include "transport/transport_core.h"

namespace kvgate::transport {

class LoopbackTransport final : public TransportCore {
 public:
  static Result<std::unique_ptr<Transport>> create(const TransportOptions& options);
  ~LoopbackTransport() override;

  std::string_view name() const override { return "loopback"; }
  Result<Bytes> address() override;

  struct Inbox;  // defined in the .cpp

 protected:
  Status link_connect(PeerId peer, std::span<const std::byte> address) override;
  Status link_send_control(PeerId peer, Bytes message) override;
  Status link_send_segment(SegmentOp op) override;
  Status link_flush(PeerId peer, uint64_t cookie) override;
  void link_progress() override;

 private:
  explicit LoopbackTransport(const TransportOptions& options);

  uint64_t instance_ = 0;
  std::unique_ptr<Inbox> inbox_;
  std::unordered_map<uint64_t, uint64_t> peer_instance_;  // PeerId -> remote instance
};

}  // namespace kvgate::transport
