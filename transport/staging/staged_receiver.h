// StagedReceiver: the decode side of the staged path (README.md). The
// transport lands a transfer's bytes in its registered pinned host region
// (the lease's staging pages); this copies them on to the device pages
// afterwards, in chunks, over the copier's slots, while later segments and
// later transfers keep arriving.
//
//   peer ─▶ Transport ─▶ pinned host region ──copy (any free slot)──▶ device pages
//
// When copies start:
//   - per landed segment: the owner routes the transport's landing notices
//     (TransportOptions::on_segment_landed) to on_segment_landed(); every
//     chunk whose bytes all landed (one segment or several) is queued at
//     once, so copies overlap the arrival of the same transfer's later
//     segments. Such early copies move bytes not yet verified; nothing is
//     reported before the transport's OK, and a failed transfer's device
//     pages are the owner's to discard;
//   - at the transfer's OK event, every chunk not yet copied is queued
//     (a transport without notices, put's notices arriving together):
//     transfer A's device copies overlap transfer B's arrival.
// A transfer's DeviceCopyEvent (OK) comes only after the transport's event
// was OK and every chunk reached the device; after any event (OK or not)
// no copy of the transfer is in flight, so the host pages and the device
// pages are the owner's again.
//
// Errors. A failed device copy fails that transfer only: the receive is
// cancelled at the transport (if still live) and its event carries the
// copy's Status naming the bytes. A failed receive (CRC, deadline, peer
// lost, cancel) is reported with the transport's Status once the copies
// already in flight ended.
//
// Ownership: borrows the Transport (to cancel receives), the region and
// the DeviceCopier, which outlive it, and the device pages of each
// expect(), until that transfer's DeviceCopyEvent. The owner forwards every
// kReceive TransferEvent to on_transfer_event().
//
// Threading: one owner thread (the decode node's engine loop) calls every
// method; nothing blocks except the destructor, which waits (bounded) for
// copies still in flight.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "transport/staging/device_copier.h"
#include "transport/transport.h"

namespace kvgate::transport::staging {

// Device memory the bytes of a transfer go to, in logical order.
struct DevicePiece {
  std::byte* device = nullptr;
  uint64_t bytes = 0;
};

struct StagedReceiveSpec {
  TransferId id;
  std::vector<DestRange> host_ranges;  // in the region: the ranges posted to the transport
  std::vector<DevicePiece> device;     // same total bytes
};

struct StagedReceiverOptions {
  // Largest single device copy: the grain at which copies overlap arrival.
  size_t copy_chunk_bytes = size_t{4} << 20;
};

struct DeviceCopyEvent {
  TransferId id;
  Status status;  // OK: verified by the transport and entirely on the device
  uint64_t bytes = 0;  // copied to the device
};

struct StagedReceiverCounters {
  uint64_t copies_issued = 0;
  uint64_t copies_before_verified = 0;  // started by on_landed, before the transport's OK
  uint64_t landing_notices = 0;         // on_segment_landed for an expected transfer
  uint64_t bytes_copied = 0;
};

class StagedReceiver {
 public:
  // INVALID_ARGUMENT: null region, no copy slots, chunk size 0.
  static Result<std::unique_ptr<StagedReceiver>> create(Transport& transport, std::byte* region,
                                                        size_t region_bytes, DeviceCopier& copier,
                                                        const StagedReceiverOptions& options = {});
  ~StagedReceiver();
  StagedReceiver(const StagedReceiver&) = delete;
  StagedReceiver& operator=(const StagedReceiver&) = delete;

  // With post_receive (same id, same ranges). INVALID_ARGUMENT: a live id,
  // no ranges, a null or empty device piece, totals that differ;
  // OUT_OF_RANGE: a host range outside the region.
  Status expect(const StagedReceiveSpec& spec);
  // With extend_receive: the new host ranges and their device pieces,
  // logically after the current ones. Same errors; NOT_FOUND: unknown id.
  Status extend(TransferId id, std::span<const DestRange> host_ranges,
                std::span<const DevicePiece> device);
  // Logical [offset, +bytes) of the transfer has landed in the region
  // (not verified yet): the chunks entirely inside it may be copied now.
  // NOT_FOUND: unknown id; OUT_OF_RANGE: past the transfer's bytes.
  // Ranges may come in any order and overlap; a chunk is copied once
  // every byte of it was reported.
  Status on_landed(TransferId id, uint64_t logical_offset, uint64_t bytes);
  // The transport's landing notice, as TransportOptions::on_segment_landed
  // delivers it (forward every notice; ones for transfers not expected
  // here are ignored). A notice past the expected bytes fails the transfer
  // (OUT_OF_RANGE naming the segment): those bytes would never be copied.
  // Wiring, with the receiver created after the transport:
  //   StagedReceiver* rx = nullptr;
  //   options.on_segment_landed = [&rx](const SegmentLanded& n) {
  //     if (rx) rx->on_segment_landed(n);
  //   };
  void on_segment_landed(const SegmentLanded& notice);
  // Cancels the receive at the transport; its DeviceCopyEvent (kCancelled)
  // follows once the transport's event came and no copy is in flight.
  Status cancel(TransferId id);

  // Every kReceive event of the transport (others are ignored).
  void on_transfer_event(const TransferEvent& event);
  // Non-blocking: finished copies, next copies, completed transfers
  // (appended to `events`). Returns the number appended.
  size_t progress(std::vector<DeviceCopyEvent>& events);

  size_t live_transfers() const { return xfers_.size(); }
  const StagedReceiverCounters& counters() const { return counters_; }

 private:
  enum class OpState : uint8_t { kPending, kInFlight, kDone };
  struct Op {
    const std::byte* host = nullptr;
    std::byte* device = nullptr;
    uint64_t bytes = 0;
    uint64_t logical = 0;
    bool landed = false;
    OpState state = OpState::kPending;
  };
  struct Xfer {
    TransferId id;
    uint64_t order = 0;
    uint64_t total_bytes = 0;
    std::vector<Op> ops;  // by logical offset
    std::map<uint64_t, uint64_t> landed;  // reported landed: [start, end), merged
    uint32_t in_flight = 0;
    uint64_t copied_bytes = 0;
    bool verified = false, event_seen = false, failed = false;
    Status failure;
  };
  struct SlotUse {
    uint64_t transfer = 0;  // 0: free
    size_t op = 0;
  };

  StagedReceiver(Transport& transport, std::byte* region, size_t region_bytes,
                 DeviceCopier& copier, const StagedReceiverOptions& options);
  Status append(Xfer& x, std::span<const DestRange> host_ranges,
                std::span<const DevicePiece> device);
  void fail(Xfer& x, Status status);
  Xfer* find(TransferId id);

  Transport& transport_;
  std::byte* region_;
  size_t region_bytes_;
  DeviceCopier& copier_;
  StagedReceiverOptions options_;
  std::map<uint64_t, Xfer> xfers_;
  std::vector<SlotUse> slots_;
  std::vector<Xfer*> order_scratch_;  // progress()'s, kept to avoid allocating per call
  uint64_t next_order_ = 1;
  StagedReceiverCounters counters_;
};

}  // namespace kvgate::transport::staging
