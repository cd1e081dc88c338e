// TransportCore's per-segment signals (transport.h): the sender's
// segment_released() query and the receiver's landing notices
// (TransportOptions::on_segment_landed). The state they read is the core's
// own (transport_core.cpp): a sent segment's SegState and CRC progress; a
// landed segment's offset and length.
#include <algorithm>

#include "transport/transport_core.h"

namespace kvgate::transport {

bool TransportCore::segment_released(PeerId peer, TransferId id, uint32_t index) const {
  auto it = sends_.find({peer.value(), id.value()});
  if (it == sends_.end() || index >= it->second.segs.size()) return false;
  const SendTransfer& t = it->second;
  const SendSeg& s = t.segs[index];
  switch (s.state) {
    case SegState::kNone:
    case SegState::kInFlight:
      return false;
    case SegState::kQueued:  // never issued; a failed transfer never issues it
      return t.failed;
    case SegState::kDone:  // a failed transfer's CRC jobs are dropped unread
      return t.failed || s.crc_bytes == s.length;
  }
  return false;
}

void TransportCore::note_landed(const RecvTransfer& t, uint32_t segment) {
  if (!options_.on_segment_landed || t.failed) return;
  const RecvSeg& s = t.segs[segment];
  landed_.push_back({t.id, segment, s.offset, s.length});
}

void TransportCore::deliver_landed() {
  if (landed_.empty()) return;
  // The callback may call back in (cancel_receive purges landed_): deliver
  // from a batch of our own.
  landed_delivery_.swap(landed_);
  for (const SegmentLanded& n : landed_delivery_) {
    auto it = recvs_.find(n.id.value());
    // Failed inside an earlier callback of this batch. (Erased ones were
    // reported OK in this progress(): a failure purges its notices.)
    if (it != recvs_.end() && it->second.failed) continue;
    options_.on_segment_landed(n);
  }
  landed_delivery_.clear();
}

}  // namespace kvgate::transport
