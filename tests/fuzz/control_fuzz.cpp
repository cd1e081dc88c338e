// Fuzz target for the control protocol's decoder (common/control_protocol.h).
// Built as a libFuzzer binary (control_fuzz, clang, KVGATE_FUZZ=ON) and,
// with any compiler, linked into the deterministic control_fuzz_smoke driver.
//
// The first input byte picks the mode:
//   even  the rest is a byte stream for FrameDecoder, fed whole and in
//         chunks whose sizes come from the input; both must agree
//   odd   bytes 1-2 are a message type and the rest its payload, decoded
//         with decode_payload() and, framed with valid CRCs, by the decoder
//         (random payloads would otherwise never get past the CRC)
// Checked: no crash or sanitizer report; every error says "control: " and
// carries a decoder error code; whatever decodes re-encodes to the exact
// bytes it came from (the encoding is canonical), and a decoded TpJoin /
// TpReady (types 50/51; seeded by control_fuzz_driver.cpp) holds what the
// decoder promises (group, world, rank, unique id, members).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "common/control_protocol.h"

namespace {

using kvgate::Status;
using kvgate::StatusCode;
using namespace kvgate::control;

#define FUZZ_CHECK(cond)                                                                           \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      std::fprintf(stderr, "control_fuzz: check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                                \
    }                                                                                              \
  } while (0)

constexpr size_t kMaxFrameBytes = 64 << 10;  // small, so the limit is hit too

void check_error(const Status& s) {
  FUZZ_CHECK(!s.ok());
  FUZZ_CHECK(s.message().rfind("control: ", 0) == 0);
  const StatusCode c = s.code();
  FUZZ_CHECK(c == StatusCode::kDataLoss || c == StatusCode::kInvalidArgument ||
             c == StatusCode::kUnimplemented || c == StatusCode::kOutOfRange);
}

// The decode checks of the tensor-parallel bootstrap messages held.
void check_decoded(const Message& m) {
  if (const auto* j = std::get_if<TpJoin>(&m)) {
    FUZZ_CHECK(!j->group.empty() && j->group.size() <= kMaxTpGroupNameBytes);
    FUZZ_CHECK(j->world >= 1 && j->world <= kMaxTpWorld && j->rank < j->world);
    FUZZ_CHECK(j->unique_id.size() == (j->rank == 0 ? kTpUniqueIdBytes : 0));
  } else if (const auto* r = std::get_if<TpReady>(&m)) {
    FUZZ_CHECK(!r->group.empty() && r->group.size() <= kMaxTpGroupNameBytes);
    FUZZ_CHECK(r->world >= 1 && r->world <= kMaxTpWorld);
    FUZZ_CHECK(r->unique_id.size() == kTpUniqueIdBytes && r->members.size() == r->world);
  }
}

// What a decoder made of a stream: the frames it decoded (re-encoded) and
// how it ended.
struct Outcome {
  std::vector<std::byte> reencoded;
  uint64_t frames = 0;
  uint64_t consumed = 0;
  std::string end;  // final status, "OK" or the error
};

// Feeds `stream` in chunks; `chunk_sizes` cycles through chunk lengths
// (empty: all at once). Checks each frame re-encodes to its own bytes.
Outcome run_decoder(std::span<const std::byte> stream, std::span<const uint8_t> chunk_sizes) {
  DecoderOptions options;
  options.max_frame_bytes = kMaxFrameBytes;
  FrameDecoder d(options);
  Outcome out;
  size_t at = 0;
  size_t k = 0;
  Status failure;
  while (at < stream.size() && failure.ok()) {
    size_t n = stream.size() - at;
    if (!chunk_sizes.empty()) n = std::min<size_t>(n, 1 + chunk_sizes[k++ % chunk_sizes.size()]);
    d.feed(stream.subspan(at, n));
    at += n;
    while (true) {
      const uint64_t before = d.bytes_consumed();
      auto m = d.next();
      if (!m.ok()) {
        failure = m.status();
        check_error(failure);
        FUZZ_CHECK(!d.usable() && d.buffered_bytes() == 0);
        FUZZ_CHECK(d.next().status().message() == failure.message());  // sticky
        break;
      }
      if (!m->has_value()) break;
      check_decoded(**m);
      const std::vector<std::byte> frame = encode(**m);
      FUZZ_CHECK(frame.size() == encoded_frame_bytes(**m));
      FUZZ_CHECK(d.bytes_consumed() - before == frame.size());
      FUZZ_CHECK(before + frame.size() <= stream.size());
      FUZZ_CHECK(std::equal(frame.begin(), frame.end(), stream.begin() + before));
      out.reencoded.insert(out.reencoded.end(), frame.begin(), frame.end());
    }
  }
  out.frames = d.frames_decoded();
  out.consumed = d.bytes_consumed();
  const Status end = d.finish();
  if (!end.ok()) check_error(end);
  out.end = end.to_string();
  return out;
}

void fuzz_stream(std::span<const std::byte> stream) {
  const Outcome whole = run_decoder(stream, {});
  // Chunk sizes from the stream's own bytes: splits land everywhere.
  std::vector<uint8_t> sizes;
  for (size_t i = 0; i < std::min<size_t>(stream.size(), 16); ++i) {
    sizes.push_back(std::to_integer<uint8_t>(stream[stream.size() - 1 - i]) % 23);
  }
  sizes.push_back(0);  // at least one single-byte chunk
  const Outcome chunked = run_decoder(stream, sizes);
  FUZZ_CHECK(whole.frames == chunked.frames);
  FUZZ_CHECK(whole.consumed == chunked.consumed);
  FUZZ_CHECK(whole.reencoded == chunked.reencoded);
  FUZZ_CHECK(whole.end == chunked.end);
}

void fuzz_payload(uint16_t type, std::span<const std::byte> payload) {
  auto m = decode_payload(static_cast<MessageType>(type), payload);
  if (!m.ok()) {
    check_error(m.status());
    FUZZ_CHECK(is_known_message_type(type) || m.status().code() == StatusCode::kUnimplemented);
  } else {
    FUZZ_CHECK(is_known_message_type(type));
    FUZZ_CHECK(static_cast<uint16_t>(message_type(*m)) == type);
    FUZZ_CHECK(payload_bytes(*m) == payload.size());
    check_decoded(*m);
    std::vector<std::byte> again(payload.size());
    write_payload(*m, again);
    FUZZ_CHECK(std::equal(again.begin(), again.end(), payload.begin()));
  }
  // The same payload in a well-formed frame reaches the same verdict.
  if (payload.size() + kFrameHeaderBytes > kMaxFrameBytes) return;
  std::vector<std::byte> frame;
  append_raw_frame(type, payload, frame);
  const Outcome framed = run_decoder(frame, {});
  if (m.ok()) {
    FUZZ_CHECK(framed.frames == 1 && framed.end == "OK");
  } else {
    FUZZ_CHECK(framed.frames == 0);
    if (is_known_message_type(type)) FUZZ_CHECK(framed.end == m.status().to_string());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto* bytes = reinterpret_cast<const std::byte*>(data);
  if ((data[0] & 1) == 0) {
    fuzz_stream(std::span<const std::byte>(bytes + 1, size - 1));
  } else if (size >= 3) {
    const auto type = static_cast<uint16_t>(data[1] | (data[2] << 8));
    fuzz_payload(type, std::span<const std::byte>(bytes + 3, size - 3));
  }
  return 0;
}
