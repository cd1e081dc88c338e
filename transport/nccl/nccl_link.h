// The two links the nccl transport (nccl_transport.h) runs over:
//
//   NcclDataLink     point-to-point byte moves between ranks of one NCCL
//                    communicator (ncclSend/ncclRecv), into and out of
//                    device memory. NCCL matches a rank pair's sends and
//                    receives in the order they were issued and needs equal
//                    sizes on both sides; it cannot carry a message the
//                    receiver did not expect. Implementations: NcclCommLink
//                    (nccl_comm_link.h, over an ncclComm_t, built with
//                    KVGATE_NCCL) and FakeNcclLink (fake_nccl_link.h, host
//                    memory, in one process, for tests).
//   NcclControlLink  ordered, reliable frames of any size between two
//                    endpoints, opened from an address blob: carries the
//                    transport's control messages (handshake, Begin,
//                    Manifest, verdicts) and the announcements of data
//                    (which receives to post, in which order).
//                    Implementations: TcpControlLink (tcp_control_link.h,
//                    Boost.Asio, across processes and nodes) and
//                    LocalControlLink (local_control_link.h, in one process:
//                    tests, one process driving several GPUs).
//
// Threading: a link is used by the owner thread of its transport; the
// implementations here may be shared by transports on different threads
// (their process-wide state is behind a mutex).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "transport/transport.h"

namespace kvgate::transport {

class NcclDataLink {
 public:
  // A posted operation. Opaque; valid until poll() reported it finished.
  using OpId = uint64_t;
  enum class OpState : uint8_t { kPending, kOk, kError };

  virtual ~NcclDataLink() = default;

  virtual int rank() const = 0;
  virtual int world() const = 0;

  // Posts a send of `bytes` at `data` (device memory for NcclCommLink) to
  // `peer`; the bytes must stay valid until the op finished. It pairs with
  // the peer's next unmatched post_recv from this rank, whose size must be
  // equal. INVALID_ARGUMENT: peer outside [0, world) or this rank, zero
  // bytes; UNAVAILABLE: the link is broken (every later call fails too).
  virtual Result<OpId> post_send(int peer, const void* data, size_t bytes) = 0;
  // Posts a receive of exactly `bytes` into `data` from `peer`.
  // An op that ends with DATA_LOSS tells that the pair is out of step (the
  // fake: a size mismatch; NCCL itself cannot tell): no later op of that
  // pair can be trusted.
  virtual Result<OpId> post_recv(int peer, void* data, size_t bytes) = 0;
  // Non-blocking. kOk / kError end the op (the id is forgotten; `error`
  // gets the reason of kError); a finished or unknown id is kError.
  virtual OpState poll(OpId op, Status* error) = 0;

  // CRC32C of `bytes` at `data` continuing `seed`, exactly as common/crc32c
  // computes it, where the link's memory can be read: on the device for
  // NcclCommLink (blocking until the kernel finished), on the host for the
  // fake.
  virtual uint32_t crc32c(const void* data, size_t bytes, uint32_t seed) = 0;
};

class NcclControlLink {
 public:
  using ChannelId = uint64_t;
  struct Event {
    enum Kind : uint8_t { kFrame, kClosed } kind = kFrame;
    ChannelId channel = 0;  // inbound channels get ids of their own
    Bytes frame;            // kFrame
    Status status;          // kClosed: why
  };

  virtual ~NcclControlLink() = default;

  // Where peers reach this endpoint (opaque, at most wire::kMaxAddressBytes).
  virtual Bytes address() const = 0;
  // Opens a channel to the endpoint at `address`. Frames sent on it arrive
  // in order on one inbound channel of that endpoint. INVALID_ARGUMENT for
  // an address of another kind; UNAVAILABLE when it cannot be reached.
  virtual Result<ChannelId> open(std::span<const std::byte> address) = 0;
  // Queues one frame (non-blocking). UNAVAILABLE once the channel closed.
  virtual Status send(ChannelId channel, Bytes frame) = 0;
  // Closes a channel (either kind); the other endpoint polls kClosed for
  // its side. Frames already sent may still arrive there. Unknown: no-op.
  virtual void close(ChannelId channel) = 0;
  // Non-blocking: appends the frames that arrived and the channels that
  // closed (either direction: the other endpoint went away) since the last call.
  virtual void poll(std::vector<Event>& out) = 0;
};

}  // namespace kvgate::transport
