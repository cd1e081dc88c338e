// TransportCore: the transfer protocol every implementation shares —
// handshake and authentication, the per-transfer state machines of both
// sides, deadlines, manifest verification, verdicts, counters. A backend
// (loopback, ucx) only moves bytes: it implements the link_* hooks and
// reports arrivals and completions through the on_*/…_landed/…_sent calls.
//
// Rules that keep the state machines simple:
//   - Backend callbacks (on_control, on_segment_header, segment_landed,
//     segment_sent, flushed, peer_lost) only record; they never send,
//     emit or erase. advance(), run at the end of progress(), does that.
//   - A transfer is erased only by advance(), when it is finished and
//     nothing of it is in flight (or its quiesce deadline passed).
//   - Operation cookies, not pointers, tie completions to transfers; a
//     completion for an erased transfer is ignored.
//   - Landing notices (TransportOptions::on_segment_landed) are queued
//     where a segment lands (segment_landed; put: check_structure), purged
//     when their transfer fails, and delivered at the end of progress(),
//     outside every loop over transfer state, so the owner's callback may
//     call back into the transport.
//   - CRC32C is never computed inside a call that could stall the link: the
//     sender's segments are issued first and checksummed in progress(), the
//     receiver checksums each segment as soon as it landed (before the
//     manifest arrives), in chunks of kCrcChunkBytes with link_progress()
//     between them, so the wire keeps moving while the CPU checksums.
//
// Threading: the owner thread of the Transport, like everything else.
#pragma once

#include <map>
#include <optional>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

#include "transport/transport.h"
#include "transport/wire.h"

namespace kvgate::transport {

class TransportCore : public Transport {
 public:
  Result<PeerId> connect(std::span<const std::byte> address) override;
  Result<Bytes> post_receive(const ReceiveSpec& spec) override;
  Status cancel_receive(TransferId id) override;
  Result<Bytes> extend_receive(TransferId id, std::span<const DestRange> more) override;
  Status begin_send(PeerId peer, TransferId id, std::span<const std::byte> grant,
                    Clock::time_point deadline) override;
  Status extend_send(PeerId peer, TransferId id, std::span<const std::byte> grant) override;
  Status send_segment(PeerId peer, TransferId id, uint32_t segment_index, const std::byte* data,
                      size_t bytes, uint64_t remote_offset,
                      std::optional<uint32_t> crc = std::nullopt) override;
  bool segment_released(PeerId peer, TransferId id, uint32_t segment_index) const override;
  bool releases_segments_early() const override { return true; }
  Status finish(PeerId peer, TransferId id) override;
  Status cancel_send(PeerId peer, TransferId id) override;
  size_t progress(std::vector<TransferEvent>& events) override;
  TransportCounters counters() const override { return counters_; }
  void set_test_hooks(TestHooks hooks) override { hooks_ = std::move(hooks); }
  Status debug_send_raw(PeerId peer, std::span<const std::byte> message) override;

 protected:
  TransportCore(const TransportOptions& options, wire::DataOp op);

  // For the backend's destructor: tells every connected peer that this
  // side is going away (best effort, non-blocking).
  void say_goodbye();

  // ---- provided by the backend
  // Opens the path to the peer at `address` (the backend's own format).
  virtual Status link_connect(PeerId peer, std::span<const std::byte> address) = 0;
  // Sends one control message; delivery order per peer is preserved.
  virtual Status link_send_control(PeerId peer, Bytes message) = 0;
  struct SegmentOp {
    PeerId peer;
    uint64_t cookie = 0;
    const std::byte* data = nullptr;
    size_t bytes = 0;
    std::byte header[wire::kSegmentBytes];  // AM mode: the message header
    std::vector<wire::Piece> remote;        // put mode: where the bytes go
  };
  // Starts moving a segment; completes with segment_sent(cookie, status),
  // possibly before it returns. An error return means it never started.
  virtual Status link_send_segment(SegmentOp op) = 0;
  // Put mode: completes with flushed(cookie, status) once every put issued
  // to `peer` before it has landed remotely.
  virtual Status link_flush(PeerId peer, uint64_t cookie) = 0;
  // Drives the backend; calls the hooks below.
  virtual void link_progress() = 0;
  // CRC32C of `bytes` at `data` continuing `seed` (common/crc32c.h
  // semantics), over a sent segment's bytes or landed region bytes. The
  // default reads them on the host; a backend whose region and segments
  // live in device memory overrides it (nccl: a device kernel).
  virtual uint32_t link_crc32c(const std::byte* data, size_t bytes, uint32_t seed);

  // ---- called by the backend (from link_progress, or inside link_* calls)
  void on_control(std::span<const std::byte> message);
  struct Landing {
    uint64_t cookie = 0;
    PeerId peer;  // who announced the segment
    std::vector<std::pair<std::byte*, size_t>> pieces;  // in the region
  };
  // A data segment's header arrived with `payload_bytes` to follow. OK:
  // move the payload into the pieces, then segment_landed(cookie, …).
  // Error: drop the payload (already counted and handled here).
  Result<Landing> on_segment_header(std::span<const std::byte> header, size_t payload_bytes);
  // `crc`: the segment's CRC32C, taken by the backend while the bytes
  // landed (then no pass over the pages follows); else the core computes it.
  void segment_landed(uint64_t cookie, Status status, std::optional<uint32_t> crc = std::nullopt);
  void segment_sent(uint64_t cookie, Status status);
  void flushed(uint64_t cookie, Status status);
  void peer_lost(PeerId peer, Status status);
  void count_malformed(const Status& why);
  // False once a cookie's completion would be ignored (its transfer was
  // erased): a backend may then cancel what it still holds for it (a
  // pre-posted receive into pages that are no longer the transfer's).
  bool cookie_live(uint64_t cookie) const { return ops_.count(cookie) != 0; }

  wire::DataOp op() const { return op_; }
  std::byte* region() const { return region_; }
  size_t region_bytes() const { return region_bytes_; }

 private:
  struct Conn {
    bool outbound = false;
    uint64_t local_nonce = 0;   // in every message we send on it
    uint64_t remote_nonce = 0;  // in every message the peer sends (0: not yet known)
    bool ready = false;         // handshake complete
    bool lost = false;
    wire::DataOp peer_op = wire::DataOp::kActiveMessage;
  };
  enum class SegState : uint8_t { kNone, kQueued, kInFlight, kDone };
  struct SendSeg {
    uint64_t offset = 0, length = 0;
    uint32_t crc = 0;
    uint64_t crc_bytes = 0;  // checksummed so far (== length: crc is final)
    const std::byte* data = nullptr;
    SegState state = SegState::kNone;
  };
  struct SendTransfer {
    PeerId peer;
    TransferId id;
    wire::RangeMap map;
    Clock::time_point start, deadline, quiesce_deadline;
    std::vector<SendSeg> segs;
    uint32_t in_flight = 0;
    bool finish_requested = false, flush_in_flight = false, flushed = false;
    bool begun = false;  // Begin sent
    bool manifest_sent = false, verdict_ok = false;
    bool failed = false, notify_peer = false;
    Status status;
  };
  struct RecvSeg {
    uint64_t offset = 0, length = 0;
    SegState state = SegState::kNone;  // kInFlight: landing
    uint32_t crc = 0;
    uint64_t crc_bytes = 0;  // checksummed so far (== length: crc is final)
  };
  struct RecvTransfer {
    TransferId id;
    wire::RangeMap map;
    Clock::time_point start, deadline, quiesce_deadline;
    PeerId peer;  // the peer that claimed it
    std::vector<RecvSeg> segs;
    uint32_t landing = 0;
    std::optional<wire::Manifest> manifest;
    bool checked = false;  // manifest agrees with the segments; CRCs pending
    bool failed = false, await_stop = false;
    Status status;
  };
  struct OpRef {
    enum Kind : uint8_t { kSend, kRecv, kFlush } kind;
    uint64_t peer = 0, transfer = 0;
    uint32_t segment = 0;
  };
  using SendKey = std::pair<uint64_t, uint64_t>;  // (peer, transfer)

  Conn* conn(PeerId peer);
  Conn* conn_by_remote_nonce(uint64_t nonce, PeerId& peer);
  void send_control(PeerId peer, const Conn& c, wire::WireType type, wire::Body body);
  void handle_hello(uint64_t nonce, wire::Hello hello);
  void handle_hello_ack(uint64_t nonce, const wire::HelloAck& ack);
  void handle_manifest(PeerId peer, wire::Manifest manifest);
  void handle_result(PeerId peer, const wire::Verdict& verdict);
  void handle_stopped(PeerId peer, const wire::Verdict& verdict);
  RecvTransfer* claim(PeerId peer, uint64_t transfer_id);
  // OUT_OF_RANGE for a range that is empty or not inside the region.
  Status check_ranges(const char* call, std::span<const DestRange> ranges) const;

  void send_begin(SendTransfer& t, Conn& c);
  void issue(SendTransfer& t, uint32_t index);
  void fail_send(SendTransfer& t, Status status, bool notify_peer);
  void fail_recv(RecvTransfer& t, Status status, bool tell_peer);
  Status check_structure(RecvTransfer& t);
  Status verify(RecvTransfer& t);
  // CRC work: one entry per segment with bytes left to checksum.
  struct CrcJob {
    TransferSide side;
    uint64_t peer = 0, transfer = 0;
    uint32_t segment = 0;
  };
  // Checksums up to `budget` bytes from the queue; true while work remains.
  bool crc_step(uint64_t budget);
  void advance();
  bool advance_send(SendTransfer& t, Clock::time_point now);  // true: erase
  bool advance_recv(RecvTransfer& t, Clock::time_point now);  // true: erase
  void emit(TransferSide side, TransferId id, PeerId peer, Status status, uint64_t bytes,
            uint32_t segments, Clock::time_point start);
  uint64_t new_nonce();
  // Landing notices: queued, dropped for a failed transfer, delivered.
  void note_landed(const RecvTransfer& t, uint32_t segment);
  void deliver_landed();

  TransportOptions options_;
  wire::DataOp op_;
  std::byte* region_;
  size_t region_bytes_;
  TestHooks hooks_;
  TransportCounters counters_;
  std::mt19937_64 rng_;
  uint64_t next_peer_ = 1;
  uint64_t next_cookie_ = 1;
  std::unordered_map<uint64_t, Conn> conns_;                // by PeerId
  std::unordered_map<uint64_t, uint64_t> by_remote_nonce_;  // nonce -> PeerId
  std::unordered_map<uint64_t, uint64_t> pending_outbound_; // our Hello nonce -> PeerId
  std::map<SendKey, SendTransfer> sends_;
  std::unordered_map<uint64_t, RecvTransfer> recvs_;
  std::unordered_map<uint64_t, OpRef> ops_;
  std::vector<TransferEvent> events_;
  std::vector<wire::Piece> pieces_scratch_;
  std::vector<SegmentLanded> landed_;          // queued notices (only with a callback)
  std::vector<SegmentLanded> landed_delivery_;  // the batch being delivered
  std::vector<CrcJob> crc_jobs_;  // FIFO via crc_head_
  size_t crc_head_ = 0;
};

}  // namespace kvgate::transport
