// StagedSender: sends segments whose bytes live in device memory through a
// ring of pinned host staging buffers (issue 5 item 4; README.md).
//
//   device ──copy (slot i)──▶ staging buffer i ──CRC32C──▶ send_segment ─▶ peer
//
// While buffer i's bytes are being sent by the Transport, the copies of the
// next segments run into the other buffers; a buffer goes back to the ring
// only when the transport no longer reads it.
//
// When a buffer may be reused: once the transport no longer reads it.
//   - With a release probe — by default Transport::segment_released, when
//     the transport releases_segments_early() (loopback, ucx); or the
//     SegmentReleasedFn handed to create() — a buffer returns as soon as
//     its segment is released: any number of segments per transfer,
//     transfers interleave.
//   - Without one (a Transport that releases a segment's bytes only at the
//     transfer's event) a buffer returns to the ring at its transfer's
//     event. A transfer may then use at most `buffers` segments (enqueue
//     refuses more: RESOURCE_EXHAUSTED), and the ring serves the oldest open
//     transfer first (begin order): a later transfer takes buffers only once
//     every older one called finish(), so two open transfers can never hold
//     the ring between them and wait on each other.
//
// Segments larger than a staging buffer are split: enqueue() cuts the
// bytes into pieces of at most StagingOptions::buffer_bytes, each its own
// transport segment (consecutive indexes, consecutive remote offsets), and
// returns the indexes it used. Each piece's CRC32C is taken on the staged
// host bytes (after the copy, before send_segment, while they are in
// cache) and handed to send_segment, so the transport never reads them a
// second time; the receiver still verifies every byte.
//
// Errors. A failed device copy fails that transfer only: the sender cancels
// it at the transport, drops its queued segments, and the transfer's event
// (on_transfer_event) carries the copy's Status, naming the segment. Other
// transfers go on. A transfer failed by the transport (deadline, peer
// lost) likewise drops its queued segments.
//
// Ownership: the sender owns the pinned buffers (allocated once by
// create(), freed by the destructor); it borrows the Transport and the
// DeviceCopier, which must outlive it, and the device bytes of each
// enqueue(), which must stay valid and unchanged until the transfer's
// event. The owner forwards every kSend TransferEvent it gets from
// transport.progress() to on_transfer_event() — the sender never calls
// transport.progress() itself (the owner's other transfers' events are
// not its to take). Destroy it only once every transfer it began had its
// event handed over.
//
// Threading: one owner thread (the prefill node's engine loop) calls every
// method. Nothing blocks: progress() polls the copier and the probe, except
// the destructor, which waits (bounded) for copies still in flight.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "transport/staging/device_copier.h"
#include "transport/transport.h"

namespace kvgate::transport::staging {

struct StagingOptions {
  uint32_t buffers = 4;                  // ring size, >= 1 (and <= the copier's slots)
  size_t buffer_bytes = size_t{4} << 20;  // each, > 0
};

// True once the transport no longer reads the bytes of segment
// `segment_index` of the send (peer, id). Must stay true once true, until
// the transfer's event (Transport::segment_released is such a probe).
using SegmentReleasedFn = std::function<bool(PeerId, TransferId, uint32_t segment_index)>;

// The transport segments one enqueue() became.
struct StagedSegments {
  uint32_t first_index = 0;
  uint32_t count = 0;
};

// One shipped segment, for the owner's manifest.
struct StagedSegmentInfo {
  uint32_t index = 0;
  uint64_t remote_offset = 0;
  uint64_t bytes = 0;
  uint32_t crc32c = 0;  // of the staged bytes, as handed to send_segment
};

struct StagedSendEvent {
  // The transport's event; when this sender failed the transfer (a device
  // copy or send_segment error), its status is that failure.
  TransferEvent event;
  // Every segment handed to send_segment, by index (on success: all).
  std::vector<StagedSegmentInfo> segments;
};

struct StagedSenderCounters {
  uint64_t copies_issued = 0;
  uint64_t segments_sent = 0;
  uint64_t bytes_sent = 0;
  uint64_t buffers_released_early = 0;  // by the probe, before the transfer's event
  uint64_t transfers_failed_by_staging = 0;
};

class StagedSender {
 public:
  // INVALID_ARGUMENT for options out of range (buffers 0 or more than the
  // copier's slots, buffer_bytes 0); RESOURCE_EXHAUSTED when the pinned
  // buffers cannot be had. `released` empty: the transport's
  // segment_released() if it releases_segments_early(), else none.
  static Result<std::unique_ptr<StagedSender>> create(Transport& transport, DeviceCopier& copier,
                                                      const StagingOptions& options,
                                                      SegmentReleasedFn released = {});
  ~StagedSender();
  StagedSender(const StagedSender&) = delete;
  StagedSender& operator=(const StagedSender&) = delete;

  // transport.begin_send, and the sender's own state for the transfer.
  // INVALID_ARGUMENT for a (peer, id) this sender already has; the
  // transport's errors as they are.
  Status begin(PeerId peer, TransferId id, std::span<const std::byte> grant,
               Clock::time_point deadline);
  // Queues `bytes` (> 0) of device memory at `device_src` for logical
  // offset `remote_offset` of the transfer; split into buffer_bytes pieces.
  // INVALID_ARGUMENT: unknown transfer, after finish(), null/zero, past
  // kMaxSegments; RESOURCE_EXHAUSTED: more segments than buffers without a
  // release probe (see above); a transfer that already failed returns its
  // failure.
  Result<StagedSegments> enqueue(PeerId peer, TransferId id, const std::byte* device_src,
                                 size_t bytes, uint64_t remote_offset);
  // No more enqueue(); transport.finish follows in progress() once every
  // segment was handed over. INVALID_ARGUMENT for an unknown transfer.
  Status finish(PeerId peer, TransferId id);
  // Drops the queued segments and cancels the send at the transport; its
  // buffers return as their copies end and at the transfer's event.
  // INVALID_ARGUMENT for an unknown transfer.
  Status cancel(PeerId peer, TransferId id);

  // Non-blocking: completed copies → CRC32C → send_segment; released
  // buffers back to the ring; finish() when due; free buffers → the next
  // copies. Call it often (between layers, after transport.progress()).
  void progress();

  // Every kSend event of the transport goes through here (events of sends
  // this sender did not begin come back as they are). Frees the transfer's
  // buffers (the transport no longer reads them).
  StagedSendEvent on_transfer_event(const TransferEvent& event);

  uint32_t buffer_count() const { return static_cast<uint32_t>(buffers_.size()); }
  uint32_t free_buffers() const;
  size_t live_transfers() const { return xfers_.size(); }
  bool has_release_probe() const { return static_cast<bool>(released_); }
  const StagedSenderCounters& counters() const { return counters_; }

 private:
  using Key = std::pair<uint64_t, uint64_t>;  // (peer, transfer)
  struct Chunk {
    const std::byte* src = nullptr;
    size_t bytes = 0;
    uint64_t remote_offset = 0;
    uint32_t segment = 0;
  };
  enum class BufState : uint8_t { kFree, kCopying, kSent };
  struct Buffer {
    PinnedBuffer mem;
    BufState state = BufState::kFree;
    Key key{};
    Chunk chunk;
  };
  struct Xfer {
    PeerId peer;
    TransferId id;
    uint64_t order = 0;  // begin order
    std::deque<Chunk> queued;
    std::vector<StagedSegmentInfo> sent;  // by index; bytes == 0: not sent
    uint32_t next_segment = 0;
    uint32_t copying = 0;
    bool finish_requested = false, finish_called = false;
    bool failed = false, event_seen = false;
    Status failure;
  };

  StagedSender(Transport& transport, DeviceCopier& copier, const StagingOptions& options,
               SegmentReleasedFn released);
  Xfer* find(PeerId peer, TransferId id);
  void fail(Xfer& x, Status status);
  // The next chunk to stage, or null (see the ring's order above).
  Xfer* next_to_stage();
  void complete_copy(uint32_t buffer, Status copy_status);
  void maybe_erase(const Key& key);

  Transport& transport_;
  DeviceCopier& copier_;
  StagingOptions options_;
  SegmentReleasedFn released_;
  std::vector<Buffer> buffers_;
  std::map<Key, Xfer> xfers_;
  uint64_t next_order_ = 1;
  StagedSenderCounters counters_;
};

}  // namespace kvgate::transport::staging
