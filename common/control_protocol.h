// The control plane between the coordinator and the prefill and decode nodes
// (DESIGN.md §1, §5–§7): typed messages and their framing on a byte stream.
//
// Transport-free. `encode` turns a message into one frame; `FrameDecoder`
// is fed the bytes of a connection in chunks of any size and returns whole
// messages. The TCP side (Asio) lives with the services.
//
// Frame (all integers little-endian):
//
//   offset size
//        0    4  magic "KVGC"
//        4    2  protocol version (kProtocolVersion)
//        6    2  message type (MessageType)
//        8    4  flags (none defined in version 1: must be 0)
//       12    4  payload length in bytes
//       16    4  CRC32C of the payload
//       20    4  CRC32C of bytes 0..19
//       24    …  payload: the message's fields in declaration order
//
// Payload fields: fixed-width integers, floats as IEEE bits, bools and
// enums as checked integers, durations as u32 milliseconds (relative: the
// nodes share no clock), strings and byte blobs as a u32 length then the
// bytes, vectors as a u32 count then the elements. Every length and count
// is checked against the bytes left in the payload before anything is
// allocated. Encoding is canonical: a payload that decodes re-encodes to
// the same bytes.
//
// Errors (all prefixed "control: "; see common/README.md for the table):
//   bad magic, header or payload CRC mismatch, truncated field,
//   trailing payload bytes, stream ends inside a frame   kDataLoss
//   unknown version (names both), type, or flag bits     kUnimplemented
//   frame larger than DecoderOptions::max_frame_bytes    kOutOfRange
//   invalid field value (enum, bool, non-finite float,
//   OK where a failure is required, list over its cap)   kInvalidArgument
// Field errors name the message and the field: "control: TransferManifest
// .segments[2].crc32c: truncated (need 4 bytes, 1 left)".
#pragma once

#include <chrono>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "common/status.h"

namespace kvgate {

// Strong id: a u64 that does not mix with other ids or counts. Zero is
// "none" (RequestId{} in a connection-level Error, for instance).
template <typename Tag>
class StrongId {
 public:
  constexpr StrongId() = default;
  constexpr explicit StrongId(uint64_t value) : value_(value) {}
  constexpr uint64_t value() const { return value_; }
  constexpr bool valid() const { return value_ != 0; }
  friend constexpr auto operator<=>(const StrongId&, const StrongId&) = default;

 private:
  uint64_t value_ = 0;
};

using RequestId = StrongId<struct RequestIdTag>;
using NodeId = StrongId<struct NodeIdTag>;
using LeaseId = StrongId<struct LeaseIdTag>;

}  // namespace kvgate

template <typename Tag>
struct std::hash<kvgate::StrongId<Tag>> {
  size_t operator()(kvgate::StrongId<Tag> id) const noexcept {
    return std::hash<uint64_t>()(id.value());
  }
};

namespace kvgate::control {

inline constexpr uint32_t kFrameMagic = 0x4347564Bu;  // bytes "KVGC"
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderBytes = 24;
inline constexpr size_t kDefaultMaxFrameBytes = size_t{16} << 20;

// Caps on lists whose elements take more memory than wire bytes, so that a
// frame cannot make the decoder allocate much more than its own size.
inline constexpr size_t kMaxStopStrings = 64;
inline constexpr size_t kMaxKvPolicyParams = 64;
// Tensor-parallel bootstrap (TpJoin / TpReady).
inline constexpr size_t kMaxTpGroupNameBytes = 128;
inline constexpr uint32_t kMaxTpWorld = 64;
inline constexpr size_t kTpUniqueIdBytes = 128;  // sizeof(ncclUniqueId)

using Bytes = std::vector<std::byte>;  // opaque blobs (addresses, rkeys, layouts)
using TokenId = int32_t;

enum class NodeRole : uint8_t { kCoordinator = 1, kPrefill = 2, kDecode = 3 };
std::string_view node_role_name(NodeRole role);

enum class FinishReason : uint8_t {
  kNone = 0,    // more chunks follow
  kStop = 1,    // end-of-sequence token or a stop string
  kLength = 2,  // max_new_tokens or the context length reached
  kCancelled = 3,
  kError = 4,  // the request failed; an Error with its request id says why
};
std::string_view finish_reason_name(FinishReason reason);

enum class MessageType : uint16_t {
  kHello = 1,
  kHelloAck = 2,
  kHelloReject = 3,
  kHeartbeat = 4,
  kReserve = 10,
  kReserveGrant = 11,
  kReserveDeny = 12,
  kExtend = 13,
  kExtendResult = 14,
  kCommit = 15,
  kRelease = 16,
  kPrefillJob = 20,
  kTransferManifest = 21,
  kTransferResult = 22,
  kTokenChunk = 30,
  kCancel = 31,
  kError = 40,
  // Added after version 1 shipped, without a version bump: only nodes that
  // run tensor parallelism send TpJoin, and a peer that does not know the
  // types rejects them as unknown (kUnimplemented) and closes the
  // connection, which the joining node sees as the join failing.
  kTpJoin = 50,
  kTpReady = 51,
};
// "Hello", ...; "Unknown" for a value that names no message.
std::string_view message_type_name(MessageType type);

// ------------------------------------------------------------- membership

// First message on every connection, from the side that connected (a node
// to the coordinator, a prefill node to a decode node). Nothing else is
// accepted before it; the peer answers HelloAck or HelloReject.
struct Hello {
  static constexpr MessageType kType = MessageType::kHello;
  NodeRole role = NodeRole::kPrefill;
  NodeId node_id;
  std::string node_name;      // for logs and metric labels
  std::string cluster_token;  // shared secret from the config (DESIGN §7 access control)
  uint16_t protocol_version = kProtocolVersion;
  std::string model_name;       // the model the node serves; empty for the coordinator
  std::string control_address;  // "host:port" this node accepts control connections on
  std::string transport_name;   // "ucx", "loopback", ...; empty for the coordinator
  Bytes transport_address;      // the KV transport's worker address, opaque
  bool operator==(const Hello&) const = default;
};

struct HelloAck {
  static constexpr MessageType kType = MessageType::kHelloAck;
  NodeId node_id;  // the accepting side's id
  uint16_t protocol_version = kProtocolVersion;
  std::chrono::milliseconds heartbeat_interval{0};  // 0: the peer sends no heartbeats
  bool operator==(const HelloAck&) const = default;
};

// Sent before closing: a bad token (kPermissionDenied), a duplicate node id
// (kFailedPrecondition), another model (kInvalidArgument), ... Never kOk.
struct HelloReject {
  static constexpr MessageType kType = MessageType::kHelloReject;
  StatusCode code = StatusCode::kPermissionDenied;
  std::string reason;
  bool operator==(const HelloReject&) const = default;
};

// Node -> coordinator, every HelloAck::heartbeat_interval.
struct Heartbeat {
  static constexpr MessageType kType = MessageType::kHeartbeat;
  NodeId node_id;
  uint64_t sequence = 0;  // increases by one per heartbeat of a connection
  uint64_t pool_free_bytes = 0;
  uint64_t pool_reserved_bytes = 0;  // granted leases not yet committed
  uint64_t pool_used_bytes = 0;      // committed KV
  uint32_t queue_length = 0;         // requests waiting (prefill jobs or admissions)
  uint64_t queued_tokens = 0;        // prompt tokens waiting (prefill) or context tokens (decode)
  uint32_t in_flight_requests = 0;
  bool operator==(const Heartbeat&) const = default;
};

// ------------------------------------------------------- leases (decode node)

// Coordinator -> decode node: reserve `size_bytes` of KV pool for a request.
struct Reserve {
  static constexpr MessageType kType = MessageType::kReserve;
  RequestId request_id;
  uint64_t size_bytes = 0;
  std::chrono::milliseconds lease_ttl{0};  // the lease expires unless committed by then
  bool operator==(const Reserve&) const = default;
};

// Decode node -> coordinator. The pool descriptor tells the prefill node
// where the request's pages are (addresses, remote keys; transport-defined).
struct ReserveGrant {
  static constexpr MessageType kType = MessageType::kReserveGrant;
  RequestId request_id;
  LeaseId lease_id;
  uint64_t granted_bytes = 0;               // page-granular, >= Reserve::size_bytes
  std::chrono::milliseconds expires_in{0};  // from when the grant was sent
  Bytes pool_descriptor;
  bool operator==(const ReserveGrant&) const = default;
};

// Decode node -> coordinator: no lease (kResourceExhausted when full).
struct ReserveDeny {
  static constexpr MessageType kType = MessageType::kReserveDeny;
  RequestId request_id;
  StatusCode code = StatusCode::kResourceExhausted;  // never kOk
  std::string reason;
  uint64_t available_bytes = 0;  // what the node could have granted
  bool operator==(const ReserveDeny&) const = default;
};

// Prefill node -> decode node: the actual footprint exceeds the grant.
struct Extend {
  static constexpr MessageType kType = MessageType::kExtend;
  RequestId request_id;
  LeaseId lease_id;
  uint64_t extra_bytes = 0;
  bool operator==(const Extend&) const = default;
};

// Decode node -> prefill node. On kOk the lease now holds `granted_bytes`
// in total, and `pool_descriptor` describes all of its pages.
struct ExtendResult {
  static constexpr MessageType kType = MessageType::kExtendResult;
  RequestId request_id;
  LeaseId lease_id;
  StatusCode code = StatusCode::kOk;
  std::string message;
  uint64_t granted_bytes = 0;
  std::chrono::milliseconds expires_in{0};
  Bytes pool_descriptor;
  Status status() const { return code == StatusCode::kOk ? Status() : Status(code, message); }
  bool operator==(const ExtendResult&) const = default;
};

// Decode node -> coordinator: the KV arrived and verified; the lease is
// committed and the request admitted to the batch.
struct Commit {
  static constexpr MessageType kType = MessageType::kCommit;
  RequestId request_id;
  LeaseId lease_id;
  uint64_t committed_bytes = 0;  // actual compressed bytes (predicted vs actual metric)
  double keep_rate = 0.0;        // share of distant tokens kept (the predictor's input)
  bool operator==(const Commit&) const = default;
};

// Coordinator -> decode node (cancel, re-placement), or decode node ->
// coordinator (finished, expired): the lease's pages are free.
struct Release {
  static constexpr MessageType kType = MessageType::kRelease;
  RequestId request_id;
  LeaseId lease_id;
  std::string reason;
  bool operator==(const Release&) const = default;
};

// ------------------------------------------------------------ prefill job

// Mirrors engine::SamplingParams (common does not depend on engine).
struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  int32_t repetition_window = 64;
  uint64_t seed = 0;
  bool operator==(const SamplingParams&) const = default;
};

// How to continue a request after the prompt; the prefill node passes it on
// to the decode node in the manifest.
struct GenerationParams {
  SamplingParams sampling;
  uint32_t max_new_tokens = 0;
  std::vector<std::string> stop_strings;  // at most kMaxStopStrings
  bool ignore_eos = false;                // keep generating past end-of-sequence tokens
  bool operator==(const GenerationParams&) const = default;
};

struct KvPolicyParam {
  std::string key;  // an engine::KvPolicyConfig field: "n_window_tokens", "keep_rate", ...
  double value = 0.0;
  bool operator==(const KvPolicyParam&) const = default;
};

struct KvPolicySpec {
  std::string name = "dense";         // engine::parse_kv_policy() names
  std::vector<KvPolicyParam> params;  // at most kMaxKvPolicyParams
  bool operator==(const KvPolicySpec&) const = default;
};

// Coordinator -> prefill node.
struct PrefillJob {
  static constexpr MessageType kType = MessageType::kPrefillJob;
  RequestId request_id;
  std::vector<TokenId> prompt_token_ids;
  GenerationParams generation;
  KvPolicySpec kv_policy;
  NodeId decode_node;
  Bytes decode_transport_address;  // Hello::transport_address of the decode node
  std::string decode_control_address;
  LeaseId lease_id;
  uint64_t granted_bytes = 0;
  Bytes pool_descriptor;                     // ReserveGrant::pool_descriptor
  std::chrono::milliseconds deadline_in{0};  // from receipt: the job and its transfer
  bool operator==(const PrefillJob&) const = default;
};

// ---------------------------------------------------------------- transfer

struct TransferSegment {
  uint64_t offset_bytes = 0;  // into the lease's pages, as the pool descriptor orders them
  uint64_t length_bytes = 0;
  uint32_t crc32c = 0;
  bool operator==(const TransferSegment&) const = default;
};

// Prefill node -> decode node, after the last segment was put. The decode
// node checks every CRC before the request may decode.
struct TransferManifest {
  static constexpr MessageType kType = MessageType::kTransferManifest;
  RequestId request_id;
  LeaseId lease_id;
  uint32_t layout_version = 0;
  Bytes layout_descriptor;  // kvstore's wire layout, opaque here
  std::vector<TransferSegment> segments;
  uint64_t actual_bytes = 0;  // compressed bytes shipped
  uint64_t dense_bytes = 0;   // what the dense cache would have taken
  double keep_rate = 0.0;
  uint32_t prompt_tokens = 0;   // the next position is this count (DESIGN §1)
  TokenId first_token_id = -1;  // sampled by the prefill node from the last logits
  GenerationParams generation;
  KvPolicySpec kv_policy;  // PrefillJob::kv_policy: how the decode node continues the cache
  // The last prompt tokens the repetition penalty looks at (at most
  // sampling.repetition_window of them), so the decode node samples exactly
  // as a single process would.
  std::vector<TokenId> prompt_tail_token_ids;
  bool operator==(const TransferManifest&) const = default;
};

// Decode node -> prefill node (and coordinator): the outcome of a transfer.
struct TransferResult {
  static constexpr MessageType kType = MessageType::kTransferResult;
  RequestId request_id;
  LeaseId lease_id;
  StatusCode code = StatusCode::kOk;  // kDataLoss: checksum; kDeadlineExceeded; ...
  std::string message;
  Status status() const { return code == StatusCode::kOk ? Status() : Status(code, message); }
  bool operator==(const TransferResult&) const = default;
};

// ------------------------------------------------------------------ output

struct Usage {
  uint32_t prompt_tokens = 0;
  uint32_t completion_tokens = 0;
  bool operator==(const Usage&) const = default;
};

// Decode node -> coordinator, as tokens are produced. The last chunk of a
// request has finish_reason != kNone.
struct TokenChunk {
  static constexpr MessageType kType = MessageType::kTokenChunk;
  RequestId request_id;
  uint32_t first_token_index = 0;  // of token_ids[0] among the completion's tokens
  std::vector<TokenId> token_ids;
  std::string text;  // UTF-8 of token_ids (may end inside a code point)
  FinishReason finish_reason = FinishReason::kNone;
  Usage usage;
  bool operator==(const TokenChunk&) const = default;
};

// Coordinator -> nodes: stop the request and free what it holds.
struct Cancel {
  static constexpr MessageType kType = MessageType::kCancel;
  RequestId request_id;
  std::string reason;
  bool operator==(const Cancel&) const = default;
};

// Either way. A request's failure, or (request_id none) the connection's,
// sent before closing it. Never kOk. Exception: a request-less Error whose
// message starts with tp_group_error_prefix(group) is a tensor-parallel
// group's failure, and the connection stays open (see TpJoin).
struct Error {
  static constexpr MessageType kType = MessageType::kError;
  RequestId request_id;
  StatusCode code = StatusCode::kInternal;
  std::string message;
  Status status() const { return Status(code, message); }
  bool operator==(const Error&) const = default;
};

// ------------------------------------------------- tensor-parallel bootstrap
// The ranks of a tensor-parallel group (one process per GPU, each a node
// registered with the coordinator) meet at the coordinator: each sends
// TpJoin; rank 0 brings the NCCL unique id. When every rank of the group has
// joined, the coordinator sends each of them the same TpReady, after which
// each calls NcclCollective::create(unique_id, rank, world). A failure of
// the group (a member's connection dropped, the group timed out, a join
// refused) reaches a rank as Error{request_id none, code, "tp group
// '<group>': ..."}; unlike other request-less Errors it does not close the
// connection. See docs/cluster.md "Tensor-parallel bootstrap".

// Node -> coordinator. Decoding checks: group 1..kMaxTpGroupNameBytes
// bytes, world 1..kMaxTpWorld, rank < world, unique_id exactly
// kTpUniqueIdBytes from rank 0 and empty from every other rank.
struct TpJoin {
  static constexpr MessageType kType = MessageType::kTpJoin;
  std::string group;  // names the group; chosen by the operator / launcher
  uint32_t rank = 0;
  uint32_t world = 1;
  Bytes unique_id;  // ncclUniqueId bytes from rank 0; empty from the others
  bool operator==(const TpJoin&) const = default;
};

struct TpMember {
  NodeId node_id;
  std::string node_name;  // Hello::node_name
  bool operator==(const TpMember&) const = default;
};

// Coordinator -> every member once the group is complete; identical for all
// of them. Decoding checks: group as in TpJoin, world 1..kMaxTpWorld,
// unique_id exactly kTpUniqueIdBytes, members.size() == world (members[r]
// holds rank r).
struct TpReady {
  static constexpr MessageType kType = MessageType::kTpReady;
  std::string group;
  uint32_t world = 1;
  Bytes unique_id;
  std::vector<TpMember> members;
  bool operator==(const TpReady&) const = default;
};

// "tp group '<group>': " — how every Error about a group begins, so that a
// rank can tell its group's failure from other request-less Errors.
std::string tp_group_error_prefix(std::string_view group);

using Message = std::variant<Hello, HelloAck, HelloReject, Heartbeat, Reserve, ReserveGrant,
                             ReserveDeny, Extend, ExtendResult, Commit, Release, PrefillJob,
                             TransferManifest, TransferResult, TokenChunk, Cancel, Error, TpJoin,
                             TpReady>;

MessageType message_type(const Message& message);

// ---------------------------------------------------------------- encoding

// One frame holding `message`. Messages are built by us, so keeping them
// decodable is ours to do (asserted in debug builds): a payload under 4 GiB
// and under the peer's max_frame_bytes (a prompt fits the context), finite
// floats, lists within their caps. Durations are clamped to [0, 2^32) ms.
std::vector<std::byte> encode(const Message& message);
// Appends the frame to `out` (reuse one buffer per connection).
void encode_to(const Message& message, std::vector<std::byte>& out);
// kFrameHeaderBytes + the payload's size; compare with the peer's limit.
size_t encoded_frame_bytes(const Message& message);

// ------------------------------------------------------------------ decoding

struct DecoderOptions {
  // Largest frame accepted, header included. Checked against the header's
  // length field before any byte of the payload is buffered.
  size_t max_frame_bytes = kDefaultMaxFrameBytes;
};

// Incremental decoder of one connection's byte stream. Owned by the thread
// (strand) that reads the connection; not thread-safe; never blocks.
//
//   decoder.feed(chunk);
//   while (true) {
//     auto m = decoder.next();
//     if (!m.ok()) { log(m.status()); close(); break; }  // sticky
//     if (!*m) break;                                     // need more bytes
//     dispatch(**m);
//   }
//
// Memory held is what was fed and not yet decoded, never what a header
// claims; drain next() after each feed.
class FrameDecoder {
 public:
  explicit FrameDecoder(DecoderOptions options = {});

  // Buffers `bytes`. Ignored once the decoder has failed.
  void feed(std::span<const std::byte> bytes);

  // The next whole message, std::nullopt if more bytes are needed, or an
  // error. After an error the stream is out of sync: every later call
  // returns the same error and the caller must close the connection.
  Result<std::optional<Message>> next();

  // E.g. a small limit until the peer's Hello is verified, then the
  // configured one. Applies from the next frame header checked.
  void set_max_frame_bytes(size_t max_frame_bytes) { options_.max_frame_bytes = max_frame_bytes; }

  bool usable() const { return error_.ok(); }
  const Status& error() const { return error_; }

  // For end of stream: kDataLoss if it ends inside a frame, the sticky
  // error if the decoder failed, else OK.
  Status finish() const;

  size_t buffered_bytes() const { return buffer_.size() - head_; }
  uint64_t bytes_consumed() const { return bytes_consumed_; }  // by decoded frames
  uint64_t frames_decoded() const { return frames_decoded_; }

 private:
  Status fail(Status status);

  DecoderOptions options_;
  std::vector<std::byte> buffer_;
  size_t head_ = 0;  // start of the first undecoded byte in buffer_
  uint64_t bytes_consumed_ = 0;
  uint64_t frames_decoded_ = 0;
  Status error_;
};

// --------------------------------------------------------------- low level
// For the decoder, the fuzz target and tests that build malformed frames.

// Payload size of `message` and its bytes; `out.size()` must equal it.
size_t payload_bytes(const Message& message);
void write_payload(const Message& message, std::span<std::byte> out);

// Decodes one payload of a known type (no framing, no CRC); the errors are
// those of FrameDecoder::next() for the payload.
Result<Message> decode_payload(MessageType type, std::span<const std::byte> payload);

// True if `type` names a message of this protocol version.
bool is_known_message_type(uint16_t type);

// Appends a frame with a correct length and both CRCs around any payload,
// with any type, version and flags.
void append_raw_frame(uint16_t type, std::span<const std::byte> payload,
                      std::vector<std::byte>& out, uint16_t version = kProtocolVersion,
                      uint32_t flags = 0);

}  // namespace kvgate::control
