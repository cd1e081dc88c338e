// Transport: ships a request's KV cache from a prefill node into the pages a
// decode node reserved for it (DESIGN.md §1 steps 3–4, §6).
//
// One interface, several implementations chosen by TransportKind
// (create_transport): `loopback` (in-process, for tests and single-process
// use), `ucx` (UCP active-message or tag rendezvous into the pages, or one-sided put), and later
// `nccl` (UNIMPLEMENTED for now).
//
// Model
//   - A Transport registers one memory region at creation (the decode
//     node's KV pool arena) and never re-registers it. Receives land there.
//   - Peers are named by an opaque address blob (address()), carried by the
//     control plane (Hello::transport_address). connect() returns a PeerId.
//     The first message on every new endpoint carries the cluster token; a
//     side that does not present it is refused (refused_peers()) and all of
//     its messages are dropped. Both directions are authenticated.
//   - Receiver: post_receive() announces a transfer with its destination
//     ranges inside the region (a lease's pages, in lease order: logical
//     offset 0 is the first byte of ranges[0]) and a deadline. It returns
//     the grant (ReserveGrant::pool_descriptor) the sender needs.
//   - Sender: begin_send(peer, id, grant, deadline), any number of
//     send_segment() (non-blocking; each is CRC32C'd here unless the caller
//     hands its CRC32C over), then finish(),
//     which sends the manifest (count, total bytes, per-segment CRC32C)
//     once every segment has been delivered.
//   - The receiver verifies every segment's CRC32C against the manifest
//     before it reports the transfer complete, and answers the sender with
//     the verdict, so both sides report the same outcome.
//   - Growing a live transfer (the sender learns how many bytes it needs
//     only after it began shipping, e.g. prefill overlapping the transfer
//     of early layers with the compute of later ones):
//       1. receiver: extend_receive(id, more) appends ranges to the receive.
//          Their logical offsets continue after the current total, so every
//          segment landed or in flight keeps its place, and the CRC /
//          manifest / verdict checks cover all segments exactly as before.
//          It returns the extended grant (all ranges, the old ones first).
//       2. the receiver's owner hands that grant to the sender over the
//          control plane (ExtendResult::pool_descriptor).
//       3. sender: extend_send(peer, id, grant) swaps in the larger grant;
//          segments sent afterwards may target the new bytes.
//     Because the receiver extends before the sender learns of the new
//     ranges, no data for them can arrive before the receiver's map has
//     them: no message of the transport itself is needed. A segment past
//     the extended grant still fails the transfer with kOutOfRange. A
//     transfer can be extended any number of times, before or after the
//     sender claimed it, until the receiver has the manifest.
//
// Completion is reported by progress(): the owner thread polls it (the
// engine loop); nothing runs on a hidden thread. Every transfer produces
// exactly one TransferEvent on each side.
//
// Per-segment signals (for callers that stage bytes through a small set of
// buffers, transport/staging):
//   - Sender: segment_released(peer, id, index) turns true once the
//     transport no longer reads that segment's bytes (its send completed
//     locally and its CRC32C was taken), long before the transfer's event.
//     A query, not a callback: the caller polls the segments it holds a
//     buffer for (a handful), and a query cannot run caller code inside
//     progress(). releases_segments_early() says whether it ever turns
//     true before the event.
//   - Receiver: TransportOptions::on_segment_landed is called from
//     progress() once per segment whose bytes are in the pages, before the
//     transfer's OK event (not yet verified: that needs the manifest).
//
// Error contract (each failure frees the transfer's state on both sides):
//   peer lost (endpoint error, peer shut down)            kUnavailable
//   deadline passed (either side's, from its start)       kDeadlineExceeded
//   a segment's CRC32C differs from the manifest, a
//   manifest that disagrees with the segments received,
//   a segment sent twice                                  kDataLoss
//   a segment outside the posted ranges (overrun)         kOutOfRange
//   cancelled by the owner (cancel_receive/cancel_send)   kCancelled
// The sender reports the receiver's verdict (the same code, message
// prefixed "peer: "). A failure event is emitted once nothing this side
// issued for the transfer can still touch its memory (outstanding requests
// completed or cancelled; with put, the sender confirmed it stopped), or
// after TransportOptions::quiesce_timeout when the peer is unresponsive.
// Malformed, unknown, oversized or unauthenticated messages never crash
// the receiver: they are dropped and counted (counters()).
//
// Threading: a Transport is owned by one thread, which calls every method.
// Two Transports may live on different threads (loopback included).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/control_protocol.h"
#include "common/status.h"

namespace kvgate::transport {

using Clock = std::chrono::steady_clock;
using Bytes = std::vector<std::byte>;

// A transfer's id, chosen by the receiver (the decode node uses the lease
// id). Unique per receiver among live transfers.
using TransferId = StrongId<struct TransferIdTag>;
// A connection to a peer Transport; local to this Transport.
using PeerId = StrongId<struct PeerIdTag>;

// Most segments in one transfer (bounds the manifest and receiver state).
inline constexpr uint32_t kMaxSegments = 65536;
// Most destination ranges in one receive, extensions included (bounds the
// grant: 16 bytes a range, 1 MiB at most, well under a control frame; and
// the receiver's range map). A lease's adjacent pages merge into one range,
// so only a pool fragmented into more than this many runs can reach it.
inline constexpr uint32_t kMaxRanges = 65536;

// A range of the registered region: [offset_bytes, offset_bytes + length_bytes).
struct DestRange {
  uint64_t offset_bytes = 0;
  uint64_t length_bytes = 0;
  bool operator==(const DestRange&) const = default;
};

struct ReceiveSpec {
  TransferId id;
  std::vector<DestRange> ranges;  // inside the region, in the lease's order
  Clock::time_point deadline;     // counted from the transfer's start
};

enum class TransferSide : uint8_t { kSend, kReceive };

struct TransferEvent {
  TransferSide side = TransferSide::kReceive;
  TransferId id;
  PeerId peer;           // none for a receive no peer ever claimed
  Status status;         // OK: delivered and verified
  uint64_t bytes = 0;    // payload bytes (from the manifest when complete)
  uint32_t segments = 0;
  Clock::duration elapsed{};  // from post_receive / begin_send
};

struct TransportCounters {
  uint64_t refused_peers = 0;       // handshakes with a wrong cluster token
  uint64_t dropped_messages = 0;    // well-formed but from no authenticated peer,
                                    // or for no live transfer
  uint64_t malformed_messages = 0;  // failed to decode or violate the protocol
  uint64_t transfers_ok = 0;
  uint64_t transfers_failed = 0;
  // Received segments whose CRC32C the backend took while the bytes landed
  // (ucx over tcp/shared-memory bounce buffers, eager payloads): no second
  // pass over the pages.
  uint64_t segments_checksummed_landing = 0;
};

// A receive's segment whose bytes are in the pages (TransportOptions::
// on_segment_landed). Logical offsets as in send_segment/the grant.
struct SegmentLanded {
  TransferId id;
  uint32_t segment_index = 0;
  uint64_t logical_offset = 0;
  uint64_t bytes = 0;
};
using SegmentLandedFn = std::function<void(const SegmentLanded&)>;

// Tests only: fault injection.
struct TestHooks {
  // Receiver, before verifying segment `segment`: may alter its first
  // landed piece (corrupt a byte "in flight").
  std::function<void(TransferId, uint32_t segment, std::span<std::byte> landed)> before_verify;
  // Sender: issue data without waiting for the peer's handshake answer, so
  // that a refused endpoint's data messages reach the receiver.
  bool send_before_handshake = false;
  // Sender (active-message mode): skip the local check of segments against
  // the grant, so that the receiver's overrun check is exercised.
  bool skip_sender_range_check = false;
};

struct TransportOptions {
  std::string cluster_token;  // compared in constant time; both sides must match
  std::byte* region = nullptr;  // registered once; may be null (send-only)
  size_t region_bytes = 0;
  // How long a failed transfer waits for the peer to confirm it stopped
  // (and for its own outstanding requests) before it is reported anyway.
  std::chrono::milliseconds quiesce_timeout{5000};
  // Receiver, optional: per-segment landing notices. Called on the owner
  // thread from inside progress(), at its end, before that call appends its
  // events: once per segment of a receive whose bytes landed in the pages
  // (and after the CRC32C the backend takes while copying them in, if it
  // does), so always before the transfer's OK event. With put the bytes
  // land unseen: all of a transfer's notices come with the manifest (the
  // sender flushed first). Never for a segment that did not land; none
  // once the transfer failed (cancel, deadline, peer lost, overrun...):
  // notices not yet delivered then are withdrawn. The bytes are not
  // verified yet (a CRC mismatch still fails the transfer), and the
  // transport may still read them to checksum them: the pages may be read,
  // never written, until the transfer's event. The callback may call this
  // Transport's methods, except progress().
  SegmentLandedFn on_segment_landed;
};

class Transport {
 public:
  virtual ~Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // "loopback", "ucx".
  virtual std::string_view name() const = 0;
  // This Transport's address blob for peers (opaque; stable for its life).
  virtual Result<Bytes> address() = 0;

  // Starts connecting to the Transport at `address` (non-blocking): the
  // handshake completes during progress(); sends issued before are queued.
  // INVALID_ARGUMENT for an address this kind of transport cannot parse.
  virtual Result<PeerId> connect(std::span<const std::byte> address) = 0;

  // ---- receiver
  // Posts an expected transfer. INVALID_ARGUMENT: a duplicate live id, no
  // ranges, more than kMaxRanges ranges; OUT_OF_RANGE: a range outside
  // the region. Returns the grant for the sender.
  virtual Result<Bytes> post_receive(const ReceiveSpec& spec) = 0;
  // Fails the transfer with kCancelled (its event follows from progress()).
  virtual Status cancel_receive(TransferId id) = 0;
  // Grows a live receive in place: appends `more` (inside the region) after
  // its ranges; logical offset total_bytes() is the first byte of more[0].
  // Returns the new grant for the sender (every range, the old ones first),
  // for extend_send. NOT_FOUND: no such receive (never posted, or already
  // reported); FAILED_PRECONDITION: the transfer already failed, or its
  // manifest arrived (the sender is done); INVALID_ARGUMENT: `more` empty,
  // or more than kMaxRanges ranges in all; OUT_OF_RANGE: a range empty or
  // outside the region. On error nothing changes.
  virtual Result<Bytes> extend_receive(TransferId id, std::span<const DestRange> more) = 0;

  // ---- sender
  // INVALID_ARGUMENT: unknown peer, malformed grant, duplicate (peer, id).
  virtual Status begin_send(PeerId peer, TransferId id, std::span<const std::byte> grant,
                            Clock::time_point deadline) = 0;
  // Replaces the transfer's grant with `grant`, an extend_receive() result
  // of the same transfer: its ranges start with the ones granted so far (an
  // equal grant changes nothing). Segments sent afterwards may target the
  // new bytes; those issued before keep where they go. INVALID_ARGUMENT: no
  // such transfer, after finish(), a malformed grant, one for another
  // transfer, one with fewer ranges or a range that differs (the message
  // names it). A transfer that already failed returns its failure's code.
  // On error nothing changes.
  virtual Status extend_send(PeerId peer, TransferId id, std::span<const std::byte> grant) = 0;
  // Ships `bytes` at `data` to logical offset `remote_offset` of the
  // transfer. Non-blocking; `data` must stay valid and unchanged until the
  // transfer's event. INVALID_ARGUMENT for caller errors (unknown transfer,
  // after finish, index >= kMaxSegments or reused, zero bytes). A segment
  // past the grant is not a caller error: it fails the transfer
  // (kOutOfRange, on both sides).
  // `crc`: the CRC32C of the bytes when the caller already has it (the
  // prefill node computes it while staging the pages): then the transport
  // does not read the bytes a second time to checksum them. A wrong value
  // fails the transfer at the receiver (kDataLoss, both sides), never
  // silently. Without it the transport checksums the bytes itself.
  virtual Status send_segment(PeerId peer, TransferId id, uint32_t segment_index,
                              const std::byte* data, size_t bytes, uint64_t remote_offset,
                              std::optional<uint32_t> crc = std::nullopt) = 0;
  // True once the transport no longer reads the bytes of segment
  // `segment_index` of the send (peer, id): the caller may reuse them. That
  // is once its send completed locally (am/tag: UCX released the buffer;
  // put: the puts completed locally; loopback: the receiver copied it) and
  // its CRC32C was taken (handed over, or computed in progress()), or once
  // the transfer failed with the segment not in flight. False for a
  // segment not handed to send_segment, and for an unknown (peer, id):
  // never begun, or already reported (after its event no segment is read).
  // Non-blocking, no side effects. It changes only inside this Transport's
  // calls: progress(), or send_segment/cancel_send (a send that completes
  // at once, with its CRC handed over; a transfer that fails).
  virtual bool segment_released(PeerId peer, TransferId id, uint32_t segment_index) const = 0;
  // Whether segment_released() turns true before the transfer's event
  // (loopback, ucx: yes). If not, a caller must not wait on it for a
  // buffer before the transfer finished (StagedSender then caps a transfer
  // at its ring's size).
  virtual bool releases_segments_early() const = 0;
  // No more segments; indexes must be 0..n-1. The manifest follows the
  // data. INVALID_ARGUMENT for an unknown transfer or a gap in the indexes.
  virtual Status finish(PeerId peer, TransferId id) = 0;
  virtual Status cancel_send(PeerId peer, TransferId id) = 0;

  // Moves everything forward without blocking and appends finished
  // transfers to `events`. Returns the number appended.
  virtual size_t progress(std::vector<TransferEvent>& events) = 0;

  virtual TransportCounters counters() const = 0;
  uint64_t refused_peers() const { return counters().refused_peers; }

  virtual void set_test_hooks(TestHooks hooks) = 0;
  // Tests only: sends `message` to `peer` as a control message, as is.
  virtual Status debug_send_raw(PeerId peer, std::span<const std::byte> message) = 0;

 protected:
  Transport() = default;
};

// Creates the transport `config.kind` names. UNIMPLEMENTED for nccl and for
// ucx when built without UCX; INVALID_ARGUMENT for bad options; errors of
// the UCX runtime as kUnavailable/kInternal with its message.
Result<std::unique_ptr<Transport>> create_transport(const TransportConfig& config,
                                                    const TransportOptions& options);

std::string_view transport_kind_name(TransportKind kind);

}  // namespace kvgate::transport
