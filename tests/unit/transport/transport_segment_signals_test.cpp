// The transport suite, continued: the per-segment signals, on every
// transport (same fixture and instantiation as transport_suite_test.cpp).
//   - sender: segment_released() is false for a segment not sent or still
//     being sent, true once its send completed (before the transfer ends),
//     and the bytes may then really be reused;
//   - receiver: TransportOptions::on_segment_landed names every segment
//     once, with its offset and length, when its bytes are in the pages,
//     before the transfer's OK event; none after a cancel or a failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "common/crc32c.h"
#include "tests/unit/transport/transport_suite_fixture.h"

namespace kvgate::transport::testing {
namespace {

// Three rendezvous-sized segments; the release of each is watched while the
// transfer is still open (no finish), then its source bytes are scribbled
// over: a transport that still read them would deliver garbage or fail the
// CRC check.
TEST_P(TransportSuite, SegmentReleasedOnceItsSendCompleted) {
  const auto ranges = pages(0, 16);  // 1 MiB
  const TransferId id(41);
  const Bytes grant = post(id, ranges);
  constexpr size_t kSeg = 300000;
  auto src = random_bytes(3 * kSeg, 41);
  const auto original = src;
  EXPECT_TRUE(sender_->releases_segments_early());
  EXPECT_FALSE(sender_->segment_released(peer_, id, 0));  // not begun
  ASSERT_TRUE(sender_->begin_send(peer_, id, grant, Clock::now() + 20s).ok());
  EXPECT_FALSE(sender_->segment_released(peer_, id, 0));  // begun, not sent
  ASSERT_TRUE(sender_->send_segment(peer_, id, 0, src.data(), kSeg, 0).ok());  // CRC by the transport
  ASSERT_TRUE(sender_->send_segment(peer_, id, 1, src.data() + kSeg, kSeg, kSeg,
                                    crc32c(src.data() + kSeg, kSeg)).ok());  // CRC handed over
  EXPECT_FALSE(sender_->segment_released(peer_, id, 2));  // never sent
  EXPECT_FALSE(sender_->segment_released(peer_, TransferId(999), 0));
  if (is_loopback()) {
    // Loopback's receiver copies out of the sender's buffer in its own
    // progress(): until then the send cannot have completed.
    std::vector<TransferEvent> none;
    for (int i = 0; i < 50; ++i) sender_->progress(none);
    EXPECT_FALSE(sender_->segment_released(peer_, id, 0));
    EXPECT_FALSE(sender_->segment_released(peer_, id, 1));
    EXPECT_TRUE(none.empty());
  }
  bool released[2] = {false, false};
  ASSERT_TRUE(pump_until([&] {
    for (uint32_t i = 0; i < 2; ++i) {
      if (released[i] || !sender_->segment_released(peer_, id, i)) continue;
      released[i] = true;
      std::fill(src.begin() + i * kSeg, src.begin() + (i + 1) * kSeg, std::byte{0xEE});
    }
    return released[0] && released[1];
  }));
  EXPECT_TRUE(sent_.empty());  // released while the transfer is open
  EXPECT_TRUE(sender_->segment_released(peer_, id, 0));  // and it stays so
  EXPECT_FALSE(sender_->segment_released(peer_, id, 2));
  ASSERT_TRUE(sender_->send_segment(peer_, id, 2, src.data() + 2 * kSeg, kSeg, 2 * kSeg).ok());
  ASSERT_TRUE(sender_->finish(peer_, id).ok());
  ASSERT_TRUE(pump_until([&] { return both_done(); }));
  EXPECT_TRUE(received_[0].status.ok()) << received_[0].status.to_string();
  EXPECT_TRUE(sent_[0].status.ok()) << sent_[0].status.to_string();
  EXPECT_TRUE(gather(region_, ranges, 0, 3 * kSeg) == original);
  // Reported: the transfer is unknown now (every byte is released anyway).
  EXPECT_FALSE(sender_->segment_released(peer_, id, 0));
}

// A cancelled send: a segment never issued is released at once (the
// transport will never read it), one in flight only when it completed.
TEST_P(TransportSuite, SegmentReleasedAfterCancel) {
  const TransferId id(42);
  // Posted, but the sender is not connected yet when it sends: the segments
  // queue (the handshake completes in progress()).
  auto late = make_sender("secret");
  ASSERT_TRUE(late);
  auto peer = late->connect(*receiver_->address());
  ASSERT_TRUE(peer.ok());
  const Bytes grant = post(id, pages(0, 2));
  const auto src = random_bytes(5000, 42);
  ASSERT_TRUE(late->begin_send(*peer, id, grant, Clock::now() + 20s).ok());
  ASSERT_TRUE(late->send_segment(*peer, id, 0, src.data(), src.size(), 0).ok());
  EXPECT_FALSE(late->segment_released(*peer, id, 0));  // queued, will be read
  ASSERT_TRUE(late->cancel_send(*peer, id).ok());
  EXPECT_TRUE(late->segment_released(*peer, id, 0));  // never issued, never will be
  EXPECT_FALSE(late->segment_released(*peer, id, 1));
  std::vector<TransferEvent> late_events;
  ASSERT_TRUE(pump({late.get(), receiver_.get()}, {&late_events, &received_},
                   [&] { return !late_events.empty(); }));
  EXPECT_EQ(late_events[0].status.code(), StatusCode::kCancelled) << late_events[0].status.to_string();
  EXPECT_EQ(late_events[0].segments, 0u);
  (void)receiver_->cancel_receive(id);
  ASSERT_TRUE(pump({late.get(), receiver_.get()}, {&late_events, &received_},
                   [&] { return !received_.empty(); }));
  EXPECT_TRUE(landed_of(id).empty());
  destroy_while_progressing(late, receiver_.get(), &received_);
}

// Every segment's notice exactly once, with its offset and length, when
// its bytes are in the pages, before the OK event.
TEST_P(TransportSuite, LandingNoticesCoverEverySegmentOnceBeforeTheOk) {
  const auto ranges = pages(4, 48);  // 3 MiB in 48 scattered pages
  const TransferId id(43);
  const Bytes grant = post(id, ranges);
  // Tiny (eager) to several pages (rendezvous, iov), sent out of order.
  const std::vector<size_t> sizes = {100, 4096, 65536, 70000, 1, 200000, 131072, 333333, 64, 500000};
  std::vector<uint64_t> offsets(sizes.size());
  std::exclusive_scan(sizes.begin(), sizes.end(), offsets.begin(), uint64_t{0});
  const size_t total = offsets.back() + sizes.back();
  const auto src = random_bytes(total, 43);
  int bytes_not_in_pages = 0;
  on_landed_check_ = [&](const SegmentLanded& n) {
    if (n.id != id || n.logical_offset + n.bytes > total) return;
    const auto want = std::vector<std::byte>(src.begin() + n.logical_offset,
                                             src.begin() + n.logical_offset + n.bytes);
    if (gather(region_, ranges, n.logical_offset, n.bytes) != want) ++bytes_not_in_pages;
  };
  ASSERT_TRUE(sender_->begin_send(peer_, id, grant, Clock::now() + 20s).ok());
  for (uint32_t i : {3u, 0u, 9u, 1u, 2u, 8u, 4u, 5u, 7u, 6u})
    ASSERT_TRUE(sender_->send_segment(peer_, id, i, src.data() + offsets[i], sizes[i], offsets[i]).ok());
  ASSERT_TRUE(sender_->finish(peer_, id).ok());
  ASSERT_TRUE(pump_until([&] { return both_done(); }));
  ASSERT_TRUE(received_[0].status.ok()) << received_[0].status.to_string();
  const auto notices = landed_of(id);
  ASSERT_EQ(notices.size(), sizes.size());
  std::vector<int> seen(sizes.size(), 0);
  for (const auto& n : notices) {
    ASSERT_LT(n.notice.segment_index, sizes.size());
    const uint32_t i = n.notice.segment_index;
    ++seen[i];
    EXPECT_EQ(n.notice.logical_offset, offsets[i]) << i;
    EXPECT_EQ(n.notice.bytes, sizes[i]) << i;
    EXPECT_EQ(n.receive_events_before, 0u) << "segment " << i << " announced after the OK event";
  }
  EXPECT_EQ(seen, std::vector<int>(sizes.size(), 1));
  EXPECT_EQ(bytes_not_in_pages, 0);
  EXPECT_EQ(landed_.size(), sizes.size());  // nothing for other transfers
}

// Cancelled after its first segment landed: the later segments (sent
// anyway, racing the verdict) are never announced. With put nothing is:
// its notices come with the manifest, which a cancelled transfer never
// verifies.
TEST_P(TransportSuite, NoLandingNoticeAfterCancel) {
  const auto ranges = pages(0, 8);
  const TransferId id(44);
  const Bytes grant = post(id, ranges);
  const auto src = random_bytes(4 * kPageBytes, 44);
  ASSERT_TRUE(sender_->begin_send(peer_, id, grant, Clock::now() + 20s).ok());
  ASSERT_TRUE(sender_->send_segment(peer_, id, 0, src.data(), kPageBytes, 0).ok());
  if (is_put()) {
    ASSERT_TRUE(pump_until([&] { return prefix_landed(region_, ranges, src, kPageBytes); }));
  } else {
    ASSERT_TRUE(pump_until([&] { return !landed_of(id).empty(); }));
  }
  ASSERT_TRUE(receiver_->cancel_receive(id).ok());
  for (uint32_t i = 1; i < 4; ++i)
    (void)sender_->send_segment(peer_, id, i, src.data() + i * kPageBytes, kPageBytes, i * kPageBytes);
  (void)sender_->finish(peer_, id);
  ASSERT_TRUE(pump_until([&] { return both_done(); }));
  EXPECT_EQ(received_[0].status.code(), StatusCode::kCancelled) << received_[0].status.to_string();
  EXPECT_EQ(sent_[0].status.code(), StatusCode::kCancelled) << sent_[0].status.to_string();
  const auto notices = landed_of(id);
  if (is_put()) {
    EXPECT_TRUE(notices.empty());
  } else {
    ASSERT_EQ(notices.size(), 1u);
    EXPECT_EQ(notices[0].notice.segment_index, 0u);
    EXPECT_EQ(notices[0].notice.bytes, kPageBytes);
  }
}

// A segment past the grant fails the transfer where it is caught: it never
// lands and is never announced, nor is anything sent after it.
TEST_P(TransportSuite, NoLandingNoticeForAnOverrunAndAfterIt) {
  const auto ranges = pages(0, 2);  // 128 KiB granted
  const TransferId id(45);
  const Bytes grant = post(id, ranges);
  TestHooks hooks;
  hooks.skip_sender_range_check = true;  // am/tag: the receiver catches it
  sender_->set_test_hooks(hooks);
  const auto src = random_bytes(100000, 45);
  ASSERT_TRUE(sender_->begin_send(peer_, id, grant, Clock::now() + 20s).ok());
  ASSERT_TRUE(sender_->send_segment(peer_, id, 0, src.data(), 50000, 0).ok());
  (void)sender_->send_segment(peer_, id, 1, src.data(), 100000, 100000);  // ends at 200000
  (void)sender_->send_segment(peer_, id, 2, src.data() + 50000, 50000, 50000);
  (void)sender_->finish(peer_, id);
  ASSERT_TRUE(pump_until([&] { return both_done(); }));
  EXPECT_EQ(received_[0].status.code(), StatusCode::kOutOfRange) << received_[0].status.to_string();
  for (const auto& n : landed_of(id)) {
    EXPECT_EQ(n.notice.segment_index, 0u) << "a segment after the overrun was announced";
    EXPECT_EQ(n.notice.bytes, 50000u);
  }
  // Put: caught by the sender, no manifest. Loopback: all three arrive in
  // one progress(), which lands segment 0 and then fails the transfer: the
  // notice of segment 0, due at its end, is withdrawn.
  if (is_put() || is_loopback()) {
    EXPECT_TRUE(landed_of(id).empty());
  }
}

// The notice callback may call back into the transport: cancelling at the
// first notice withdraws the notices still due for that transfer.
TEST_P(TransportSuite, LandingNoticeCallbackMayCancel) {
  const auto ranges = pages(0, 4);
  const TransferId id(46);
  const Bytes grant = post(id, ranges);
  const auto src = random_bytes(4 * 1000, 46);
  Status cancelled;
  on_landed_check_ = [&](const SegmentLanded& n) {
    if (n.id == id && cancelled.ok()) {
      cancelled = Status(StatusCode::kCancelled, "by the callback");
      EXPECT_TRUE(receiver_->cancel_receive(id).ok());
    }
  };
  ASSERT_TRUE(sender_->begin_send(peer_, id, grant, Clock::now() + 20s).ok());
  for (uint32_t i = 0; i < 4; ++i)
    ASSERT_TRUE(sender_->send_segment(peer_, id, i, src.data() + i * 1000, 1000, i * 1000).ok());
  // Put announces at the manifest; the others before it is sent, so that
  // the transfer cannot have verified before the callback cancels it.
  if (is_put()) {
    ASSERT_TRUE(sender_->finish(peer_, id).ok());
  }
  ASSERT_TRUE(pump_until([&] { return !cancelled.ok(); }));
  if (!is_put()) (void)sender_->finish(peer_, id);
  ASSERT_TRUE(pump_until([&] { return both_done(); }));
  EXPECT_EQ(landed_of(id).size(), 1u);
  EXPECT_EQ(received_[0].status.code(), StatusCode::kCancelled) << received_[0].status.to_string();
  EXPECT_EQ(sent_[0].status.code(), StatusCode::kCancelled) << sent_[0].status.to_string();
}

}  // namespace
}  // namespace kvgate::transport::testing
