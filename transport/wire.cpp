#include "transport/wire.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace kvgate::transport::wire {

namespace {

constexpr uint32_t kGrantMagic = 0x5247564Bu;  // "KVGR"
constexpr uint8_t kGrantVersion = 1;
constexpr size_t kManifestEntryBytes = 20;

class Writer {
 public:
  explicit Writer(Bytes& out) : out_(out) {}
  void u8(uint8_t v) { out_.push_back(std::byte{v}); }
  void u16(uint16_t v) { put(v, 2); }
  void u32(uint32_t v) { put(v, 4); }
  void u64(uint64_t v) { put(v, 8); }
  void blob(std::span<const std::byte> b) {
    u32(static_cast<uint32_t>(b.size()));
    out_.insert(out_.end(), b.begin(), b.end());
  }
  void str(std::string_view s) { blob(std::as_bytes(std::span(s.data(), s.size()))); }

 private:
  void put(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(std::byte(static_cast<uint8_t>(v >> (8 * i))));
  }
  Bytes& out_;
};

class Reader {
 public:
  explicit Reader(std::span<const std::byte> in) : in_(in) {}
  Status u8(const char* what, uint8_t& v) {
    uint64_t x = 0;
    KVGATE_RETURN_IF_ERROR(get(what, 1, x));
    v = static_cast<uint8_t>(x);
    return {};
  }
  Status u16(const char* what, uint16_t& v) {
    uint64_t x = 0;
    KVGATE_RETURN_IF_ERROR(get(what, 2, x));
    v = static_cast<uint16_t>(x);
    return {};
  }
  Status u32(const char* what, uint32_t& v) {
    uint64_t x = 0;
    KVGATE_RETURN_IF_ERROR(get(what, 4, x));
    v = static_cast<uint32_t>(x);
    return {};
  }
  Status u64(const char* what, uint64_t& v) { return get(what, 8, v); }
  Status blob(const char* what, size_t cap, Bytes& out) {
    uint32_t n = 0;
    KVGATE_RETURN_IF_ERROR(u32(what, n));
    if (n > cap) return out_of_range(prefix(what) + std::to_string(n) + " bytes, cap " + std::to_string(cap));
    if (n > left()) return truncated(what, n);
    out.assign(in_.begin() + pos_, in_.begin() + pos_ + n);
    pos_ += n;
    return {};
  }
  Status str(const char* what, size_t cap, std::string& out) {
    Bytes b;
    KVGATE_RETURN_IF_ERROR(blob(what, cap, b));
    out.assign(reinterpret_cast<const char*>(b.data()), b.size());
    return {};
  }
  // A list count whose elements take `elem_bytes` each on the wire.
  Status count(const char* what, size_t cap, size_t elem_bytes, uint32_t& n) {
    KVGATE_RETURN_IF_ERROR(u32(what, n));
    if (n > cap) return out_of_range(prefix(what) + std::to_string(n) + " entries, cap " + std::to_string(cap));
    if (uint64_t{n} * elem_bytes > left()) return truncated(what, uint64_t{n} * elem_bytes);
    return {};
  }
  size_t left() const { return in_.size() - pos_; }
  Status done(const char* what) const {
    if (left() != 0)
      return data_loss(prefix(what) + std::to_string(left()) + " trailing bytes");
    return {};
  }

 private:
  static std::string prefix(const char* what) { return std::string("transport wire: ") + what + ": "; }
  Status truncated(const char* what, uint64_t need) const {
    return data_loss(prefix(what) + "truncated (need " + std::to_string(need) + " bytes, " +
                     std::to_string(left()) + " left)");
  }
  Status get(const char* what, int n, uint64_t& v) {
    if (left() < static_cast<size_t>(n)) return truncated(what, n);
    v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t(static_cast<uint8_t>(in_[pos_ + i])) << (8 * i);
    pos_ += n;
    return {};
  }
  std::span<const std::byte> in_;
  size_t pos_ = 0;
};

void write_header(Writer& w, WireType type, uint64_t nonce) {
  w.u32(kMagic);
  w.u8(kWireVersion);
  w.u8(static_cast<uint8_t>(type));
  w.u16(0);
  w.u64(nonce);
}

Status check_code(StatusCode code, bool ok_allowed) {
  const auto v = static_cast<int>(code);
  if (v < 0 || v > static_cast<int>(StatusCode::kInternal) || code == StatusCode::kInProgress)
    return invalid_argument("transport wire: verdict code " + std::to_string(v) + " is not a status code");
  if (!ok_allowed && code == StatusCode::kOk)
    return invalid_argument("transport wire: Stopped with code OK");
  return {};
}

}  // namespace

Bytes encode(const Message& m) {
  Bytes out;
  Writer w(out);
  write_header(w, m.type, m.nonce);
  std::visit(
      [&](const auto& b) {
        using T = std::decay_t<decltype(b)>;
        if constexpr (std::is_same_v<T, Hello>) {
          w.str(b.cluster_token);
          w.u8(static_cast<uint8_t>(b.op));
          w.blob(b.reply_address);
        } else if constexpr (std::is_same_v<T, HelloAck>) {
          w.str(b.cluster_token);
          w.u8(static_cast<uint8_t>(b.op));
          w.u64(b.echo_nonce);
        } else if constexpr (std::is_same_v<T, Segment>) {
          w.u64(b.transfer_id);
          w.u32(b.index);
          w.u64(b.offset_bytes);
          w.u64(b.length_bytes);
        } else if constexpr (std::is_same_v<T, Manifest>) {
          w.u64(b.transfer_id);
          w.u64(b.total_bytes);
          w.u32(static_cast<uint32_t>(b.segments.size()));
          for (const auto& e : b.segments) {
            w.u64(e.offset_bytes);
            w.u64(e.length_bytes);
            w.u32(e.crc32c);
          }
        } else if constexpr (std::is_same_v<T, Verdict>) {
          w.u64(b.transfer_id);
          w.u16(static_cast<uint16_t>(b.code));
          w.str(std::string_view(b.reason).substr(0, kMaxReasonBytes));
        } else if constexpr (std::is_same_v<T, Begin>) {
          w.u64(b.transfer_id);
        }
      },
      m.body);
  return out;
}

void encode_segment(uint64_t nonce, const Segment& s, std::byte (&out)[kSegmentBytes]) {
  Bytes tmp;
  tmp.reserve(kSegmentBytes);
  Writer w(tmp);
  write_header(w, WireType::kSegment, nonce);
  w.u64(s.transfer_id);
  w.u32(s.index);
  w.u64(s.offset_bytes);
  w.u64(s.length_bytes);
  std::memcpy(out, tmp.data(), kSegmentBytes);
}

Result<Message> decode(std::span<const std::byte> bytes) {
  if (bytes.size() > kMaxControlBytes)
    return out_of_range("transport wire: message of " + std::to_string(bytes.size()) +
                        " bytes exceeds " + std::to_string(kMaxControlBytes));
  Reader r(bytes);
  uint32_t magic = 0;
  uint8_t version = 0, type = 0;
  uint16_t reserved = 0;
  Message m;
  KVGATE_RETURN_IF_ERROR(r.u32("header.magic", magic));
  if (magic != kMagic) return data_loss("transport wire: bad magic");
  KVGATE_RETURN_IF_ERROR(r.u8("header.version", version));
  if (version != kWireVersion)
    return unimplemented("transport wire: version " + std::to_string(version) + " (this side speaks " +
                         std::to_string(kWireVersion) + ")");
  KVGATE_RETURN_IF_ERROR(r.u8("header.type", type));
  KVGATE_RETURN_IF_ERROR(r.u16("header.reserved", reserved));
  if (reserved != 0) return invalid_argument("transport wire: reserved header bits set");
  KVGATE_RETURN_IF_ERROR(r.u64("header.nonce", m.nonce));
  m.type = static_cast<WireType>(type);
  switch (m.type) {
    case WireType::kHello: {
      Hello h;
      uint8_t op = 0;
      KVGATE_RETURN_IF_ERROR(r.str("Hello.cluster_token", kMaxTokenBytes, h.cluster_token));
      KVGATE_RETURN_IF_ERROR(r.u8("Hello.op", op));
      if (op != 1 && op != 2)
        return invalid_argument("transport wire: Hello.op: " + std::to_string(op) + " is not a data op");
      h.op = static_cast<DataOp>(op);
      KVGATE_RETURN_IF_ERROR(r.blob("Hello.reply_address", kMaxAddressBytes, h.reply_address));
      m.body = std::move(h);
      break;
    }
    case WireType::kHelloAck: {
      HelloAck h;
      uint8_t op = 0;
      KVGATE_RETURN_IF_ERROR(r.str("HelloAck.cluster_token", kMaxTokenBytes, h.cluster_token));
      KVGATE_RETURN_IF_ERROR(r.u8("HelloAck.op", op));
      if (op != 1 && op != 2)
        return invalid_argument("transport wire: HelloAck.op: " + std::to_string(op) + " is not a data op");
      h.op = static_cast<DataOp>(op);
      KVGATE_RETURN_IF_ERROR(r.u64("HelloAck.echo_nonce", h.echo_nonce));
      m.body = std::move(h);
      break;
    }
    case WireType::kSegment: {
      Segment s;
      KVGATE_RETURN_IF_ERROR(r.u64("Segment.transfer_id", s.transfer_id));
      KVGATE_RETURN_IF_ERROR(r.u32("Segment.index", s.index));
      KVGATE_RETURN_IF_ERROR(r.u64("Segment.offset_bytes", s.offset_bytes));
      KVGATE_RETURN_IF_ERROR(r.u64("Segment.length_bytes", s.length_bytes));
      if (s.index >= kMaxSegments)
        return out_of_range("transport wire: Segment.index " + std::to_string(s.index) + " >= " +
                            std::to_string(kMaxSegments));
      m.body = s;
      break;
    }
    case WireType::kManifest: {
      Manifest man;
      uint32_t n = 0;
      KVGATE_RETURN_IF_ERROR(r.u64("Manifest.transfer_id", man.transfer_id));
      KVGATE_RETURN_IF_ERROR(r.u64("Manifest.total_bytes", man.total_bytes));
      KVGATE_RETURN_IF_ERROR(r.count("Manifest.segments", kMaxSegments, kManifestEntryBytes, n));
      man.segments.resize(n);
      uint64_t sum = 0;
      for (auto& e : man.segments) {
        KVGATE_RETURN_IF_ERROR(r.u64("Manifest.segments.offset_bytes", e.offset_bytes));
        KVGATE_RETURN_IF_ERROR(r.u64("Manifest.segments.length_bytes", e.length_bytes));
        KVGATE_RETURN_IF_ERROR(r.u32("Manifest.segments.crc32c", e.crc32c));
        if (e.length_bytes > (uint64_t{1} << 48) || sum + e.length_bytes < sum)
          return out_of_range("transport wire: Manifest segment length out of range");
        sum += e.length_bytes;
      }
      if (sum != man.total_bytes)
        return invalid_argument("transport wire: Manifest.total_bytes " + std::to_string(man.total_bytes) +
                                " != sum of segment lengths " + std::to_string(sum));
      m.body = std::move(man);
      break;
    }
    case WireType::kResult:
    case WireType::kStopped: {
      Verdict v;
      uint16_t code = 0;
      KVGATE_RETURN_IF_ERROR(r.u64("Verdict.transfer_id", v.transfer_id));
      KVGATE_RETURN_IF_ERROR(r.u16("Verdict.code", code));
      v.code = static_cast<StatusCode>(code);
      KVGATE_RETURN_IF_ERROR(check_code(v.code, m.type == WireType::kResult));
      KVGATE_RETURN_IF_ERROR(r.str("Verdict.reason", kMaxReasonBytes, v.reason));
      m.body = std::move(v);
      break;
    }
    case WireType::kGoodbye:
      m.body = Goodbye{};
      break;
    case WireType::kBegin: {
      Begin b;
      KVGATE_RETURN_IF_ERROR(r.u64("Begin.transfer_id", b.transfer_id));
      m.body = b;
      break;
    }
    default:
      return unimplemented("transport wire: unknown message type " + std::to_string(type));
  }
  KVGATE_RETURN_IF_ERROR(r.done("message"));
  return m;
}

// ------------------------------------------------------------------ grant

uint64_t Grant::total_bytes() const {
  uint64_t t = 0;
  for (const auto& r : ranges) t += r.length_bytes;
  return t;
}

Bytes encode_grant(const Grant& g) {
  Bytes out;
  Writer w(out);
  w.u32(kGrantMagic);
  w.u8(kGrantVersion);
  w.u64(g.transfer_id);
  w.u32(static_cast<uint32_t>(g.ranges.size()));
  for (const auto& r : g.ranges) {
    w.u64(r.offset_bytes);
    w.u64(r.length_bytes);
  }
  return out;
}

Result<Grant> decode_grant(std::span<const std::byte> bytes) {
  Reader r(bytes);
  uint32_t magic = 0, n = 0;
  uint8_t version = 0;
  Grant g;
  KVGATE_RETURN_IF_ERROR(r.u32("grant.magic", magic));
  if (magic != kGrantMagic) return invalid_argument("transport wire: grant: bad magic");
  KVGATE_RETURN_IF_ERROR(r.u8("grant.version", version));
  if (version != kGrantVersion)
    return unimplemented("transport wire: grant version " + std::to_string(version));
  KVGATE_RETURN_IF_ERROR(r.u64("grant.transfer_id", g.transfer_id));
  KVGATE_RETURN_IF_ERROR(r.count("grant.ranges", kMaxRanges, 16, n));
  g.ranges.resize(n);
  uint64_t total = 0;
  for (auto& d : g.ranges) {
    KVGATE_RETURN_IF_ERROR(r.u64("grant.ranges.offset_bytes", d.offset_bytes));
    KVGATE_RETURN_IF_ERROR(r.u64("grant.ranges.length_bytes", d.length_bytes));
    if (d.length_bytes == 0 || d.offset_bytes + d.length_bytes < d.offset_bytes ||
        total + d.length_bytes < total)
      return invalid_argument("transport wire: grant: empty or overflowing range");
    total += d.length_bytes;
  }
  KVGATE_RETURN_IF_ERROR(r.done("grant"));
  return g;
}

RangeMap::RangeMap(std::vector<DestRange> ranges) : ranges_(std::move(ranges)) {
  starts_.reserve(ranges_.size() + 1);
  uint64_t at = 0;
  for (const auto& r : ranges_) {
    starts_.push_back(at);
    at += r.length_bytes;
  }
  starts_.push_back(at);
}

void RangeMap::append(std::span<const DestRange> more) {
  if (starts_.empty()) starts_.push_back(0);
  // starts_.back() is the total: the logical start of the first new range.
  for (const auto& r : more) {
    ranges_.push_back(r);
    starts_.push_back(starts_.back() + r.length_bytes);
  }
}

Status RangeMap::map(uint64_t offset, uint64_t length, std::vector<Piece>& out) const {
  const uint64_t total = total_bytes();
  if (length == 0 || offset > total || length > total - offset)
    return out_of_range("transport: segment [" + std::to_string(offset) + ", +" + std::to_string(length) +
                        ") does not fit the " + std::to_string(total) + " bytes granted");
  // The range holding `offset`: the last start <= offset.
  size_t i = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end() - 1, offset) -
                                 starts_.begin()) - 1;
  uint64_t done = 0;
  while (done < length) {
    const uint64_t within = offset + done - starts_[i];
    const uint64_t n = std::min(ranges_[i].length_bytes - within, length - done);
    out.push_back({ranges_[i].offset_bytes + within, n, done});
    done += n;
    ++i;
  }
  return {};
}

bool tokens_equal(std::string_view a, std::string_view b) {
  // Length is not secret (the cap bounds it); the contents are compared
  // without an early exit.
  const size_t n = std::max(a.size(), b.size());
  uint8_t diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t x = i < a.size() ? static_cast<uint8_t>(a[i]) : 0;
    const uint8_t y = i < b.size() ? static_cast<uint8_t>(b[i]) : 0;
    diff |= x ^ y;
  }
  volatile uint8_t sink = diff;
  return sink == 0;
}

}  // namespace kvgate::transport::wire
