// The transport's wire format: round trips, bounds, and the range map.
#include "transport/wire.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

namespace kvgate::transport::wire {
namespace {

std::vector<Message> samples() {
  std::vector<Message> v;
  v.push_back({WireType::kHello, 11, Hello{"tok", DataOp::kPut, Bytes(5, std::byte{7})}});
  v.push_back({WireType::kHelloAck, 12, HelloAck{"tok", DataOp::kActiveMessage, 11}});
  v.push_back({WireType::kSegment, 13, Segment{5, 2, 4096, 100}});
  v.push_back({WireType::kManifest, 14, Manifest{5, 300, {{0, 100, 0xAAAA}, {100, 200, 0xBBBB}}}});
  v.push_back({WireType::kResult, 15, Verdict{5, StatusCode::kDataLoss, "crc"}});
  v.push_back({WireType::kStopped, 16, Verdict{5, StatusCode::kDeadlineExceeded, "late"}});
  v.push_back({WireType::kGoodbye, 17, Goodbye{}});
  v.push_back({WireType::kBegin, 18, Begin{5}});
  return v;
}

TEST(TransportWire, RoundTripsAndIsCanonical) {
  for (const auto& m : samples()) {
    const Bytes b = encode(m);
    auto d = decode(b);
    ASSERT_TRUE(d.ok()) << d.status().to_string();
    EXPECT_EQ(d->type, m.type);
    EXPECT_EQ(d->nonce, m.nonce);
    EXPECT_EQ(encode(*d), b);
  }
  std::byte seg[kSegmentBytes];
  encode_segment(13, Segment{5, 2, 4096, 100}, seg);
  EXPECT_EQ(Bytes(seg, seg + kSegmentBytes), encode(samples()[2]));
}

TEST(TransportWire, EveryTruncationIsRejected) {
  for (const auto& m : samples()) {
    const Bytes b = encode(m);
    for (size_t n = 0; n < b.size(); ++n) {
      auto d = decode({b.data(), n});
      EXPECT_FALSE(d.ok()) << "type " << int(m.type) << " cut at " << n;
    }
    Bytes longer = b;
    longer.push_back(std::byte{0});
    EXPECT_EQ(decode(longer).status().code(), StatusCode::kDataLoss);
  }
}

TEST(TransportWire, FieldErrors) {
  Bytes b = encode(samples()[0]);
  b[0] = std::byte{0};
  EXPECT_EQ(decode(b).status().code(), StatusCode::kDataLoss);  // magic
  b = encode(samples()[0]);
  b[4] = std::byte{9};
  EXPECT_EQ(decode(b).status().code(), StatusCode::kUnimplemented);  // version
  b[4] = std::byte{kWireVersion};
  b[5] = std::byte{99};
  EXPECT_EQ(decode(b).status().code(), StatusCode::kUnimplemented);  // type
  // A Stopped verdict may not be OK; a Result code must be a status code.
  EXPECT_EQ(decode(encode({WireType::kStopped, 1, Verdict{1, StatusCode::kOk, ""}})).status().code(),
            StatusCode::kInvalidArgument);
  Bytes r = encode({WireType::kResult, 1, Verdict{1, StatusCode::kOk, ""}});
  r[24] = std::byte{200};
  EXPECT_EQ(decode(r).status().code(), StatusCode::kInvalidArgument);
  // Manifest total must equal the sum of lengths.
  EXPECT_EQ(decode(encode({WireType::kManifest, 1, Manifest{1, 5, {{0, 4, 0}}}})).status().code(),
            StatusCode::kInvalidArgument);
  // A huge token length is over its cap before any allocation.
  Bytes h = encode(samples()[0]);
  const uint32_t big = 1u << 30;
  std::memcpy(h.data() + kHeaderBytes, &big, 4);
  EXPECT_EQ(decode(h).status().code(), StatusCode::kOutOfRange);
  // Oversized message.
  EXPECT_EQ(decode(Bytes(kMaxControlBytes + 1)).status().code(), StatusCode::kOutOfRange);
}

TEST(TransportWire, RandomBytesNeverCrash) {
  std::mt19937_64 rng(7);
  const auto seeds = samples();
  for (int i = 0; i < 20000; ++i) {
    Bytes b = encode(seeds[i % seeds.size()]);
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) b[rng() % b.size()] = std::byte(static_cast<uint8_t>(rng()));
    if (rng() % 4 == 0) b.resize(rng() % (b.size() + 1));
    auto d = decode(b);
    if (d.ok()) {
      EXPECT_EQ(encode(*d), b);  // canonical when accepted
    }
  }
}

TEST(TransportWire, GrantRoundTripAndBounds) {
  Grant g{42, {{4096, 100}, {0, 50}}};
  auto d = decode_grant(encode_grant(g));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->transfer_id, 42u);
  EXPECT_EQ(d->ranges, g.ranges);
  EXPECT_EQ(d->total_bytes(), 150u);
  Bytes b = encode_grant(Grant{1, {{0, 0}}});
  EXPECT_EQ(decode_grant(b).status().code(), StatusCode::kInvalidArgument);  // empty range
  b = encode_grant(g);
  b.pop_back();
  EXPECT_FALSE(decode_grant(b).ok());
}

TEST(TransportWire, RangeMapSplitsAcrossRanges) {
  RangeMap m({{1000, 10}, {0, 10}, {500, 10}});
  EXPECT_EQ(m.total_bytes(), 30u);
  std::vector<Piece> p;
  ASSERT_TRUE(m.map(5, 20, p).ok());
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[0].region_offset, 1005u);
  EXPECT_EQ(p[0].length_bytes, 5u);
  EXPECT_EQ(p[1].region_offset, 0u);
  EXPECT_EQ(p[1].length_bytes, 10u);
  EXPECT_EQ(p[1].source_offset, 5u);
  EXPECT_EQ(p[2].region_offset, 500u);
  EXPECT_EQ(p[2].length_bytes, 5u);
  p.clear();
  ASSERT_TRUE(m.map(10, 10, p).ok());
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].region_offset, 0u);
  p.clear();
  EXPECT_EQ(m.map(25, 6, p).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(m.map(UINT64_MAX, 2, p).code(), StatusCode::kOutOfRange);
  EXPECT_TRUE(p.empty());
}

// Appending keeps every mapped offset and continues at the old total; a
// default (empty) map can be appended to as well.
TEST(TransportWire, RangeMapAppendContinuesAfterTheTotal) {
  RangeMap m({{1000, 10}, {0, 10}});
  std::vector<Piece> before;
  ASSERT_TRUE(m.map(0, 20, before).ok());
  const std::vector<DestRange> more = {{700, 4}, {300, 6}};
  m.append(more);
  EXPECT_EQ(m.total_bytes(), 30u);
  EXPECT_EQ(m.ranges().size(), 4u);
  std::vector<Piece> after;
  ASSERT_TRUE(m.map(0, 20, after).ok());
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) EXPECT_EQ(after[i].region_offset, before[i].region_offset);
  std::vector<Piece> p;
  ASSERT_TRUE(m.map(18, 10, p).ok());  // old tail, all of the first new range, part of the next
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[0].region_offset, 8u);
  EXPECT_EQ(p[0].length_bytes, 2u);
  EXPECT_EQ(p[1].region_offset, 700u);
  EXPECT_EQ(p[1].length_bytes, 4u);
  EXPECT_EQ(p[1].source_offset, 2u);
  EXPECT_EQ(p[2].region_offset, 300u);
  EXPECT_EQ(p[2].length_bytes, 4u);
  p.clear();
  EXPECT_EQ(m.map(25, 6, p).code(), StatusCode::kOutOfRange);  // past the extended total
  RangeMap empty;
  empty.append(more);
  EXPECT_EQ(empty.total_bytes(), 10u);
  ASSERT_TRUE(empty.map(4, 1, p).ok());
  EXPECT_EQ(p.back().region_offset, 300u);
}

TEST(TransportWire, TokensCompare) {
  EXPECT_TRUE(tokens_equal("abc", "abc"));
  EXPECT_FALSE(tokens_equal("abc", "abd"));
  EXPECT_FALSE(tokens_equal("abc", "abcd"));
  EXPECT_TRUE(tokens_equal("", ""));
}

}  // namespace
}  // namespace kvgate::transport::wire
