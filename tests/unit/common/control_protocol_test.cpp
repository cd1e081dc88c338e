#include "common/control_protocol.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "common/crc32c.h"

// Largest single allocation while tracking is on: the decoder must never
// allocate by what a header claims.
namespace {
std::atomic<bool> g_track_allocations{false};
std::atomic<size_t> g_largest_allocation{0};
}  // namespace

void* operator new(size_t n) {
  if (g_track_allocations.load(std::memory_order_relaxed)) {
    size_t prev = g_largest_allocation.load(std::memory_order_relaxed);
    while (n > prev && !g_largest_allocation.compare_exchange_weak(prev, n)) {
    }
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
// Not inlined, so that gcc does not pair inlined free() with `new` and warn.
[[gnu::noinline]] void operator delete(void* p) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete(void* p, size_t) noexcept {
  std::free(p);
}

namespace kvgate::control {
namespace {

using namespace std::chrono_literals;

Bytes blob(std::string_view s) {
  Bytes b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

GenerationParams sample_generation() {
  GenerationParams g;
  g.sampling = {0.7f, 40, 0.9f, 0.05f, 1.1f, 32, 0xDEADBEEFCAFEull};
  g.max_new_tokens = 512;
  g.stop_strings = {"</s>", "", "\n\nUser:", "\xe2\x98\x83"};
  g.ignore_eos = true;
  return g;
}

// One of every message, with every field set to something non-default.
std::vector<Message> sample_messages() {
  std::vector<Message> v;
  v.push_back(Hello{NodeRole::kDecode, NodeId(7), "decode-0", "s3cr3t-token", kProtocolVersion,
                    "SmolLM2-135M-Instruct", "127.0.0.1:7101", "ucx",
                    blob(std::string("\x00\x01\xff\x7f worker", 12))});
  v.push_back(HelloAck{NodeId(1), kProtocolVersion, 250ms});
  v.push_back(HelloReject{StatusCode::kPermissionDenied, "bad cluster token"});
  v.push_back(Heartbeat{NodeId(7), 42, 1ull << 33, 123456789, 987654321, 5, 40960, 3});
  v.push_back(Reserve{RequestId(0x1234567890ull), 3u << 20, 5000ms});
  v.push_back(ReserveGrant{RequestId(0x1234567890ull), LeaseId(99), 4u << 20, 4999ms,
                           blob("pages:0x7f00,0x8f00;rkey:abcdef")});
  v.push_back(ReserveDeny{RequestId(5), StatusCode::kResourceExhausted, "pool full", 1024});
  v.push_back(Extend{RequestId(5), LeaseId(99), 65536});
  v.push_back(ExtendResult{RequestId(5), LeaseId(99), StatusCode::kOk, "", 4259840, 3000ms,
                           blob("more pages")});
  v.push_back(Commit{RequestId(5), LeaseId(99), 4000000, 0.3125});
  v.push_back(Release{RequestId(5), LeaseId(99), "finished"});
  PrefillJob job;
  job.request_id = RequestId(77);
  job.prompt_token_ids = {1, 2, 3, 49151, 0, -1, 12345};
  job.generation = sample_generation();
  job.kv_policy = {"gate+pod", {{"n_window_tokens", 256}, {"keep_rate", 0.25}}};
  job.decode_node = NodeId(7);
  job.decode_transport_address = blob("ucx-worker-address");
  job.decode_control_address = "127.0.0.1:7101";
  job.lease_id = LeaseId(99);
  job.granted_bytes = 4u << 20;
  job.pool_descriptor = blob("descriptor");
  job.deadline_in = 30000ms;
  v.push_back(job);
  TransferManifest man;
  man.request_id = RequestId(77);
  man.lease_id = LeaseId(99);
  man.layout_version = 3;
  man.layout_descriptor = blob("layout");
  man.segments = {{0, 4096, 0xE3069283u}, {4096, 8192, 0x12345678u}, {12288, 1, 0}};
  man.actual_bytes = 12289;
  man.dense_bytes = 40000;
  man.keep_rate = 0.3;
  man.prompt_tokens = 4000;
  man.first_token_id = 17;
  man.generation = sample_generation();
  man.kv_policy = KvPolicySpec{"gate+pod", {{"n_window_tokens", 256}, {"budget_tokens", 64}}};
  man.prompt_tail_token_ids = {101, 102, 49151};
  v.push_back(man);
  v.push_back(TransferResult{RequestId(77), LeaseId(99), StatusCode::kDataLoss,
                             "segment 2: CRC32C mismatch"});
  v.push_back(
      TokenChunk{RequestId(77), 3, {17, 18, 19}, "Hello w\xc3", FinishReason::kLength, {4000, 6}});
  v.push_back(Cancel{RequestId(77), "client disconnected"});
  v.push_back(Error{RequestId(), StatusCode::kUnavailable, "decode node draining"});
  Bytes nccl_id(kTpUniqueIdBytes);
  for (size_t i = 0; i < nccl_id.size(); ++i) nccl_id[i] = std::byte(i * 37 + 5);
  v.push_back(TpJoin{"llama-70b/tp0", 0, 4, nccl_id});
  v.push_back(TpReady{"llama-70b/tp0", 2, nccl_id, {{NodeId(7), "gpu-0"}, {NodeId(9), "gpu-1"}}});
  return v;
}

std::vector<std::byte> stream_of(const std::vector<Message>& messages) {
  std::vector<std::byte> out;
  for (const Message& m : messages) encode_to(m, out);
  return out;
}

// Feeds `stream` in chunks starting at `splits` and drains after each.
Result<std::vector<Message>> decode_all(std::span<const std::byte> stream,
                                        const std::vector<size_t>& splits,
                                        DecoderOptions options = {}) {
  FrameDecoder d(options);
  std::vector<Message> out;
  size_t at = 0;
  auto drain = [&]() -> Status {
    while (true) {
      auto m = d.next();
      if (!m.ok()) return m.status();
      if (!*m) return Status();
      out.push_back(std::move(**m));
    }
  };
  for (size_t i = 0; i <= splits.size(); ++i) {
    const size_t end = i < splits.size() ? splits[i] : stream.size();
    d.feed(stream.subspan(at, end - at));
    at = end;
    KVGATE_RETURN_IF_ERROR(drain());
  }
  KVGATE_RETURN_IF_ERROR(d.finish());
  return out;
}

Status decode_error(std::span<const std::byte> stream, DecoderOptions options = {}) {
  auto r = decode_all(stream, {}, options);
  return r.ok() ? Status() : r.status();
}

std::vector<std::byte> payload_of(const Message& m) {
  std::vector<std::byte> p(payload_bytes(m));
  write_payload(m, p);
  return p;
}

std::vector<std::byte> raw_frame(MessageType type, std::span<const std::byte> payload) {
  std::vector<std::byte> out;
  append_raw_frame(static_cast<uint16_t>(type), payload, out);
  return out;
}

void put_le(std::vector<std::byte>& b, size_t at, uint64_t v, size_t width) {
  for (size_t i = 0; i < width; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
}

#define EXPECT_STATUS(status, code_, text)                                   \
  do {                                                                       \
    const ::kvgate::Status s_ = (status);                                    \
    EXPECT_EQ(s_.code(), code_) << s_.to_string();                           \
    EXPECT_NE(s_.message().find(text), std::string::npos) << s_.to_string(); \
  } while (0)

// ------------------------------------------------------------------ crc32c

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  EXPECT_EQ(crc32c("a", 1), 0xC1D04330u);
  // RFC 3720 (iSCSI) B.4.
  std::vector<uint8_t> b(32, 0);
  EXPECT_EQ(crc32c(b.data(), b.size()), 0x8A9136AAu);
  std::fill(b.begin(), b.end(), 0xFF);
  EXPECT_EQ(crc32c(b.data(), b.size()), 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) b[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(crc32c(b.data(), b.size()), 0x46DD794Eu);
  for (int i = 0; i < 32; ++i) b[i] = static_cast<uint8_t>(31 - i);
  EXPECT_EQ(crc32c(b.data(), b.size()), 0x113FDB5Cu);
  EXPECT_EQ(crc32c_portable("123456789", 9), 0xE3069283u);
}

TEST(Crc32c, SplitUpdateEqualsOneShot) {
  std::mt19937 rng(1);
  std::vector<uint8_t> data(1000);
  for (auto& x : data) x = static_cast<uint8_t>(rng());
  const uint32_t whole = crc32c(data.data(), data.size());
  EXPECT_EQ(crc32c_portable(data.data(), data.size()), whole);
  for (size_t k = 0; k <= data.size(); ++k) {
    const uint32_t a = crc32c(data.data(), k);
    ASSERT_EQ(crc32c(data.data() + k, data.size() - k, a), whole) << "split at " << k;
    ASSERT_EQ(crc32c_portable(data.data() + k, data.size() - k, crc32c_portable(data.data(), k)),
              whole);
  }
}

// Buffers of 24 KiB and more take the three-stream path (three interleaved
// chains folded by a precomputed shift): lengths around and across its
// block boundaries, several blocks, odd tails and alignments, seeds.
TEST(Crc32c, InterleavedPathMatchesTable) {
  std::mt19937 rng(3);
  std::vector<uint8_t> data(3 * 3 * 8192 + 4096);
  for (auto& x : data) x = static_cast<uint8_t>(rng());
  for (size_t n : {size_t{3 * 8192 - 1}, size_t{3 * 8192}, size_t{3 * 8192 + 1},
                   size_t{3 * 8192 + 8}, size_t{2 * 3 * 8192 - 3}, size_t{3 * 3 * 8192},
                   data.size() - 7}) {
    for (size_t off : {0, 1, 5}) {
      if (off + n > data.size()) continue;
      ASSERT_EQ(crc32c(data.data() + off, n, 0xDEADBEEFu),
                crc32c_portable(data.data() + off, n, 0xDEADBEEFu))
          << off << "+" << n;
    }
  }
  // One flipped bit anywhere changes the checksum.
  const uint32_t whole = crc32c(data.data(), data.size());
  data[40000] ^= 0x10;
  EXPECT_NE(crc32c(data.data(), data.size()), whole);
}

TEST(Crc32c, HardwareMatchesTableAtEveryLengthAndAlignment) {
  std::mt19937 rng(2);
  std::vector<uint8_t> data(300);
  for (auto& x : data) x = static_cast<uint8_t>(rng());
  for (size_t off = 0; off < 8; ++off) {
    for (size_t n = 0; off + n <= data.size(); n += 1 + n / 16) {
      ASSERT_EQ(crc32c(data.data() + off, n, 0x1234u),
                crc32c_portable(data.data() + off, n, 0x1234u))
          << off << "+" << n;
    }
  }
  std::printf("crc32c hardware: %s\n", crc32c_hardware_available() ? "yes" : "no");
}

// --------------------------------------------------------------- round trip

TEST(ControlProtocol, SamplesCoverEveryMessageType) {
  std::vector<bool> seen(std::variant_size_v<Message>, false);
  for (const Message& m : sample_messages()) seen[m.index()] = true;
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_TRUE(seen[i]) << "no sample of index " << i;
}

TEST(ControlProtocol, EveryMessageRoundTrips) {
  for (const Message& m : sample_messages()) {
    const std::string name(message_type_name(message_type(m)));
    EXPECT_NE(name, "Unknown");
    const std::vector<std::byte> frame = encode(m);
    EXPECT_EQ(frame.size(), encoded_frame_bytes(m)) << name;
    FrameDecoder d;
    d.feed(frame);
    auto got = d.next();
    ASSERT_TRUE(got.ok()) << name << ": " << got.status().to_string();
    ASSERT_TRUE(got->has_value()) << name;
    EXPECT_EQ(**got, m) << name;
    EXPECT_EQ(d.bytes_consumed(), frame.size());
    EXPECT_EQ(d.buffered_bytes(), 0u);
    EXPECT_TRUE(d.finish().ok());
    // The payload codec alone agrees, and re-encoding is byte-identical.
    auto again = decode_payload(message_type(m), payload_of(m));
    ASSERT_TRUE(again.ok()) << again.status().to_string();
    EXPECT_EQ(encode(*again), frame) << name;
  }
}

TEST(ControlProtocol, DefaultMessagesRoundTrip) {
  for (const Message& sample : sample_messages()) {
    Message m =
        std::visit([](const auto& x) -> Message { return std::decay_t<decltype(x)>{}; }, sample);
    auto got = decode_all(encode(m), {});
    if (std::holds_alternative<TpJoin>(m) || std::holds_alternative<TpReady>(m)) {
      // No valid default: a group must be named and carry rank 0's id.
      ASSERT_FALSE(got.ok());
      EXPECT_EQ(got.status().code(), StatusCode::kInvalidArgument);
      EXPECT_NE(got.status().message().find(".group: empty"), std::string::npos)
          << got.status().to_string();
      continue;
    }
    ASSERT_TRUE(got.ok()) << got.status().to_string();
    ASSERT_EQ(got->size(), 1u);
    EXPECT_EQ(got->front(), m);
  }
}

TEST(ControlProtocol, DurationsAreClampedToTheWireRange) {
  auto got = decode_all(encode(Reserve{RequestId(1), 10, -5ms}), {});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(std::get<Reserve>(got->front()).lease_ttl, 0ms);
  got = decode_all(encode(HelloAck{NodeId(1), 1, std::chrono::hours(24 * 100)}), {});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(std::get<HelloAck>(got->front()).heartbeat_interval.count(), 0xFFFFFFFFll);
}

TEST(ControlProtocol, EverySplitPointGivesTheSameMessages) {
  const std::vector<Message> messages = sample_messages();
  const std::vector<std::byte> stream = stream_of(messages);
  for (size_t k = 0; k <= stream.size(); ++k) {
    auto got = decode_all(stream, {k});
    ASSERT_TRUE(got.ok()) << "split at " << k << ": " << got.status().to_string();
    ASSERT_EQ(*got, messages) << "split at " << k;
  }
  std::vector<size_t> every_byte(stream.size());
  for (size_t i = 0; i < stream.size(); ++i) every_byte[i] = i;
  auto got = decode_all(stream, every_byte);
  ASSERT_TRUE(got.ok()) << got.status().to_string();
  EXPECT_EQ(*got, messages);
}

TEST(ControlProtocol, EncodeToAppends) {
  std::vector<std::byte> buf;
  const auto messages = sample_messages();
  for (const Message& m : messages) encode_to(m, buf);
  EXPECT_EQ(buf, stream_of(messages));
}

// ---------------------------------------------------------------- framing

TEST(ControlProtocol, BadMagicIsDataLoss) {
  auto frame = encode(Cancel{RequestId(1), "x"});
  frame[0] = std::byte{'X'};
  EXPECT_STATUS(decode_error(frame), StatusCode::kDataLoss, "bad frame magic");
  // Reported as soon as four bytes are in.
  FrameDecoder d;
  d.feed(std::span(frame).first(4));
  EXPECT_FALSE(d.next().ok());
  EXPECT_FALSE(d.usable());
}

TEST(ControlProtocol, UnknownVersionNamesBothVersions) {
  std::vector<std::byte> frame;
  append_raw_frame(static_cast<uint16_t>(MessageType::kCancel), payload_of(Cancel{}), frame, 2);
  EXPECT_STATUS(decode_error(frame), StatusCode::kUnimplemented,
                "peer speaks protocol version 2, this node speaks version 1");
  FrameDecoder d;  // after six bytes, before the rest of the header
  d.feed(std::span(frame).first(6));
  EXPECT_EQ(d.next().status().code(), StatusCode::kUnimplemented);
}

TEST(ControlProtocol, UnknownTypeAndFlags) {
  std::vector<std::byte> frame;
  append_raw_frame(99, {}, frame);
  EXPECT_STATUS(decode_error(frame), StatusCode::kUnimplemented, "unknown message type 99");
  EXPECT_EQ(decode_payload(static_cast<MessageType>(99), {}).status().code(),
            StatusCode::kUnimplemented);
  frame.clear();
  append_raw_frame(static_cast<uint16_t>(MessageType::kCancel), payload_of(Cancel{}), frame,
                   kProtocolVersion, 0x4);
  EXPECT_STATUS(decode_error(frame), StatusCode::kUnimplemented, "Cancel frame has unknown flags");
}

TEST(ControlProtocol, ChecksumMismatchesAreDataLoss) {
  const auto good = encode(Cancel{RequestId(1), "client gone"});
  auto bad_header = good;
  bad_header[13] ^= std::byte{0x01};  // payload length
  EXPECT_STATUS(decode_error(bad_header), StatusCode::kDataLoss, "header checksum mismatch");
  auto bad_payload = good;
  bad_payload.back() ^= std::byte{0x20};
  EXPECT_STATUS(decode_error(bad_payload), StatusCode::kDataLoss,
                "Cancel payload checksum mismatch");
}

TEST(ControlProtocol, OversizedFrameIsRejectedFromItsHeader) {
  Hello big;
  big.cluster_token.assign(2000, 't');
  const auto frame = encode(big);
  DecoderOptions options;
  options.max_frame_bytes = 1024;
  FrameDecoder d(options);
  d.feed(std::span(frame).first(kFrameHeaderBytes));  // the payload never arrives
  auto r = d.next();
  EXPECT_STATUS(
      r.status(), StatusCode::kOutOfRange,
      "Hello frame of " + std::to_string(frame.size()) + " bytes exceeds the limit of 1024 bytes");
  options.max_frame_bytes = frame.size();
  EXPECT_TRUE(decode_error(frame, options).ok());

  // A small limit before the Hello, the configured one after it.
  options.max_frame_bytes = 1024;
  FrameDecoder staged(options);
  staged.feed(encode(Hello{}));
  auto hello = staged.next();
  ASSERT_TRUE(hello.ok() && hello->has_value());
  staged.set_max_frame_bytes(kDefaultMaxFrameBytes);
  staged.feed(frame);
  auto after = staged.next();
  ASSERT_TRUE(after.ok()) << after.status().to_string();
  EXPECT_EQ(**after, Message(big));
}

TEST(ControlProtocol, FrameDeclaringFourGibIsRejectedWithoutAllocating) {
  std::vector<std::byte> frame = raw_frame(MessageType::kPrefillJob, {});
  put_le(frame, 12, 0xFFFFFFFFu, 4);  // payload length 4 GiB - 1
  // Reseal the header so that only the length is wrong.
  std::vector<std::byte> resealed;
  {
    std::vector<std::byte> tmp(frame.begin(), frame.begin() + 20);
    put_le(frame, 20, crc32c(tmp.data(), tmp.size()), 4);
  }
  FrameDecoder d;
  g_largest_allocation = 0;
  g_track_allocations = true;
  d.feed(frame);
  auto r = d.next();
  g_track_allocations = false;
  EXPECT_STATUS(r.status(), StatusCode::kOutOfRange, "PrefillJob frame of 4294967319 bytes");
  EXPECT_LT(g_largest_allocation.load(), 4096u);

  // Even a limit that admits it buffers only what arrives.
  DecoderOptions unlimited;
  unlimited.max_frame_bytes = std::numeric_limits<size_t>::max();
  FrameDecoder u(unlimited);
  std::vector<std::byte> more(1 << 16, std::byte{0});
  g_largest_allocation = 0;
  g_track_allocations = true;
  u.feed(frame);
  auto r1 = u.next();
  u.feed(more);
  auto r2 = u.next();
  g_track_allocations = false;
  ASSERT_TRUE(r1.ok() && r2.ok());
  EXPECT_FALSE(r1->has_value() || r2->has_value());
  EXPECT_LT(g_largest_allocation.load(), size_t{1} << 20);
  EXPECT_STATUS(u.finish(), StatusCode::kDataLoss, "stream ended inside a frame");
}

TEST(ControlProtocol, StreamEndingInsideAFrame) {
  const auto frame = encode(Cancel{RequestId(3), "bye"});
  FrameDecoder d;
  d.feed(std::span(frame).first(frame.size() - 1));
  auto r = d.next();
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  EXPECT_STATUS(d.finish(), StatusCode::kDataLoss,
                "(" + std::to_string(frame.size() - 1) + " bytes of a " +
                    std::to_string(frame.size()) + "-byte Cancel frame)");
}

TEST(ControlProtocol, ErrorsAreStickyAndTheDecoderStopsBuffering) {
  auto bad = encode(Cancel{RequestId(1), "x"});
  bad.back() ^= std::byte{1};
  FrameDecoder d;
  d.feed(bad);
  const Status first = d.next().status();
  ASSERT_FALSE(first.ok());
  EXPECT_FALSE(d.usable());
  d.feed(encode(Cancel{RequestId(2), "valid"}));
  EXPECT_EQ(d.buffered_bytes(), 0u);
  const Status again = d.next().status();
  EXPECT_EQ(again.code(), first.code());
  EXPECT_EQ(again.message(), first.message());
  EXPECT_EQ(d.finish().message(), first.message());
  EXPECT_EQ(d.error().message(), first.message());
}

TEST(ControlProtocol, CorruptStreamGivesTheSameErrorAtEverySplit) {
  auto stream = stream_of(sample_messages());
  stream[stream.size() / 2] ^= std::byte{0x10};
  const Status whole = decode_error(stream);
  ASSERT_FALSE(whole.ok());
  for (size_t k = 0; k <= stream.size(); k += 7) {
    const auto r = decode_all(stream, {k});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().message(), whole.message()) << "split at " << k;
  }
}

// ------------------------------------------------------------------ payload

TEST(ControlProtocol, TruncatedFieldNamesMessageAndField) {
  auto p = payload_of(Reserve{RequestId(1), 100, 10ms});
  p.resize(10);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kReserve, p)), StatusCode::kDataLoss,
                "control: Reserve.size_bytes: truncated (need 8 bytes, 2 left)");
}

TEST(ControlProtocol, StringLongerThanThePayload) {
  Hello h;
  h.node_name = "node";
  auto p = payload_of(h);
  put_le(p, 1 + 8, 1000, 4);  // node_name's length, after role and node_id
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kHello, p)), StatusCode::kDataLoss,
                "Hello.node_name: truncated (need 1000 bytes");
}

TEST(ControlProtocol, ListCountIsCheckedBeforeAllocating) {
  TransferManifest m;
  m.segments = {{1, 2, 3}};
  auto p = payload_of(m);
  put_le(p, 8 + 8 + 4 + 4, 0xFFFFFFFFu, 4);  // segments' count
  g_largest_allocation = 0;
  g_track_allocations = true;
  const Status s = decode_error(raw_frame(MessageType::kTransferManifest, p));
  g_track_allocations = false;
  EXPECT_STATUS(s, StatusCode::kDataLoss, "TransferManifest.segments: count 4294967295 needs");
  EXPECT_LT(g_largest_allocation.load(), 4096u);

  PrefillJob job;
  job.prompt_token_ids = {1, 2};
  p = payload_of(job);
  put_le(p, 8, 1u << 30, 4);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kPrefillJob, p)), StatusCode::kDataLoss,
                "PrefillJob.prompt_token_ids: count 1073741824 needs at least 4294967296 bytes");
}

TEST(ControlProtocol, NestedFieldPaths) {
  TransferManifest m;
  m.segments = {{0, 10, 1}, {10, ~0ull, 2}};
  auto p = payload_of(m);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kTransferManifest, p)),
                StatusCode::kInvalidArgument,
                "control: TransferManifest.segments[1].length_bytes: offset + length overflows");
  // A list's count is checked against the payload before its items.
  p.resize(8 + 8 + 4 + 4 + 4 + 20 + 16 + 2);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kTransferManifest, p)), StatusCode::kDataLoss,
                "control: TransferManifest.segments: count 2 needs at least 40 bytes, 38 left");

  PrefillJob job;
  job.generation.stop_strings = {"a", "bc"};
  p = payload_of(job);
  // request_id, empty prompt, sampling (4+4+4+4+4+4+8), max_new_tokens,
  // stop_strings count, "a", then the length of "bc".
  const size_t at = 8 + 4 + 32 + 4 + 4 + 5;
  put_le(p, at, 1000, 4);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kPrefillJob, p)), StatusCode::kDataLoss,
                "PrefillJob.generation.stop_strings[1]: truncated");
  put_le(p, 8 + 4, 0x7FC00000u, 4);  // temperature = NaN
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kPrefillJob, p)), StatusCode::kInvalidArgument,
                "PrefillJob.generation.sampling.temperature: not a finite number");
}

TEST(ControlProtocol, InvalidValues) {
  auto p = payload_of(Hello{});
  p[0] = std::byte{7};
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kHello, p)), StatusCode::kInvalidArgument,
                "control: Hello.role: unknown value 7");

  p = payload_of(Error{RequestId(1), StatusCode::kInternal, "x"});
  put_le(p, 8, 0, 2);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kError, p)), StatusCode::kInvalidArgument,
                "Error.code: an error cannot be OK");
  put_le(p, 8, 99, 2);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kError, p)), StatusCode::kInvalidArgument,
                "Error.code: unknown value 99");

  p = payload_of(TokenChunk{});
  p[8 + 4 + 4 + 4] = std::byte{9};  // finish_reason
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kTokenChunk, p)), StatusCode::kInvalidArgument,
                "TokenChunk.finish_reason: unknown value 9");

  TransferManifest overflow;
  overflow.segments = {{~0ull - 5, 10, 0}};
  p = payload_of(overflow);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kTransferManifest, p)),
                StatusCode::kInvalidArgument,
                "segments[0].length_bytes: offset + length overflows");
}

TEST(ControlProtocol, ListCaps) {
  PrefillJob job;
  job.generation.stop_strings.assign(kMaxStopStrings, "s");
  auto p = payload_of(job);
  EXPECT_TRUE(decode_payload(MessageType::kPrefillJob, p).ok());
  put_le(p, 8 + 4 + 32 + 4, kMaxStopStrings + 1, 4);
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kPrefillJob, p)), StatusCode::kInvalidArgument,
                "PrefillJob.generation.stop_strings: 65 items, at most 64");
}

TEST(ControlProtocol, TrailingBytes) {
  auto p = payload_of(Cancel{RequestId(4), "why"});
  p.resize(p.size() + 3, std::byte{0});
  EXPECT_STATUS(decode_error(raw_frame(MessageType::kCancel, p)), StatusCode::kDataLoss,
                "control: Cancel: 3 trailing bytes after the last field");
}

TEST(ControlProtocol, StatusHelpersAndNames) {
  const Error e{RequestId(1), StatusCode::kDeadlineExceeded, "transfer timed out"};
  EXPECT_EQ(e.status().to_string(), "DEADLINE_EXCEEDED: transfer timed out");
  EXPECT_TRUE(TransferResult{}.status().ok());
  EXPECT_EQ(message_type_name(MessageType::kTransferManifest), "TransferManifest");
  EXPECT_EQ(message_type_name(static_cast<MessageType>(1000)), "Unknown");
  EXPECT_EQ(node_role_name(NodeRole::kDecode), "decode");
  EXPECT_EQ(finish_reason_name(FinishReason::kLength), "length");
  EXPECT_TRUE(is_known_message_type(40));
  EXPECT_FALSE(is_known_message_type(0));
  EXPECT_NE(RequestId(1), RequestId(2));
  EXPECT_FALSE(RequestId().valid());
  EXPECT_EQ(std::hash<NodeId>()(NodeId(5)), std::hash<uint64_t>()(5));
}

}  // namespace
}  // namespace kvgate::control
