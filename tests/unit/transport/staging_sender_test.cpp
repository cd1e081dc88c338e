// transport/staging: StagedSender over the test doubles (staging_doubles.h)
// — bytes and CRCs for every shape, the ring's overlap step by step, the
// release guard, the mode without per-segment release, failures, cancel —
// and the copiers. Part of staging_test (label unit).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "tests/unit/transport/staging_doubles.h"
#include "transport/staging/cuda_copier.h"

namespace kvgate::transport::staging {
namespace {

using namespace doubles;

// ---------------------------------------------------------------- sender

struct ShapeCase {
  std::string name;
  std::vector<size_t> sizes;  // one enqueue each, back to back in the image
  uint32_t buffers;
  size_t buffer_bytes;
};

void PrintTo(const ShapeCase& c, std::ostream* os) { *os << c.name; }

class StagedSenderShapes : public ::testing::TestWithParam<ShapeCase> {};

TEST_P(StagedSenderShapes, BytesArriveIdenticalAndCrcsMatch) {
  const ShapeCase& c = GetParam();
  SenderRig rig({c.buffers, c.buffer_bytes});
  ASSERT_TRUE(rig.sender);
  rig.transport.set_auto_release(true);
  const TransferId id(11);
  ASSERT_TRUE(rig.sender->begin(kPeer, id, {}, Clock::now() + 10s).ok());
  uint64_t at = 0;
  uint32_t expect_segments = 0;
  for (size_t n : c.sizes) {
    auto r = rig.sender->enqueue(kPeer, id, rig.device.data() + at, n, at);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(r->first_index, expect_segments);
    EXPECT_EQ(r->count, (n + c.buffer_bytes - 1) / c.buffer_bytes);  // split, never rejected
    expect_segments += r->count;
    at += n;
  }
  ASSERT_TRUE(rig.sender->finish(kPeer, id).ok());
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(id) != nullptr; }));
  const StagedSendEvent& ev = *rig.event_of(id);
  EXPECT_TRUE(ev.event.status.ok()) << ev.event.status.to_string();
  EXPECT_EQ(ev.event.bytes, at);
  // Bytes identical to the device's.
  const auto image = rig.transport.image(id);
  ASSERT_EQ(image.size(), at);
  EXPECT_TRUE(std::equal(image.begin(), image.end(), rig.device.begin()));
  // Every CRC handed over is the CRC of the source bytes, and the event
  // lists them all for the manifest.
  ASSERT_EQ(ev.segments.size(), expect_segments);
  EXPECT_EQ(rig.transport.segments_of(id), expect_segments);
  for (const StagedSegmentInfo& s : ev.segments) {
    EXPECT_LE(s.bytes, c.buffer_bytes);
    EXPECT_EQ(s.crc32c, crc32c(rig.device.data() + s.remote_offset, s.bytes)) << s.index;
    EXPECT_EQ(rig.transport.crc_of(id, s.index), s.crc32c);
  }
  EXPECT_EQ(rig.transport.crc_mismatches(), 0);
  EXPECT_EQ(rig.transport.violations(), 0);  // no buffer reused before its release
  EXPECT_EQ(rig.sender->free_buffers(), c.buffers);
  EXPECT_EQ(rig.sender->live_transfers(), 0u);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, StagedSenderShapes,
    ::testing::Values(ShapeCase{"one_byte", {1}, 2, 4096},
                      ShapeCase{"page_sized", {4096, 4096, 4096}, 4, 4096},
                      ShapeCase{"larger_than_a_buffer", {4096 * 3 + 17}, 2, 4096},
                      ShapeCase{"more_segments_than_buffers",
                                std::vector<size_t>(20, 1000), 3, 4096},
                      ShapeCase{"mixed", {1, 4095, 4096, 4097, 9000, 64, 12288, 1}, 2, 4096},
                      ShapeCase{"one_buffer", std::vector<size_t>(5, 777), 1, 1024}),
    [](const auto& info) { return info.param.name; });

// The ring's overlap, step by step (copy completion chosen with holds): the
// copy of segment 1 runs while segment 0 is at the transport, and buffer 0
// takes segment 2 only after the transport released segment 0.
TEST(StagedSender, CopiesOverlapSendsAndNeverReuseAnUnreleasedBuffer) {
  SenderRig rig({2, 4096});
  ASSERT_TRUE(rig.sender);
  const TransferId id(3);
  rig.copier.hold_all();
  ASSERT_TRUE(rig.sender->begin(kPeer, id, {}, Clock::now() + 10s).ok());
  ASSERT_TRUE(rig.sender->enqueue(kPeer, id, rig.device.data(), 4 * 4096, 0).ok());
  ASSERT_TRUE(rig.sender->finish(kPeer, id).ok());
  rig.sender->progress();
  EXPECT_EQ(rig.copier.copies_issued(), 2u);  // both buffers copying
  EXPECT_EQ(rig.sender->free_buffers(), 0u);

  const auto wait_slot = [&](uint32_t slot) {
    ASSERT_TRUE(rig.copier.wait(slot, Clock::now() + 5s).ok());
  };
  rig.copier.release(0);
  wait_slot(0);
  rig.sender->progress();  // segment 0 → send
  EXPECT_EQ(rig.copier.copies_issued(), 2u);  // buffer 0 is at the transport: no copy into it

  rig.copier.release(1);  // segment 1's copy runs while segment 0 is being sent
  wait_slot(1);
  rig.sender->progress();  // segment 1 → send
  rig.sender->progress();
  EXPECT_EQ(rig.copier.copies_issued(), 2u);  // neither buffer released yet

  rig.transport.release(id, 0);
  rig.sender->progress();  // buffer 0 takes segment 2
  EXPECT_EQ(rig.copier.copies_issued(), 3u);
  wait_slot(0);
  rig.sender->progress();  // segment 2 → send
  rig.transport.release(id, 1);
  rig.sender->progress();  // buffer 1 takes segment 3
  wait_slot(1);
  rig.sender->progress();  // segment 3 → send, then finish
  rig.transport.release(id, 2);
  rig.transport.release(id, 3);
  rig.sender->progress();
  EXPECT_TRUE(rig.transport.finished(id));

  const std::vector<std::string> expected = {
      "copy 0", "copied 0", "send 0",                   //
      "copy 1", "copied 1", "send 1",                   // copy 1 ran during send 0
      "release 0", "copy 2", "copied 2", "send 2",      // buffer 0 reused only after release 0
      "release 1", "copy 3", "copied 3", "send 3",      //
      "finish 3", "release 2", "release 3"};            // finish once all were handed over
  EXPECT_EQ(rig.log.events(), expected);
  EXPECT_EQ(rig.transport.violations(), 0);
  EXPECT_EQ(rig.sender->counters().buffers_released_early, 4u);
}

// The guard itself: with a probe that claims every segment released at
// once, the ring reuses buffers the transport still reads, and the fake
// sees it. (The checks the other tests rely on do catch early reuse.)
TEST(StagedSender, GuardDetectsABufferReusedBeforeItsRelease) {
  EventLog log;
  FakeSendTransport transport(&log);
  const StagingOptions options{2, 1024};
  HostCopier copier(2, HostCopierHooks{[&](const HostCopyRecord& r) {
                                         return transport.check_copy_target(r.dst, r.bytes);
                                       },
                                       {}});
  auto lying = [](PeerId, TransferId, uint32_t) { return true; };
  auto s = StagedSender::create(transport, copier, options, lying);
  ASSERT_TRUE(s.ok());
  auto& sender = **s;
  const auto device = random_bytes(8 * 1024, 3);
  ASSERT_TRUE(sender.begin(kPeer, TransferId(1), {}, Clock::now() + 10s).ok());
  ASSERT_TRUE(sender.enqueue(kPeer, TransferId(1), device.data(), device.size(), 0).ok());
  ASSERT_TRUE(sender.finish(kPeer, TransferId(1)).ok());
  const auto end = Clock::now() + 10s;
  while (!transport.finished(TransferId(1)) && Clock::now() < end) sender.progress();
  ASSERT_TRUE(transport.finished(TransferId(1)));
  EXPECT_GT(transport.violations(), 0);
}

// Over a transport that releases a segment's bytes only at the transfer's
// event (releases_segments_early() false): a buffer returns at its
// transfer's event, a transfer may use at most `buffers` segments, and a
// later transfer waits until every older one finished.
TEST(StagedSender, WithoutEarlyReleaseBuffersReturnAtTheEvent) {
  SenderRig rig({3, 1024}, /*early_release=*/false);
  ASSERT_TRUE(rig.sender);
  EXPECT_FALSE(rig.sender->has_release_probe());
  ASSERT_TRUE(rig.sender);
  const TransferId a(1), b(2);
  ASSERT_TRUE(rig.sender->begin(kPeer, a, {}, Clock::now() + 10s).ok());
  ASSERT_TRUE(rig.sender->begin(kPeer, b, {}, Clock::now() + 10s).ok());
  auto too_many = rig.sender->enqueue(kPeer, a, rig.device.data(), 4 * 1024, 0);
  ASSERT_FALSE(too_many.ok());
  EXPECT_EQ(too_many.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(too_many.status().message().find("transfer 1 needs 4 staging buffers"),
            std::string::npos)
      << too_many.status().message();
  EXPECT_NE(too_many.status().message().find("the fake transport does not release segments"),
            std::string::npos)
      << too_many.status().message();
  ASSERT_TRUE(rig.sender->enqueue(kPeer, a, rig.device.data(), 2 * 1024, 0).ok());
  ASSERT_TRUE(rig.sender->enqueue(kPeer, b, rig.device.data() + 4 * 1024, 2 * 1024, 0).ok());
  // a is open (no finish yet): b may not take the third buffer, or a and b
  // could end up waiting on each other.
  ASSERT_TRUE(rig.pump([&] { return rig.transport.segments_of(a) == 2; }));
  rig.sender->progress();
  EXPECT_EQ(rig.transport.segments_of(b), 0u);
  EXPECT_EQ(rig.sender->free_buffers(), 1u);
  ASSERT_TRUE(rig.sender->finish(kPeer, a).ok());
  // Now b takes the free buffer; its second segment waits for a's event.
  ASSERT_TRUE(rig.pump([&] { return rig.transport.segments_of(b) == 1; }));
  rig.sender->progress();
  EXPECT_EQ(rig.transport.segments_of(b), 1u);
  EXPECT_EQ(rig.sender->free_buffers(), 0u);
  rig.transport.complete(a);
  ASSERT_TRUE(rig.sender->finish(kPeer, b).ok());
  ASSERT_TRUE(rig.pump([&] { return rig.transport.finished(b); }));
  rig.transport.complete(b);
  ASSERT_TRUE(rig.pump([&] { return rig.events.size() == 2; }));
  for (const auto& e : rig.events) EXPECT_TRUE(e.event.status.ok()) << e.event.status.to_string();
  const auto img = rig.transport.image(b);
  EXPECT_TRUE(std::equal(img.begin(), img.end(), rig.device.begin() + 4 * 1024));
  EXPECT_EQ(rig.transport.violations(), 0);
  EXPECT_EQ(rig.sender->free_buffers(), 3u);
  EXPECT_EQ(rig.sender->counters().buffers_released_early, 0u);
}

// A failed device copy fails its own transfer, with a Status naming the
// segment; the other transfer is delivered.
TEST(StagedSender, CopyFailureFailsThatTransferOnly) {
  const size_t kBuf = 4096;
  // Transfer 1's data is device segments 0..3, transfer 2's 8..11; the copy
  // of transfer 1's segment 2 (device segment 2) fails.
  std::byte* bad_src = nullptr;
  SenderRig rig({3, kBuf}, true, [&](const HostCopyRecord& r) {
    return r.src == bad_src ? internal_error("injected DMA fault") : Status();
  });
  ASSERT_TRUE(rig.sender);
  bad_src = rig.device.data() + 2 * kBuf;
  rig.transport.set_auto_release(true);
  const TransferId a(1), b(2);
  ASSERT_TRUE(rig.sender->begin(kPeer, a, {}, Clock::now() + 10s).ok());
  ASSERT_TRUE(rig.sender->begin(kPeer, b, {}, Clock::now() + 10s).ok());
  ASSERT_TRUE(rig.sender->enqueue(kPeer, a, rig.device.data(), 4 * kBuf, 0).ok());
  ASSERT_TRUE(rig.sender->enqueue(kPeer, b, rig.device.data() + 8 * kBuf, 4 * kBuf, 0).ok());
  ASSERT_TRUE(rig.sender->finish(kPeer, a).ok());
  ASSERT_TRUE(rig.sender->finish(kPeer, b).ok());
  ASSERT_TRUE(rig.pump([&] { return rig.events.size() == 2; }));
  const StagedSendEvent* ea = rig.event_of(a);
  const StagedSendEvent* eb = rig.event_of(b);
  ASSERT_TRUE(ea && eb);
  EXPECT_EQ(ea->event.status.code(), StatusCode::kInternal);
  EXPECT_NE(ea->event.status.message().find("segment 2 (bytes [8192, 12288) of transfer 1)"),
            std::string::npos)
      << ea->event.status.message();
  EXPECT_NE(ea->event.status.message().find("injected DMA fault"), std::string::npos);
  EXPECT_EQ(rig.transport.cancels(), 1);
  EXPECT_TRUE(eb->event.status.ok()) << eb->event.status.to_string();
  const auto img = rig.transport.image(b);
  ASSERT_EQ(img.size(), 4 * kBuf);
  EXPECT_TRUE(std::equal(img.begin(), img.end(), rig.device.begin() + 8 * kBuf));
  // Everything returned to the ring.
  EXPECT_TRUE(rig.pump([&] { return rig.sender->live_transfers() == 0; }));
  EXPECT_EQ(rig.sender->free_buffers(), 3u);
  EXPECT_EQ(rig.sender->counters().transfers_failed_by_staging, 1u);
  // The failed transfer refuses more work with its failure.
  EXPECT_FALSE(rig.sender->enqueue(kPeer, a, rig.device.data(), 1, 0).ok());
}

// Cancel with a segment at the transport, two copies in flight and more
// queued: every buffer comes back (copies end first), and destroying the
// sender frees every pinned allocation.
TEST(StagedSender, CancelMidTransferFreesEveryBuffer) {
  auto rig = std::make_unique<SenderRig>(StagingOptions{3, 4096});
  ASSERT_TRUE(rig->sender);
  const TransferId id(5);
  rig->copier.hold_all();
  ASSERT_TRUE(rig->sender->begin(kPeer, id, {}, Clock::now() + 10s).ok());
  ASSERT_TRUE(rig->sender->enqueue(kPeer, id, rig->device.data(), 6 * 4096, 0).ok());
  rig->sender->progress();
  rig->copier.release(0);
  ASSERT_TRUE(rig->copier.wait(0, Clock::now() + 5s).ok());
  rig->sender->progress();
  ASSERT_EQ(rig->transport.segments_of(id), 1u);
  EXPECT_EQ(rig->sender->free_buffers(), 0u);

  ASSERT_TRUE(rig->sender->cancel(kPeer, id).ok());
  EXPECT_EQ(rig->transport.cancels(), 1);
  ASSERT_TRUE(rig->pump([&] { return rig->events.size() == 1; }));
  EXPECT_EQ(rig->events[0].event.status.code(), StatusCode::kCancelled);
  EXPECT_EQ(rig->sender->free_buffers(), 1u);  // the sent one; two copies still running
  EXPECT_EQ(rig->sender->live_transfers(), 1u);
  rig->copier.release_all();
  ASSERT_TRUE(rig->pump([&] { return rig->sender->free_buffers() == 3; }));
  EXPECT_EQ(rig->sender->live_transfers(), 0u);
  EXPECT_EQ(rig->transport.segments_of(id), 1u);  // nothing sent after the cancel
  EXPECT_EQ(rig->copier.copies_issued(), 3u);     // queued segments were dropped
  EXPECT_EQ(rig->copier.pinned_outstanding(), 3u);
  rig->sender.reset();
  EXPECT_EQ(rig->copier.pinned_outstanding(), 0u);
}

// A transfer the transport fails (deadline) drops its queued segments;
// copies already running end without being sent, and their buffers return.
TEST(StagedSender, TransportFailureDropsQueuedSegments) {
  SenderRig rig({2, 1024});
  ASSERT_TRUE(rig.sender);
  const TransferId id(8);
  rig.copier.hold_all();
  ASSERT_TRUE(rig.sender->begin(kPeer, id, {}, Clock::now() + 10s).ok());
  ASSERT_TRUE(rig.sender->enqueue(kPeer, id, rig.device.data(), 4 * 1024, 0).ok());
  rig.sender->progress();
  rig.transport.complete(id, Status(StatusCode::kDeadlineExceeded, "transfer deadline"));
  ASSERT_TRUE(rig.pump([&] { return rig.events.size() == 1; }));
  EXPECT_EQ(rig.events[0].event.status.code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(rig.sender->enqueue(kPeer, id, rig.device.data(), 1, 0).status().code(),
            StatusCode::kDeadlineExceeded);
  rig.copier.release_all();
  ASSERT_TRUE(rig.pump([&] { return rig.sender->live_transfers() == 0; }));
  EXPECT_EQ(rig.sender->free_buffers(), 2u);
  EXPECT_EQ(rig.transport.segments_of(id), 0u);
  EXPECT_EQ(rig.copier.copies_issued(), 2u);
}

TEST(StagedSender, CallerErrors) {
  SenderRig rig({2, 1024});
  ASSERT_TRUE(rig.sender);
  const TransferId id(1);
  EXPECT_EQ(rig.sender->enqueue(kPeer, id, rig.device.data(), 1, 0).status().code(),
            StatusCode::kInvalidArgument);  // not begun
  ASSERT_TRUE(rig.sender->begin(kPeer, id, {}, Clock::now() + 10s).ok());
  EXPECT_EQ(rig.sender->begin(kPeer, id, {}, Clock::now() + 10s).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(rig.sender->enqueue(kPeer, id, nullptr, 1, 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(rig.sender->enqueue(kPeer, id, rig.device.data(), 0, 0).status().code(),
            StatusCode::kInvalidArgument);
  ASSERT_TRUE(rig.sender->finish(kPeer, id).ok());
  EXPECT_EQ(rig.sender->enqueue(kPeer, id, rig.device.data(), 1, 0).status().code(),
            StatusCode::kInvalidArgument);
  HostCopier one(1);
  EXPECT_EQ(StagedSender::create(rig.transport, one, {2, 1024}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(StagedSender::create(rig.transport, one, {1, 0}).status().code(),
            StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------- copier

TEST(HostCopier, CompletesAsynchronouslyAndOutOfOrder) {
  HostCopier copier(2);
  std::vector<std::byte> src = random_bytes(1000, 1), a(1000), b(1000);
  copier.hold(0);
  ASSERT_TRUE(copier.copy_to_host_async(0, a.data(), src.data(), 1000).ok());
  ASSERT_TRUE(copier.copy_to_device_async(1, b.data(), src.data(), 1000).ok());
  EXPECT_EQ(copier.poll(0).code(), StatusCode::kInProgress);
  EXPECT_EQ(copier.copy_to_host_async(0, a.data(), src.data(), 1).code(),
            StatusCode::kFailedPrecondition);
  ASSERT_TRUE(copier.wait(1, Clock::now() + 5s).ok());  // slot 1 done while slot 0 waits
  EXPECT_EQ(copier.poll(0).code(), StatusCode::kInProgress);
  EXPECT_EQ(copier.wait(0, Clock::now() + 10ms).code(), StatusCode::kDeadlineExceeded);
  copier.release(0);
  ASSERT_TRUE(copier.wait(0, Clock::now() + 5s).ok());
  EXPECT_EQ(a, src);
  EXPECT_EQ(b, src);
  EXPECT_EQ(copier.poll(2).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(copier.copy_to_host_async(0, nullptr, src.data(), 1).code(),
            StatusCode::kInvalidArgument);
}

TEST(CudaCopier, UnimplementedWithoutCudaInTheBuild) {
  auto c = create_cuda_copier(2);
  // Without a GPU it is either not built (UNIMPLEMENTED) or has no device.
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(c.status().code() == StatusCode::kUnimplemented ||
              c.status().code() == StatusCode::kUnavailable)
      << c.status().to_string();
}

}  // namespace
}  // namespace kvgate::transport::staging
