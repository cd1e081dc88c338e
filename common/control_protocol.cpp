// Framing of the control protocol: frame headers, encode, FrameDecoder.
// The payload codecs are in control_messages.cpp.
#include "common/control_protocol.h"

#include <cassert>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "common/crc32c.h"

namespace kvgate::control {
namespace {

constexpr size_t kHeaderCrcOffset = 20;  // the header CRC covers bytes [0, 20)
constexpr size_t kMagicEnd = 4;          // bytes needed to check the magic
constexpr size_t kVersionEnd = 6;        // ... and the version

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  uint16_t type = 0;
  uint32_t flags = 0;
  uint32_t payload_bytes = 0;
  uint32_t payload_crc32c = 0;
  uint32_t header_crc32c = 0;
};

void store_le(std::byte* p, uint64_t v, size_t width) {
  for (size_t i = 0; i < width; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}

uint64_t load_le(const std::byte* p, size_t width) {
  uint64_t v = 0;
  for (size_t i = width; i-- > 0;) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
  return v;
}

// Writes the header at `p` (kFrameHeaderBytes) and seals it with its CRC.
void write_header(std::byte* p, const FrameHeader& h) {
  store_le(p + 0, h.magic, 4);
  store_le(p + 4, h.version, 2);
  store_le(p + 6, h.type, 2);
  store_le(p + 8, h.flags, 4);
  store_le(p + 12, h.payload_bytes, 4);
  store_le(p + 16, h.payload_crc32c, 4);
  store_le(p + kHeaderCrcOffset, crc32c(p, kHeaderCrcOffset), 4);
}

FrameHeader read_header(const std::byte* p) {
  FrameHeader h;
  h.magic = static_cast<uint32_t>(load_le(p + 0, 4));
  h.version = static_cast<uint16_t>(load_le(p + 4, 2));
  h.type = static_cast<uint16_t>(load_le(p + 6, 2));
  h.flags = static_cast<uint32_t>(load_le(p + 8, 4));
  h.payload_bytes = static_cast<uint32_t>(load_le(p + 12, 4));
  h.payload_crc32c = static_cast<uint32_t>(load_le(p + 16, 4));
  h.header_crc32c = static_cast<uint32_t>(load_le(p + kHeaderCrcOffset, 4));
  return h;
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

std::string type_label(uint16_t type) {
  return std::string(message_type_name(static_cast<MessageType>(type)));
}

}  // namespace

std::string_view node_role_name(NodeRole role) {
  switch (role) {
    case NodeRole::kCoordinator:
      return "coordinator";
    case NodeRole::kPrefill:
      return "prefill";
    case NodeRole::kDecode:
      return "decode";
  }
  return "unknown";
}

std::string_view finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

std::string tp_group_error_prefix(std::string_view group) {
  return "tp group '" + std::string(group) + "': ";
}

std::string_view message_type_name(MessageType type) {
  switch (type) {
    case MessageType::kHello:
      return "Hello";
    case MessageType::kHelloAck:
      return "HelloAck";
    case MessageType::kHelloReject:
      return "HelloReject";
    case MessageType::kHeartbeat:
      return "Heartbeat";
    case MessageType::kReserve:
      return "Reserve";
    case MessageType::kReserveGrant:
      return "ReserveGrant";
    case MessageType::kReserveDeny:
      return "ReserveDeny";
    case MessageType::kExtend:
      return "Extend";
    case MessageType::kExtendResult:
      return "ExtendResult";
    case MessageType::kCommit:
      return "Commit";
    case MessageType::kRelease:
      return "Release";
    case MessageType::kPrefillJob:
      return "PrefillJob";
    case MessageType::kTransferManifest:
      return "TransferManifest";
    case MessageType::kTransferResult:
      return "TransferResult";
    case MessageType::kTokenChunk:
      return "TokenChunk";
    case MessageType::kCancel:
      return "Cancel";
    case MessageType::kError:
      return "Error";
    case MessageType::kTpJoin:
      return "TpJoin";
    case MessageType::kTpReady:
      return "TpReady";
  }
  return "Unknown";
}

// ---------------------------------------------------------------- encoding

void append_raw_frame(uint16_t type, std::span<const std::byte> payload,
                      std::vector<std::byte>& out, uint16_t version, uint32_t flags) {
  assert(payload.size() <= std::numeric_limits<uint32_t>::max());
  const size_t at = out.size();
  out.resize(at + kFrameHeaderBytes + payload.size());
  if (!payload.empty()) {
    std::memcpy(out.data() + at + kFrameHeaderBytes, payload.data(), payload.size());
  }
  FrameHeader h;
  h.version = version;
  h.type = type;
  h.flags = flags;
  h.payload_bytes = static_cast<uint32_t>(payload.size());
  h.payload_crc32c = crc32c(payload.data(), payload.size());
  write_header(out.data() + at, h);
}

void encode_to(const Message& message, std::vector<std::byte>& out) {
  const size_t n = payload_bytes(message);
  assert(n <= std::numeric_limits<uint32_t>::max() && "control message over 4 GiB");
  const size_t at = out.size();
  out.resize(at + kFrameHeaderBytes + n);
  std::byte* payload = out.data() + at + kFrameHeaderBytes;
  write_payload(message, std::span<std::byte>(payload, n));
  FrameHeader h;
  h.type = static_cast<uint16_t>(message_type(message));
  h.payload_bytes = static_cast<uint32_t>(n);
  h.payload_crc32c = crc32c(payload, n);
  write_header(out.data() + at, h);
}

std::vector<std::byte> encode(const Message& message) {
  std::vector<std::byte> out;
  encode_to(message, out);
  return out;
}

size_t encoded_frame_bytes(const Message& message) {
  return kFrameHeaderBytes + payload_bytes(message);
}

// ---------------------------------------------------------------- decoding

FrameDecoder::FrameDecoder(DecoderOptions options) : options_(options) {}

void FrameDecoder::feed(std::span<const std::byte> bytes) {
  if (!error_.ok() || bytes.empty()) return;
  // Drop what was decoded once it is at least half the buffer, so the
  // copying stays linear in the bytes fed.
  if (head_ != 0 && head_ * 2 >= buffer_.size()) {
    buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<std::ptrdiff_t>(head_));
    head_ = 0;
  }
  buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
}

Status FrameDecoder::fail(Status status) {
  error_ = std::move(status);
  // The stream is out of sync; nothing buffered can be used any more.
  std::vector<std::byte>().swap(buffer_);
  head_ = 0;
  return error_;
}

Result<std::optional<Message>> FrameDecoder::next() {
  if (!error_.ok()) return error_;
  const std::byte* p = buffer_.data() + head_;
  const size_t avail = buffer_.size() - head_;
  if (avail == 0) return std::optional<Message>();

  // Checked in this order as soon as the bytes for each check are there,
  // so the first problem reported does not depend on how bytes arrive.
  if (avail >= kMagicEnd) {
    const auto magic = static_cast<uint32_t>(load_le(p, 4));
    if (magic != kFrameMagic) {
      return fail(data_loss("control: bad frame magic " + hex32(magic) + " (expected " +
                            hex32(kFrameMagic) + " \"KVGC\"): not a kvgate control stream"));
    }
  }
  if (avail >= kVersionEnd) {
    // Before the header CRC: another version may lay its header out otherwise.
    const auto version = static_cast<uint16_t>(load_le(p + 4, 2));
    if (version != kProtocolVersion) {
      return fail(unimplemented("control: peer speaks protocol version " + std::to_string(version) +
                                ", this node speaks version " + std::to_string(kProtocolVersion)));
    }
  }
  if (avail < kFrameHeaderBytes) return std::optional<Message>();

  const FrameHeader h = read_header(p);
  const uint32_t header_crc = crc32c(p, kHeaderCrcOffset);
  if (header_crc != h.header_crc32c) {
    return fail(data_loss("control: frame header checksum mismatch (computed " + hex32(header_crc) +
                          ", header says " + hex32(h.header_crc32c) + ")"));
  }
  if (!is_known_message_type(h.type)) {
    return fail(unimplemented("control: unknown message type " + std::to_string(h.type) +
                              " (protocol version " + std::to_string(kProtocolVersion) + ")"));
  }
  if (h.flags != 0) {
    return fail(unimplemented("control: " + type_label(h.type) + " frame has unknown flags " +
                              hex32(h.flags)));
  }
  const size_t max_payload = options_.max_frame_bytes > kFrameHeaderBytes
                                 ? options_.max_frame_bytes - kFrameHeaderBytes
                                 : 0;
  if (h.payload_bytes > max_payload) {
    return fail(Status(StatusCode::kOutOfRange,
                       "control: " + type_label(h.type) + " frame of " +
                           std::to_string(kFrameHeaderBytes + uint64_t{h.payload_bytes}) +
                           " bytes exceeds the limit of " +
                           std::to_string(options_.max_frame_bytes) + " bytes"));
  }
  const size_t frame_bytes = kFrameHeaderBytes + h.payload_bytes;
  if (avail < frame_bytes) return std::optional<Message>();

  const std::span<const std::byte> payload(p + kFrameHeaderBytes, h.payload_bytes);
  const uint32_t payload_crc = crc32c(payload.data(), payload.size());
  if (payload_crc != h.payload_crc32c) {
    return fail(data_loss("control: " + type_label(h.type) +
                          " payload checksum mismatch (computed " + hex32(payload_crc) +
                          ", header says " + hex32(h.payload_crc32c) + ")"));
  }
  Result<Message> message = decode_payload(static_cast<MessageType>(h.type), payload);
  if (!message.ok()) return fail(message.status());

  head_ += frame_bytes;
  bytes_consumed_ += frame_bytes;
  ++frames_decoded_;
  if (head_ == buffer_.size()) {
    head_ = 0;
    buffer_.clear();
    // Give back the room a large frame needed; keep a small buffer warm.
    if (buffer_.capacity() > (size_t{1} << 20)) std::vector<std::byte>().swap(buffer_);
  }
  return std::optional<Message>(std::move(message).value());
}

Status FrameDecoder::finish() const {
  if (!error_.ok()) return error_;
  const size_t avail = buffered_bytes();
  if (avail == 0) return Status();
  std::string what = "control: stream ended inside a frame (" + std::to_string(avail) + " bytes";
  if (avail >= kFrameHeaderBytes) {
    const FrameHeader h = read_header(buffer_.data() + head_);
    what += " of a " + std::to_string(kFrameHeaderBytes + uint64_t{h.payload_bytes}) + "-byte " +
            type_label(h.type) + " frame";
  }
  return data_loss(what + ")");
}

}  // namespace kvgate::control
