// The transport's own wire format: the messages two Transports exchange
// (handshake, manifest, verdict) and the grant (pool descriptor). Shared by
// every implementation; the bytes travel as UCX active messages or through
// the loopback inbox.
//
// Every message (little-endian):
//   offset size
//        0    4  magic "KVGT"
//        4    1  version (kWireVersion)
//        5    1  type (WireType)
//        6    2  reserved, must be 0
//        8    8  nonce: the sending side's connection nonce
//       16    …  body, fields in declaration order; strings and blobs as
//                u32 length + bytes, lists as u32 count + elements
//
// Decoding is bounded: every length is checked against the bytes left and
// against its cap (kMax*) before anything is allocated; a message larger
// than kMaxControlBytes is rejected before parsing; trailing bytes are an
// error. Errors are kDataLoss (truncated, bad magic, trailing bytes),
// kUnimplemented (version, type), kOutOfRange (over a cap) and
// kInvalidArgument (a field value), all prefixed "transport wire: ".
//
// Pure functions; any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "common/status.h"
#include "transport/transport.h"

namespace kvgate::transport::wire {

inline constexpr uint32_t kMagic = 0x5447564Bu;  // "KVGT"
inline constexpr uint8_t kWireVersion = 1;
inline constexpr size_t kHeaderBytes = 16;
inline constexpr size_t kMaxControlBytes = size_t{4} << 20;
inline constexpr size_t kMaxTokenBytes = 1024;
inline constexpr size_t kMaxAddressBytes = 64 << 10;
inline constexpr size_t kMaxReasonBytes = 1024;

enum class WireType : uint8_t {
  kHello = 1,     // connector -> acceptor, first message on an endpoint
  kHelloAck = 2,  // acceptor -> connector, first message on the return path
  kSegment = 3,   // header of a data segment (AM mode; the payload follows)
  kManifest = 4,  // sender -> receiver, after every segment was delivered
  kResult = 5,    // receiver -> sender: the verdict (OK or a failure)
  kStopped = 6,   // sender -> receiver: failed/stopped, nothing in flight
  kGoodbye = 7,   // either way: this side is shutting down
  kBegin = 8,     // sender -> receiver, before any data: claims the transfer
};

// How the connector moves data (announced in Hello).
enum class DataOp : uint8_t { kActiveMessage = 1, kPut = 2 };

struct Hello {
  std::string cluster_token;
  DataOp op = DataOp::kActiveMessage;
  Bytes reply_address;  // where the acceptor sends its messages
};
struct HelloAck {
  std::string cluster_token;
  DataOp op = DataOp::kActiveMessage;  // how the acceptor sends data back
  uint64_t echo_nonce = 0;             // the Hello's nonce
};
struct Segment {
  uint64_t transfer_id = 0;
  uint32_t index = 0;
  uint64_t offset_bytes = 0;  // logical, into the grant
  uint64_t length_bytes = 0;
};
struct ManifestEntry {
  uint64_t offset_bytes = 0;
  uint64_t length_bytes = 0;
  uint32_t crc32c = 0;
};
struct Manifest {
  uint64_t transfer_id = 0;
  uint64_t total_bytes = 0;  // must equal the sum of the lengths
  std::vector<ManifestEntry> segments;  // by index
};
struct Verdict {  // kResult and kStopped
  uint64_t transfer_id = 0;
  StatusCode code = StatusCode::kOk;  // kStopped: never kOk
  std::string reason;
};
struct Goodbye {};
struct Begin {
  uint64_t transfer_id = 0;
};

using Body = std::variant<Hello, HelloAck, Segment, Manifest, Verdict, Goodbye, Begin>;

struct Message {
  WireType type = WireType::kGoodbye;
  uint64_t nonce = 0;
  Body body;
};

Bytes encode(const Message& message);
// Segment headers are encoded often: this one writes into a fixed buffer.
inline constexpr size_t kSegmentBytes = kHeaderBytes + 28;
void encode_segment(uint64_t nonce, const Segment& segment, std::byte (&out)[kSegmentBytes]);

Result<Message> decode(std::span<const std::byte> bytes);

// ------------------------------------------------------------------ grant
// The pool descriptor: "KVGR", version u8, transfer id u64, u32 count,
// ranges (offset u64, length u64). At most kMaxRanges ranges. An extended
// grant (extend_receive) is the same encoding: its ranges start with the
// ranges of the grant it extends.
struct Grant {
  uint64_t transfer_id = 0;
  std::vector<DestRange> ranges;
  uint64_t total_bytes() const;
};
Bytes encode_grant(const Grant& grant);
Result<Grant> decode_grant(std::span<const std::byte> bytes);

// A piece of a logical range mapped onto the ranges: `length_bytes` at
// region offset `region_offset`, holding the bytes that start at
// `source_offset` within the mapped logical range.
struct Piece {
  uint64_t region_offset = 0;
  uint64_t length_bytes = 0;
  uint64_t source_offset = 0;
};

// Logical offsets over an ordered list of ranges (logical 0 is the first
// byte of ranges[0]). Lookups are O(log ranges).
class RangeMap {
 public:
  RangeMap() = default;
  explicit RangeMap(std::vector<DestRange> ranges);
  // Appends the pieces of logical [offset, offset + length) to `out`.
  // kOutOfRange if it does not fit in the ranges (nothing appended).
  Status map(uint64_t offset, uint64_t length, std::vector<Piece>& out) const;
  // Appends ranges after the last one: logical offsets already mapped keep
  // their place, the new ranges continue at total_bytes().
  void append(std::span<const DestRange> more);
  uint64_t total_bytes() const { return starts_.empty() ? 0 : starts_.back(); }
  const std::vector<DestRange>& ranges() const { return ranges_; }

 private:
  std::vector<DestRange> ranges_;
  std::vector<uint64_t> starts_;  // logical start of each range, then the total
};

// Constant-time comparison (no early exit on the first differing byte).
bool tokens_equal(std::string_view a, std::string_view b);

}  // namespace kvgate::transport::wire
