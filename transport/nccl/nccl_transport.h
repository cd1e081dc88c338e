// NcclTransport: KV shipping between GPUs that share an NCCL communicator
// (kvgate issue 5 item 5; transport/README.md "nccl").
//
// Data moves with ncclSend/ncclRecv (NcclDataLink) straight from the
// sender's device buffers into the receiver's device pages; everything
// else — the core's messages and the announcement of each segment's pieces
// — travels on a control link (NcclControlLink), because NCCL can only
// move bytes the receiver posted a matching receive for, in issue order,
// with equal sizes.
//
// Data op: put. The core maps each segment through the grant on the sender
// (SegmentOp::remote: one piece per contiguous run of the receiver's
// pages). For a segment the sender
//   1. posts one post_send per piece to the receiver's rank, in order;
//   2. sends a Put frame on its control channel to that rank naming the
//      pieces (region offset, length), in the same order;
//   3. reports segment_sent once every piece's send finished.
// The receiver, on the Put frame, posts one post_recv per piece into its
// region (each checked to lie inside the region) in frame order: the k-th
// send of a rank pair meets the k-th receive, with the same size. Control
// frames from a peer are delivered to the core only after every receive
// announced before them on the same channel finished, so the Manifest (and
// Stopped) never overtakes the bytes it describes: put semantics (landing
// notices and CRC32C come with the manifest) without a separate flush.
// One control channel per remote rank carries every Put frame to it (a
// second connect to the same rank reuses it), so frame order is send order.
//
// Channel authentication: every channel opens with an Ident frame (rank,
// world, cluster token); Put frames on a channel whose Ident is missing or
// wrong, or from a rank that already has a live inbound channel, are never
// honoured (no receive is posted for them). The core's Hello/token check
// covers the control messages as for every transport.
//
// CRC32C: the region and the segments are device memory, which the host
// must not read: link_crc32c() asks the data link (NcclCommLink: a kernel
// computing per-chunk CRCs, folded on the host; fake: the same
// decomposition on host memory). TestHooks::before_verify reads the region
// on the host: tests over host memory only.
//
// Address blob: "KVGN", version u8, rank u32, world u32, control address
// (u32 length + bytes).
//
// Failures: a send that fails fails its transfer (the core tells the
// receiver: Stopped, "peer: …"); a receive that fails is counted as
// malformed and left to the sender's report and the manifest's CRC32C —
// unless the link says the pair is out of step (DATA_LOSS: a size
// mismatch), or a Put frame is malformed or outside the region: then no
// later receive of the pair can be trusted, both channels with that rank
// are closed and the rank is lost (kDataLoss here; kUnavailable at the
// peer, whose channel closed) for every transfer with it. A control
// channel that closes loses the peer (kUnavailable).
//
// Threading: owner thread only, like every Transport; the links are used
// from it alone. The destructor says goodbye (non-blocking) and drops the
// links; NCCL operations still pending are the data link's to end.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "transport/nccl/nccl_link.h"
#include "transport/transport_core.h"

namespace kvgate::transport {

struct NcclLinks {
  std::unique_ptr<NcclDataLink> data;
  std::unique_ptr<NcclControlLink> control;
};

class NcclTransport final : public TransportCore {
 public:
  // INVALID_ARGUMENT: a link missing, region_bytes without a region.
  static Result<std::unique_ptr<Transport>> create(const TransportOptions& options, NcclLinks links);
  ~NcclTransport() override;

  std::string_view name() const override { return "nccl"; }
  Result<Bytes> address() override { return address_; }
  int rank() const { return data_->rank(); }

 protected:
  Status link_connect(PeerId peer, std::span<const std::byte> address) override;
  Status link_send_control(PeerId peer, Bytes message) override;
  Status link_send_segment(SegmentOp op) override;
  Status link_flush(PeerId peer, uint64_t cookie) override;
  void link_progress() override;
  uint32_t link_crc32c(const std::byte* data, size_t bytes, uint32_t seed) override;

 private:
  struct Outbound {
    NcclControlLink::ChannelId channel = 0;
  };
  struct Inbound {
    int rank = -1;         // from its Ident
    bool authed = false;   // Ident valid: its Put frames are honoured
    bool broken = false;   // protocol violation: everything is dropped
    bool closed = false;
    uint32_t outstanding = 0;  // receives posted for its Put frames, not finished
    std::deque<Bytes> queue;   // frames not handled yet (behind receives)
  };
  struct SendOp {
    uint64_t cookie = 0;
    std::vector<NcclDataLink::OpId> ops;
    Status error;
  };
  struct RecvOp {
    NcclControlLink::ChannelId channel = 0;
    NcclDataLink::OpId op = 0;
  };

  NcclTransport(const TransportOptions& options, NcclLinks links);
  Status send_frame(int rank, Bytes frame);
  void drain(NcclControlLink::ChannelId id, Inbound& in);
  void handle_ident(Inbound& in, std::span<const std::byte> body);
  // False: the frame broke the channel.
  bool handle_put(NcclControlLink::ChannelId id, Inbound& in, std::span<const std::byte> body);
  void lose_rank(int rank, const Status& why);
  // The pair with the rank behind inbound channel `id` can no longer be
  // kept in step: closes both channels (the peer loses us too) and loses
  // the rank with DATA_LOSS naming `why`.
  void break_pair(NcclControlLink::ChannelId id, Inbound& in, const Status& why);

  std::unique_ptr<NcclDataLink> data_;
  std::unique_ptr<NcclControlLink> control_;
  std::string token_;
  Bytes address_;
  std::unordered_map<int, Outbound> out_;             // by remote rank
  std::unordered_map<uint64_t, int> peer_rank_;        // PeerId -> rank
  std::unordered_map<uint64_t, Inbound> in_;           // by inbound channel
  std::vector<SendOp> sends_;
  std::vector<RecvOp> recvs_;
  std::vector<uint64_t> flushes_;  // completed at the next link_progress
  std::vector<NcclControlLink::Event> events_scratch_;
};

// create_transport(kind nccl) builds an NcclTransport over the links this
// provider returns (called once per transport). A node that owns a
// communicator registers it at startup; tests register fake links. Unset
// (the default), create_transport answers UNIMPLEMENTED naming what is
// needed. Thread-safe; set it before creating transports.
using NcclLinkProvider = std::function<Result<NcclLinks>()>;
void set_nccl_link_provider(NcclLinkProvider provider);
// Null when none is set.
Result<std::unique_ptr<Transport>> create_nccl_transport_from_provider(const TransportOptions& options);

}  // namespace kvgate::transport
