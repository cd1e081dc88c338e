// The nccl transport's own tests, over fake NCCL links (host memory, one
// process) and local control links: the device CRC32C decomposition
// against common/crc32c, the fake link's NCCL-like matching, and the
// transport's nccl-specific behaviour (pieces per page run, failures of the
// data link, a pair falling out of step, peer loss, the factory's error).
// The scenarios every transport shares run over nccl in
// transport_nccl_suite_test (nccl_suite_test.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>

#include "common/crc32c.h"
#include "tests/unit/transport/transport_test_util.h"
#include "transport/nccl/crc32c_chunks.h"
#include "transport/nccl/fake_nccl_link.h"
#include "transport/nccl/local_control_link.h"
#include "transport/nccl/nccl_transport.h"
#include "transport/nccl/tcp_control_link.h"
#include "transport/wire.h"

namespace kvgate::transport::testing {
namespace {

constexpr size_t kPage = 64 << 10;

// ---- CRC32C as the device computes it

TEST(NcclCrc, ChunkedEqualsCrc32cForEverySizeAndSeed) {
  const auto data = random_bytes((size_t{1} << 20) + 4097, 5);
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{4095}, size_t{4096}, size_t{4097}, size_t{3 * 4096 + 17},
                   size_t{65536}, data.size()}) {
    for (uint32_t seed : {0u, 0xE3069283u, 0xFFFFFFFFu}) {
      SCOPED_TRACE(n);
      EXPECT_EQ(nccl_crc::chunked_crc32c(data.data(), n, seed), crc32c(data.data(), n, seed));
    }
  }
  // The known answer, and a running checksum continued across calls.
  EXPECT_EQ(nccl_crc::chunked_crc32c("123456789", 9, 0), 0xE3069283u);
  const uint32_t a = nccl_crc::chunked_crc32c(data.data(), 10000, 0);
  EXPECT_EQ(nccl_crc::chunked_crc32c(data.data() + 10000, 70000, a), crc32c(data.data(), 80000));
}

TEST(NcclCrc, CombineJoinsTwoChecksums) {
  const auto data = random_bytes(100000, 6);
  for (size_t cut : {size_t{0}, size_t{1}, size_t{4096}, size_t{33333}, size_t{99999}}) {
    const uint32_t a = crc32c(data.data(), cut), b = crc32c(data.data() + cut, data.size() - cut);
    EXPECT_EQ(nccl_crc::combine(a, b, data.size() - cut), crc32c(data.data(), data.size())) << cut;
  }
  const auto table = nccl_crc::make_table();
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  EXPECT_EQ(nccl_crc::crc32c_chunk(table.data(), p, 4096), crc32c(data.data(), 4096));
}

// ---- the fake link: NCCL's matching

TEST(FakeNccl, PairsMatchInIssueOrderAndSizesMustAgree) {
  auto fabric = FakeNcclFabric::create(3);
  auto a = fabric->link(0), b = fabric->link(1);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(fabric->link(0).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(fabric->link(3).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*a)->post_send(0, "x", 1).status().code(), StatusCode::kInvalidArgument);  // itself
  const char one[] = "first", two[] = "second!";
  char r1[5] = {}, r2[7] = {};
  // Receives posted before the sends: the first send meets the first receive.
  auto q1 = (*b)->post_recv(0, r1, 5), q2 = (*b)->post_recv(0, r2, 7);
  auto s1 = (*a)->post_send(1, one, 5), s2 = (*a)->post_send(1, two, 7);
  Status e;
  for (auto id : {*q1, *q2, *s1, *s2}) EXPECT_EQ(((id == *q1 || id == *q2) ? *b : *a)->poll(id, &e), NcclDataLink::OpState::kOk);
  EXPECT_EQ(std::memcmp(r1, "first", 5), 0);
  EXPECT_EQ(std::memcmp(r2, "second!", 7), 0);
  // Unequal sizes: both fail, DATA_LOSS (out of step).
  auto bad_r = (*b)->post_recv(0, r1, 4);
  auto bad_s = (*a)->post_send(1, one, 5);
  EXPECT_EQ((*a)->poll(*bad_s, &e), NcclDataLink::OpState::kError);
  EXPECT_EQ(e.code(), StatusCode::kDataLoss);
  EXPECT_NE(e.message().find("size mismatch"), std::string::npos) << e.message();
  EXPECT_EQ((*b)->poll(*bad_r, &e), NcclDataLink::OpState::kError);
  // Held completions finish on release(); a dead rank fails the other side.
  fabric->hold_completions(true);
  auto h_r = (*b)->post_recv(0, r1, 5);
  auto h_s = (*a)->post_send(1, one, 5);
  std::memset(r1, 0, sizeof r1);
  EXPECT_EQ((*b)->poll(*h_r, &e), NcclDataLink::OpState::kPending);
  fabric->release();
  EXPECT_EQ((*b)->poll(*h_r, &e), NcclDataLink::OpState::kOk);
  EXPECT_EQ((*a)->poll(*h_s, &e), NcclDataLink::OpState::kOk);
  EXPECT_EQ(std::memcmp(r1, "first", 5), 0);
  auto orphan = (*a)->post_send(1, one, 5);
  b->reset();  // rank 1 gone
  EXPECT_EQ((*a)->poll(*orphan, &e), NcclDataLink::OpState::kError);
  EXPECT_EQ(e.code(), StatusCode::kUnavailable);
}

// ---- the transport over fake links

struct Side {
  std::unique_ptr<Transport> t;
  std::vector<TransferEvent> events;
};

class NcclTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fabric_ = FakeNcclFabric::create(4);
    region_.assign(64 * kPage, std::byte{0});
    TransportOptions ro;
    ro.cluster_token = "tok";
    ro.region = region_.data();
    ro.region_bytes = region_.size();
    recv_.t = make(1, ro);
    TransportOptions so;
    so.cluster_token = "tok";
    // A send whose receiver cut the pair off never completes (NCCL cannot
    // cancel it): the failed transfer is reported after this.
    so.quiesce_timeout = 300ms;
    send_.t = make(0, so);
    ASSERT_TRUE(recv_.t && send_.t);
    auto peer = send_.t->connect(*recv_.t->address());
    ASSERT_TRUE(peer.ok()) << peer.status().to_string();
    peer_ = *peer;
  }

  std::unique_ptr<Transport> make(int rank, const TransportOptions& o) {
    auto data = fabric_->link(rank);
    EXPECT_TRUE(data.ok());
    auto t = NcclTransport::create(o, NcclLinks{std::move(*data), LocalControlLink::create()});
    EXPECT_TRUE(t.ok()) << t.status().to_string();
    return t.ok() ? std::move(*t) : nullptr;
  }

  bool pump_until(const std::function<bool()>& done) {
    return pump({send_.t.get(), recv_.t.get()}, {&send_.events, &recv_.events}, done);
  }
  const TransferEvent* event(const Side& s, TransferId id) const {
    for (const auto& e : s.events)
      if (e.id == id) return &e;
    return nullptr;
  }
  Bytes post(TransferId id, const std::vector<DestRange>& ranges) {
    auto g = recv_.t->post_receive({id, ranges, Clock::now() + 20s});
    EXPECT_TRUE(g.ok()) << g.status().to_string();
    return g.ok() ? *g : Bytes{};
  }
  // One transfer of `src` in `seg` bytes per segment; returns after finish().
  void ship(TransferId id, const Bytes& grant, const std::vector<std::byte>& src, size_t seg) {
    ASSERT_TRUE(send_.t->begin_send(peer_, id, grant, Clock::now() + 20s).ok());
    uint32_t i = 0;
    for (size_t at = 0; at < src.size(); at += seg, ++i)
      ASSERT_TRUE(send_.t->send_segment(peer_, id, i, src.data() + at, std::min(seg, src.size() - at), at).ok());
    ASSERT_TRUE(send_.t->finish(peer_, id).ok());
  }
  std::vector<std::byte> gather(const std::vector<DestRange>& ranges, size_t n) const {
    std::vector<std::byte> out;
    for (const auto& r : ranges)
      out.insert(out.end(), region_.begin() + r.offset_bytes, region_.begin() + r.offset_bytes + r.length_bytes);
    out.resize(n);
    return out;
  }

  std::shared_ptr<FakeNcclFabric> fabric_;
  std::vector<std::byte> region_;
  Side send_, recv_;
  PeerId peer_;
};

// Three segments over five scattered pages: each segment goes as one send
// per contiguous run of pages it covers (sizes matching the receiver's
// receives), and everything lands byte for byte.
TEST_F(NcclTransportTest, SegmentsSplitPerPageRunLandByteIdentical) {
  const std::vector<DestRange> ranges = {
      {10 * kPage, kPage}, {3 * kPage, 2 * kPage}, {40 * kPage, kPage}, {20 * kPage, kPage}};
  const size_t total = 5 * kPage - 1000;
  const auto src = random_bytes(total, 77);
  const Bytes grant = post(TransferId(1), ranges);
  // Segments of 100000 bytes: the first crosses page 10 -> pages 3..4 (2
  // runs), the second 3..4 -> 40 (2), the third 40 -> 20 (2), the last
  // (26680 bytes) lies in page 20 (1): 7 pieces.
  const uint64_t matched_before = fabric_->matched();
  ship(TransferId(1), grant, src, 100000);
  ASSERT_TRUE(pump_until([&] { return !send_.events.empty() && !recv_.events.empty(); }));
  ASSERT_TRUE(recv_.events[0].status.ok()) << recv_.events[0].status.to_string();
  ASSERT_TRUE(send_.events[0].status.ok()) << send_.events[0].status.to_string();
  EXPECT_EQ(recv_.events[0].bytes, total);
  EXPECT_EQ(recv_.events[0].segments, 4u);
  EXPECT_TRUE(gather(ranges, total) == src);
  EXPECT_EQ(fabric_->matched() - matched_before, 7u);  // one send/receive pair per piece
  EXPECT_EQ(fabric_->unmatched(), 0u);
  EXPECT_EQ(region_[11 * kPage], std::byte{0});  // pages around them untouched
  EXPECT_EQ(region_[2 * kPage], std::byte{0});
}

// The sends finished but the receives did not (NCCL may complete a send
// before its bytes are in the peer's buffer): the sender sends its
// manifest, and the receiver holds it back until the bytes it describes
// are in — nothing is verified or reported early.
TEST_F(NcclTransportTest, ManifestWaitsForTheBytesItDescribes) {
  const std::vector<DestRange> ranges = {{0, 2 * kPage}};
  const auto src = random_bytes(2 * kPage, 78);
  const Bytes grant = post(TransferId(2), ranges);
  fabric_->hold_receives(true);
  ship(TransferId(2), grant, src, kPage);
  ASSERT_FALSE(pump({send_.t.get(), recv_.t.get()}, {&send_.events, &recv_.events},
                    [&] { return !recv_.events.empty() || !send_.events.empty(); }, 200ms));
  EXPECT_EQ(region_[0], std::byte{0});
  EXPECT_EQ(recv_.t->counters().malformed_messages, 0u);
  EXPECT_TRUE(send_.t->segment_released(peer_, TransferId(2), 1));  // its send is done
  fabric_->release();
  ASSERT_TRUE(pump_until([&] { return !send_.events.empty() && !recv_.events.empty(); }));
  EXPECT_TRUE(recv_.events[0].status.ok()) << recv_.events[0].status.to_string();
  EXPECT_TRUE(send_.events[0].status.ok()) << send_.events[0].status.to_string();
  EXPECT_TRUE(gather(ranges, src.size()) == src);
}

// A failed NCCL op fails its transfer on both sides, named; a transfer on
// the same pair before and after it is delivered intact.
TEST_F(NcclTransportTest, LinkErrorFailsOnlyItsTransfer) {
  const std::vector<DestRange> a = {{0, kPage}}, b = {{4 * kPage, kPage}}, c = {{8 * kPage, kPage}};
  const auto sa = random_bytes(kPage, 1), sb = random_bytes(kPage, 2), sc = random_bytes(kPage, 3);
  const Bytes ga = post(TransferId(10), a), gb = post(TransferId(11), b), gc = post(TransferId(12), c);
  ship(TransferId(10), ga, sa, kPage);
  ASSERT_TRUE(pump_until([&] { return event(send_, TransferId(10)) && event(recv_, TransferId(10)); }));
  fabric_->fail_next_match(0, 1);
  ship(TransferId(11), gb, sb, kPage);
  ship(TransferId(12), gc, sc, kPage);
  ASSERT_TRUE(pump_until([&] {
    return event(send_, TransferId(11)) && event(recv_, TransferId(11)) && event(send_, TransferId(12)) &&
           event(recv_, TransferId(12));
  }));
  const auto* s11 = event(send_, TransferId(11));
  const auto* r11 = event(recv_, TransferId(11));
  EXPECT_EQ(s11->status.code(), StatusCode::kUnavailable) << s11->status.to_string();
  EXPECT_NE(s11->status.message().find("injected failure"), std::string::npos) << s11->status.message();
  EXPECT_EQ(r11->status.code(), StatusCode::kUnavailable) << r11->status.to_string();
  EXPECT_EQ(r11->status.message().rfind("peer: ", 0), 0u) << r11->status.message();
  for (auto id : {TransferId(10), TransferId(12)}) {
    EXPECT_TRUE(event(send_, id)->status.ok()) << event(send_, id)->status.to_string();
    EXPECT_TRUE(event(recv_, id)->status.ok()) << event(recv_, id)->status.to_string();
  }
  EXPECT_TRUE(gather(a, kPage) == sa);
  EXPECT_TRUE(gather(c, kPage) == sc);
}

// A send nobody announced puts the pair out of step (NCCL would hang or
// mix up bytes): the receiver sees the size mismatch, cuts the pair off
// (DATA_LOSS naming it), and the sender loses the receiver (its channel
// closed) instead of waiting for its deadline.
TEST_F(NcclTransportTest, PairOutOfStepFailsNamedOnBothSides) {
  const std::vector<DestRange> r = {{0, kPage}};
  const auto src = random_bytes(kPage, 9);
  const Bytes g = post(TransferId(20), r);
  ASSERT_TRUE(fabric_->post_stray_send(0, 1, 1).ok());
  ship(TransferId(20), g, src, kPage);
  ASSERT_TRUE(pump_until([&] { return event(send_, TransferId(20)) && event(recv_, TransferId(20)); }));
  const auto* rv = event(recv_, TransferId(20));
  const auto* sv = event(send_, TransferId(20));
  EXPECT_EQ(rv->status.code(), StatusCode::kDataLoss) << rv->status.to_string();
  EXPECT_NE(rv->status.message().find("out of step"), std::string::npos) << rv->status.message();
  EXPECT_EQ(sv->status.code(), StatusCode::kUnavailable) << sv->status.to_string();
  EXPECT_NE(sv->status.message().find("rank 1"), std::string::npos) << sv->status.message();
  EXPECT_GE(recv_.t->counters().malformed_messages, 1u);
}

TEST_F(NcclTransportTest, PeerLossFailsTheReceive) {
  const std::vector<DestRange> r = {{0, 4 * kPage}};
  const auto src = random_bytes(4 * kPage, 4);
  const Bytes g = post(TransferId(30), r);
  fabric_->hold_completions(true);  // the bytes are still on the way
  ship(TransferId(30), g, src, kPage);
  ASSERT_TRUE(pump({send_.t.get(), recv_.t.get()}, {&send_.events, &recv_.events},
                   [&] { return fabric_->matched() >= 4; }));
  send_.t.reset();  // the sender dies mid-transfer
  ASSERT_TRUE(pump({recv_.t.get()}, {&recv_.events}, [&] { return !recv_.events.empty(); }));
  EXPECT_EQ(recv_.events[0].status.code(), StatusCode::kUnavailable) << recv_.events[0].status.to_string();
  EXPECT_EQ(recv_.events[0].id, TransferId(30));
  EXPECT_EQ(region_[0], std::byte{0});  // nothing of it landed
}

// Frames straight on the receiver's control endpoint, as another rank's
// process would send them (formats: nccl_transport.cpp).
Bytes u32s(std::initializer_list<uint64_t> words, int width) {
  Bytes out;
  for (uint64_t w : words)
    for (int i = 0; i < width; ++i) out.push_back(std::byte(static_cast<uint8_t>(w >> (8 * i))));
  return out;
}
Bytes frame(uint8_t type, std::initializer_list<Bytes> parts) {
  Bytes f{std::byte{type}};
  for (const auto& p : parts) f.insert(f.end(), p.begin(), p.end());
  return f;
}
Bytes ident(uint32_t rank, uint32_t world, const std::string& token) {
  Bytes t;
  for (char ch : token) t.push_back(std::byte(static_cast<uint8_t>(ch)));
  return frame(1, {u32s({rank, world, token.size()}, 4), t});
}

// No receive is ever posted for a Put frame from a channel without the
// right Ident, and one naming bytes outside the region cuts the pair off:
// nothing is written, the process is fine.
TEST_F(NcclTransportTest, PutFramesAreCheckedBeforeAnyReceiveIsPosted) {
  auto addr = recv_.t->address();
  ASSERT_TRUE(addr.ok());
  const Bytes control(addr->begin() + 17, addr->end());  // "KVGN", version, rank, world, length
  const Bytes inside = frame(3, {u32s({1}, 4), u32s({0, kPage}, 8)});
  const Bytes outside = frame(3, {u32s({1}, 4), u32s({region_.size() - 10, 20}, 8)});
  std::vector<TransferEvent> none;
  for (const char* token : {"wrong", "tok"}) {
    SCOPED_TRACE(token);
    auto impostor = LocalControlLink::create();
    auto ch = impostor->open(control);
    ASSERT_TRUE(ch.ok()) << ch.status().to_string();
    ASSERT_TRUE(impostor->send(*ch, ident(2, 4, token)).ok());
    const auto before = recv_.t->counters().malformed_messages;
    ASSERT_TRUE(impostor->send(*ch, std::string(token) == "tok" ? outside : inside).ok());
    ASSERT_TRUE(impostor->send(*ch, frame(9, {})).ok());  // unknown type: counted unless cut off
    for (int i = 0; i < 3; ++i) recv_.t->progress(none);
    EXPECT_EQ(fabric_->unmatched(), 0u);  // no receive posted
    if (std::string(token) == "tok") {
      EXPECT_EQ(recv_.t->counters().malformed_messages, before + 1);  // the Put; the rest dropped
      std::vector<NcclControlLink::Event> ev;
      impostor->poll(ev);
      ASSERT_EQ(ev.size(), 1u);
      EXPECT_EQ(ev[0].kind, NcclControlLink::Event::kClosed);  // the receiver cut it off
    } else {
      EXPECT_EQ(recv_.t->counters().malformed_messages, before + 1);  // the unknown frame
    }
  }
  EXPECT_TRUE(none.empty());
  EXPECT_TRUE(std::all_of(region_.begin(), region_.end(), [](std::byte b) { return b == std::byte{0}; }));
  // The real sender's pair still works.
  const auto src = random_bytes(kPage, 5);
  ship(TransferId(40), post(TransferId(40), {{0, kPage}}), src, kPage);
  ASSERT_TRUE(pump_until([&] { return !send_.events.empty() && !recv_.events.empty(); }));
  EXPECT_TRUE(recv_.events[0].status.ok()) << recv_.events[0].status.to_string();
}

// Seeded mutations of the frames a peer may send (Ident, core message, Put,
// unknown types; truncated, extended, random), on channels with and without
// a valid Ident: never a crash, never a byte written into the region (no
// rank 2 sends), and the real pair still delivers afterwards.
TEST_F(NcclTransportTest, MutatedFramesNeverCrashOrWrite) {
  auto addr = recv_.t->address();
  ASSERT_TRUE(addr.ok());
  const Bytes control(addr->begin() + 17, addr->end());
  const std::vector<Bytes> seeds = {
      ident(2, 4, "tok"),
      frame(3, {u32s({2}, 4), u32s({0, kPage, 5 * kPage, 100}, 8)}),
      frame(2, {wire::encode({wire::WireType::kManifest, 1, wire::Manifest{7, 0, {}}})}),
      frame(3, {u32s({0xFFFFFFFFu}, 4)}),
  };
  std::mt19937_64 rng(2024);
  std::vector<TransferEvent> none;
  for (int round = 0; round < 40; ++round) {
    auto impostor = LocalControlLink::create();
    auto ch = impostor->open(control);
    ASSERT_TRUE(ch.ok());
    if (round % 2 == 0) {
      ASSERT_TRUE(impostor->send(*ch, ident(2, 4, "tok")).ok());
    }
    for (int i = 0; i < 50; ++i) {
      Bytes f = seeds[rng() % seeds.size()];
      switch (rng() % 4) {
        case 0: if (!f.empty()) f.resize(rng() % f.size()); break;                  // truncated
        case 1: f.push_back(std::byte(static_cast<uint8_t>(rng()))); break;       // extended
        case 2: for (int k = 0; k < 4 && !f.empty(); ++k) f[rng() % f.size()] ^= std::byte(1u << (rng() % 8)); break;
        default: f = random_bytes(rng() % 64, rng()); break;                       // random
      }
      (void)impostor->send(*ch, f);  // a channel the receiver cut off refuses more
    }
    recv_.t->progress(none);
  }
  for (int i = 0; i < 3; ++i) recv_.t->progress(none);
  EXPECT_TRUE(none.empty());
  EXPECT_TRUE(std::all_of(region_.begin(), region_.end(), [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_GT(recv_.t->counters().malformed_messages, 0u);
  const auto src = random_bytes(kPage, 6);
  ship(TransferId(50), post(TransferId(50), {{3 * kPage, kPage}}), src, kPage);
  ASSERT_TRUE(pump_until([&] { return !send_.events.empty() && !recv_.events.empty(); }));
  EXPECT_TRUE(recv_.events[0].status.ok()) << recv_.events[0].status.to_string();
  EXPECT_TRUE(gather({{3 * kPage, kPage}}, kPage) == src);
}

// ---- the TCP control link

// Polls both endpoints until `done` or 10 s.
bool poll_until(NcclControlLink& a, NcclControlLink& b, std::vector<NcclControlLink::Event>& ea,
                std::vector<NcclControlLink::Event>& eb, const std::function<bool()>& done) {
  const auto end = Clock::now() + 10s;
  while (!done()) {
    if (Clock::now() > end) return false;
    a.poll(ea);
    b.poll(eb);
  }
  return true;
}

TEST(TcpControlLink, FramesArriveInOrderAndClosesAreSeen) {
  auto a = TcpControlLink::create();
  auto b = TcpControlLink::create({.max_frame_bytes = 1 << 20});
  ASSERT_TRUE(a.ok() && b.ok()) << a.status().to_string() << b.status().to_string();
  auto ch = (*a)->open((*b)->address());
  ASSERT_TRUE(ch.ok()) << ch.status().to_string();
  // Queued before the connection completes; sizes from empty to 1 MiB.
  const std::vector<size_t> sizes = {0, 1, 5, 70000, size_t{1} << 20};
  for (size_t n : sizes) ASSERT_TRUE((*a)->send(*ch, random_bytes(n, n)).ok());
  std::vector<NcclControlLink::Event> ea, eb;
  ASSERT_TRUE(poll_until(**a, **b, ea, eb, [&] { return eb.size() >= sizes.size(); }));
  ASSERT_EQ(eb.size(), sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(eb[i].kind, NcclControlLink::Event::kFrame);
    EXPECT_TRUE(eb[i].frame == random_bytes(sizes[i], sizes[i])) << i;
    EXPECT_EQ(eb[i].channel, eb[0].channel);
  }
  // Too large for the receiver: it closes its side, the sender sees it.
  ASSERT_TRUE((*a)->send(*ch, Bytes((size_t{1} << 20) + 1)).ok());
  ASSERT_TRUE(poll_until(**a, **b, ea, eb, [&] { return eb.size() > sizes.size() && !ea.empty(); }));
  EXPECT_EQ(eb.back().kind, NcclControlLink::Event::kClosed);
  EXPECT_EQ(eb.back().status.code(), StatusCode::kInvalidArgument) << eb.back().status.to_string();
  EXPECT_EQ(ea.back().kind, NcclControlLink::Event::kClosed);
  EXPECT_EQ(ea.back().channel, *ch);
  EXPECT_EQ((*a)->send(*ch, Bytes(1)).code(), StatusCode::kUnavailable);
  // Addresses of another kind, or malformed.
  EXPECT_EQ((*a)->open(Bytes(11, std::byte{0})).status().code(), StatusCode::kInvalidArgument);
  auto addr = (*b)->address();
  addr.pop_back();
  EXPECT_EQ((*a)->open(addr).status().code(), StatusCode::kInvalidArgument);
  // A destroyed endpoint closes its channels.
  auto ch2 = (*a)->open((*b)->address());
  ASSERT_TRUE(ch2.ok());
  ASSERT_TRUE((*a)->send(*ch2, Bytes(3)).ok());
  ea.clear();
  eb.clear();
  ASSERT_TRUE(poll_until(**a, **b, ea, eb, [&] { return !eb.empty(); }));
  b->reset();
  const auto end = Clock::now() + 10s;
  while (ea.empty() && Clock::now() < end) (*a)->poll(ea);
  ASSERT_FALSE(ea.empty());
  EXPECT_EQ(ea[0].kind, NcclControlLink::Event::kClosed);
  EXPECT_EQ(ea[0].channel, *ch2);
}

// The transport over fake NCCL links with its control messages on TCP.
TEST(NcclOverTcp, WholeTransferLands) {
  auto fabric = FakeNcclFabric::create(2);
  std::vector<std::byte> region(16 * kPage);
  auto make = [&](int rank, bool with_region) {
    TransportOptions o;
    o.cluster_token = "tcp";
    if (with_region) {
      o.region = region.data();
      o.region_bytes = region.size();
    }
    auto data = fabric->link(rank);
    auto control = TcpControlLink::create();
    EXPECT_TRUE(data.ok() && control.ok());
    auto t = NcclTransport::create(o, NcclLinks{std::move(*data), std::move(*control)});
    EXPECT_TRUE(t.ok()) << t.status().to_string();
    return std::move(*t);
  };
  auto recv = make(1, true);
  auto send = make(0, false);
  auto peer = send->connect(*recv->address());
  ASSERT_TRUE(peer.ok()) << peer.status().to_string();
  const std::vector<DestRange> ranges = {{9 * kPage, kPage}, {kPage, 2 * kPage}};
  const auto src = random_bytes(3 * kPage, 8);
  auto grant = recv->post_receive({TransferId(3), ranges, Clock::now() + 20s});
  ASSERT_TRUE(grant.ok());
  ASSERT_TRUE(send->begin_send(*peer, TransferId(3), *grant, Clock::now() + 20s).ok());
  ASSERT_TRUE(send->send_segment(*peer, TransferId(3), 0, src.data(), 100000, 0).ok());
  ASSERT_TRUE(send->send_segment(*peer, TransferId(3), 1, src.data() + 100000, src.size() - 100000, 100000).ok());
  ASSERT_TRUE(send->finish(*peer, TransferId(3)).ok());
  std::vector<TransferEvent> se, re;
  ASSERT_TRUE(pump({send.get(), recv.get()}, {&se, &re}, [&] { return !se.empty() && !re.empty(); }));
  EXPECT_TRUE(re[0].status.ok()) << re[0].status.to_string();
  EXPECT_TRUE(se[0].status.ok()) << se[0].status.to_string();
  EXPECT_EQ(std::memcmp(region.data() + 9 * kPage, src.data(), kPage), 0);
  EXPECT_EQ(std::memcmp(region.data() + kPage, src.data() + kPage, 2 * kPage), 0);
  // The sender goes away: the receiver's next transfer fails kUnavailable.
  auto g2 = recv->post_receive({TransferId(4), {{0, kPage}}, Clock::now() + 20s});
  ASSERT_TRUE(g2.ok());
  ASSERT_TRUE(send->begin_send(*peer, TransferId(4), *g2, Clock::now() + 20s).ok());
  send->progress(se);  // Begin goes out; the destructor flushes it and its Goodbye
  send.reset();
  re.clear();
  ASSERT_TRUE(pump({recv.get()}, {&re}, [&] { return !re.empty(); }));
  EXPECT_EQ(re[0].status.code(), StatusCode::kUnavailable) << re[0].status.to_string();
}

TEST(NcclFactory, WithoutAProviderTheErrorNamesWhatIsNeeded) {
  TransportConfig c;
  c.kind = TransportKind::kNccl;
  auto t = create_transport(c, {});
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kUnimplemented);
  for (const char* word : {"communicator", "set_nccl_link_provider", "NcclTransport::create"})
    EXPECT_NE(t.status().message().find(word), std::string::npos) << word << ": " << t.status().message();
  // With one, create_transport builds it.
  auto fabric = FakeNcclFabric::create(2);
  set_nccl_link_provider([fabric]() -> Result<NcclLinks> {
    KVGATE_ASSIGN_OR_RETURN(auto data, fabric->link(fabric->next_free_rank()));
    return NcclLinks{std::move(data), LocalControlLink::create()};
  });
  auto made = create_transport(c, {});
  set_nccl_link_provider(nullptr);
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  EXPECT_EQ((*made)->name(), "nccl");
  EXPECT_EQ(NcclTransport::create({}, {}).status().code(), StatusCode::kInvalidArgument);
}

TEST(NcclAddress, ForeignAndMalformedAddressesAreInvalidArgument) {
  auto fabric = FakeNcclFabric::create(2);
  auto l0 = fabric->link(0);
  ASSERT_TRUE(l0.ok());
  auto t = NcclTransport::create({}, NcclLinks{std::move(*l0), LocalControlLink::create()});
  ASSERT_TRUE(t.ok());
  auto self = (*t)->address();
  ASSERT_TRUE(self.ok());
  EXPECT_EQ((*t)->connect(*self).status().code(), StatusCode::kInvalidArgument);  // itself
  Bytes cut(self->begin(), self->end() - 1);
  EXPECT_EQ((*t)->connect(cut).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*t)->connect(Bytes(12, std::byte{1})).status().code(), StatusCode::kInvalidArgument);
  // Another communicator's size.
  auto other = FakeNcclFabric::create(3);
  auto l1 = other->link(1);
  ASSERT_TRUE(l1.ok());
  auto u = NcclTransport::create({}, NcclLinks{std::move(*l1), LocalControlLink::create()});
  ASSERT_TRUE(u.ok());
  auto ua = (*u)->address();
  EXPECT_EQ((*t)->connect(*ua).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::transport::testing
