// transport/staging: StagedReceiver over the test doubles
// (staging_doubles.h) — copies after verification or per landed range,
// overlap with later arrivals, failures, cancel, extension — and the
// start-up choice of the device transfer path. Part of staging_test (label
// unit).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/log.h"
#include "tests/unit/transport/staging_doubles.h"
#include "transport/staging/device_path.h"

namespace kvgate::transport::staging {
namespace {

using namespace doubles;

TEST(StagedReceiver, LandedBytesReachTheDevicePagesAfterVerification) {
  ReceiverRig rig(2, 1000);
  ASSERT_TRUE(rig.receiver);
  // Scattered host pages (reverse order) and device pieces cut elsewhere.
  const std::vector<DestRange> host = {{40960, 4096}, {8192, 4096}, {0, 1}, {20000, 3000}};
  const std::vector<DevicePiece> dev = {{rig.device.data() + 100, 5000},
                                        {rig.device.data() + 30000, 6193}};
  const TransferId id(9);
  ASSERT_TRUE(rig.receiver->expect({id, host, dev}).ok());
  for (int i = 0; i < 20; ++i) rig.receiver->progress(rig.events);
  EXPECT_EQ(rig.copier.copies_issued(), 0u);  // nothing before the transport says OK
  rig.receiver->on_transfer_event(recv_event(id));
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(id) != nullptr; }));
  EXPECT_TRUE(rig.event_of(id)->status.ok());
  EXPECT_EQ(rig.event_of(id)->bytes, 11193u);
  const auto want = rig.gather(host);
  std::vector<std::byte> got(rig.device.begin() + 100, rig.device.begin() + 5100);
  got.insert(got.end(), rig.device.begin() + 30000, rig.device.begin() + 36193);
  EXPECT_EQ(got, want);
  EXPECT_EQ(rig.device[99], std::byte{0});
  EXPECT_EQ(rig.device[5100], std::byte{0});
  EXPECT_EQ(rig.receiver->live_transfers(), 0u);
  EXPECT_GE(rig.receiver->counters().copies_issued, 12u);  // chunks of <= 1000 bytes
}

// Transfer 1's device copies run while transfer 2's segments arrive (and
// transfer 2's landed chunks start copying before its verdict); neither is
// reported before both its verdict and its last copy.
TEST(StagedReceiver, DeviceCopiesOverlapLaterArrivals) {
  ReceiverRig rig(4, 4096);
  ASSERT_TRUE(rig.receiver);
  const TransferId a(1), b(2);
  const std::vector<DestRange> ha = {{0, 8192}}, hb = {{16384, 8192}};
  ASSERT_TRUE(rig.receiver->expect({a, ha, {{rig.device.data(), 8192}}}).ok());
  ASSERT_TRUE(rig.receiver->expect({b, hb, {{rig.device.data() + 16384, 8192}}}).ok());
  rig.copier.hold_all();
  rig.receiver->on_transfer_event(recv_event(a));
  rig.receiver->progress(rig.events);  // a's two chunks issued, held
  EXPECT_EQ(rig.copier.copies_issued(), 2u);
  // b's first segment lands while a's copies are still running.
  ASSERT_TRUE(rig.receiver->on_landed(b, 0, 4096).ok());
  rig.receiver->progress(rig.events);
  EXPECT_EQ(rig.copier.copies_issued(), 3u);
  EXPECT_EQ(rig.receiver->counters().copies_before_verified, 1u);
  rig.copier.release(2);  // b's landed chunk finishes first
  ASSERT_TRUE(rig.copier.wait(2, Clock::now() + 5s).ok());
  rig.receiver->progress(rig.events);
  EXPECT_TRUE(rig.events.empty());  // a's copies in flight, b not verified
  rig.copier.release_all();
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(a) != nullptr; }));
  EXPECT_EQ(rig.event_of(b), nullptr);
  rig.receiver->on_transfer_event(recv_event(b));
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(b) != nullptr; }));
  EXPECT_TRUE(rig.event_of(a)->status.ok());
  EXPECT_TRUE(rig.event_of(b)->status.ok());
  const std::vector<std::string> expected = {"copy @16384", "copy @0", "copy @4096",
                                             "copy @20480"};
  // b's first chunk (@16384) copied before a's (held), during a's copies.
  EXPECT_EQ(rig.log.events(), expected);
  EXPECT_TRUE(std::equal(rig.device.begin(), rig.device.begin() + 8192, rig.region.begin()));
  EXPECT_TRUE(std::equal(rig.device.begin() + 16384, rig.device.begin() + 24576,
                         rig.region.begin() + 16384));
}

TEST(StagedReceiver, CopyFailureFailsThatTransferOnly) {
  std::byte* bad = nullptr;
  ReceiverRig rig(2, 4096, [&](const HostCopyRecord& r) {
    return r.src == bad ? internal_error("injected DMA fault") : Status();
  });
  ASSERT_TRUE(rig.receiver);
  bad = rig.region.data() + 4096;  // a's second chunk
  const TransferId a(1), b(2);
  ASSERT_TRUE(rig.receiver->expect({a, {{0, 8192}}, {{rig.device.data(), 8192}}}).ok());
  ASSERT_TRUE(
      rig.receiver->expect({b, {{16384, 8192}}, {{rig.device.data() + 16384, 8192}}}).ok());
  ASSERT_TRUE(rig.receiver->on_landed(a, 0, 8192).ok());  // before a's verdict
  rig.receiver->on_transfer_event(recv_event(b));
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(b) != nullptr; }));
  EXPECT_TRUE(rig.event_of(b)->status.ok());
  // a failed before its transport event: the receive is cancelled there,
  // and a is reported once that event came.
  ASSERT_EQ(rig.transport.cancelled.size(), 1u);
  EXPECT_EQ(rig.transport.cancelled[0], a);
  EXPECT_EQ(rig.event_of(a), nullptr);
  rig.receiver->on_transfer_event(recv_event(a, Status(StatusCode::kCancelled, "cancelled")));
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(a) != nullptr; }));
  EXPECT_EQ(rig.event_of(a)->status.code(), StatusCode::kInternal);
  EXPECT_NE(rig.event_of(a)->status.message().find("bytes [4096, 8192) of transfer 1"),
            std::string::npos)
      << rig.event_of(a)->status.message();
  EXPECT_EQ(rig.receiver->live_transfers(), 0u);
}

TEST(StagedReceiver, FailedReceiveIsReportedAfterCopiesDrain) {
  ReceiverRig rig(2, 4096);
  ASSERT_TRUE(rig.receiver);
  const TransferId a(1);
  ASSERT_TRUE(rig.receiver->expect({a, {{0, 8192}}, {{rig.device.data(), 8192}}}).ok());
  rig.copier.hold_all();
  ASSERT_TRUE(rig.receiver->on_landed(a, 0, 4096).ok());
  rig.receiver->progress(rig.events);
  rig.receiver->on_transfer_event(recv_event(a, data_loss("segment 1: CRC32C mismatch")));
  for (int i = 0; i < 20; ++i) rig.receiver->progress(rig.events);
  EXPECT_TRUE(rig.events.empty());  // a copy still reads the region
  rig.copier.release_all();
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(a) != nullptr; }));
  EXPECT_EQ(rig.event_of(a)->status.code(), StatusCode::kDataLoss);
  EXPECT_EQ(rig.copier.copies_issued(), 1u);  // the unlanded chunk never copied
  EXPECT_TRUE(rig.transport.cancelled.empty());  // the transport had already ended it
}

TEST(StagedReceiver, CancelAndCallerErrors) {
  ReceiverRig rig(2, 4096);
  ASSERT_TRUE(rig.receiver);
  std::byte* d = rig.device.data();
  EXPECT_EQ(rig.receiver->expect({TransferId(1), {{0, 100}}, {{d, 99}}}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(rig.receiver->expect({TransferId(1), {{65536 - 10, 100}}, {{d, 100}}}).code(),
            StatusCode::kOutOfRange);
  EXPECT_EQ(rig.receiver->expect({TransferId(1), {}, {}}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(rig.receiver->expect({TransferId(1), {{0, 100}}, {{nullptr, 100}}}).code(),
            StatusCode::kInvalidArgument);
  ASSERT_TRUE(rig.receiver->expect({TransferId(1), {{0, 100}}, {{d, 100}}}).ok());
  EXPECT_EQ(rig.receiver->expect({TransferId(1), {{0, 100}}, {{d, 100}}}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(rig.receiver->on_landed(TransferId(1), 50, 51).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(rig.receiver->on_landed(TransferId(2), 0, 1).code(), StatusCode::kNotFound);
  // extend: appended after the first 100 bytes; an error changes nothing.
  const DestRange more[] = {{200, 50}};
  const DevicePiece wrong[] = {{d + 200, 49}};
  const DevicePiece right[] = {{d + 200, 50}};
  EXPECT_EQ(rig.receiver->extend(TransferId(1), more, wrong).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(rig.receiver->extend(TransferId(1), more, right).ok());
  ASSERT_TRUE(rig.receiver->cancel(TransferId(1)).ok());
  ASSERT_EQ(rig.transport.cancelled.size(), 1u);
  rig.receiver->on_transfer_event(recv_event(TransferId(1), Status(StatusCode::kCancelled, "x")));
  ASSERT_TRUE(rig.pump([&] { return !rig.events.empty(); }));
  EXPECT_EQ(rig.events[0].status.code(), StatusCode::kCancelled);
  EXPECT_EQ(rig.copier.copies_issued(), 0u);
}

TEST(StagedReceiver, ExtendedTransferCopiesAllRanges) {
  ReceiverRig rig(2, 512);
  ASSERT_TRUE(rig.receiver);
  std::byte* d = rig.device.data();
  const TransferId id(4);
  ASSERT_TRUE(rig.receiver->expect({id, {{1000, 700}}, {{d, 700}}}).ok());
  const DestRange more[] = {{5000, 900}};
  const DevicePiece dev[] = {{d + 700, 900}};
  ASSERT_TRUE(rig.receiver->extend(id, more, dev).ok());
  rig.receiver->on_transfer_event(recv_event(id));
  ASSERT_TRUE(rig.pump([&] { return !rig.events.empty(); }));
  EXPECT_TRUE(rig.events[0].status.ok());
  EXPECT_EQ(rig.events[0].bytes, 1600u);
  EXPECT_TRUE(std::equal(d, d + 700, rig.region.begin() + 1000));
  EXPECT_TRUE(std::equal(d + 700, d + 1600, rig.region.begin() + 5000));
}

// The transport's landing notices, in any order: a copy chunk spanning two
// segments goes once both landed (ranges are merged), never before.
TEST(StagedReceiver, LandingNoticesCopyEachChunkOnceAllOfItLanded) {
  ReceiverRig rig(4, 4096);
  ASSERT_TRUE(rig.receiver);
  const TransferId id(6);
  // Chunks [0, 4096), [4096, 8192), [8192, 12288); segments of 3000 bytes.
  ASSERT_TRUE(rig.receiver->expect({id, {{8192, 12288}}, {{rig.device.data(), 12288}}}).ok());
  const auto copies_after = [&](SegmentLanded n) {
    rig.receiver->on_segment_landed(n);
    rig.receiver->progress(rig.events);
    return rig.copier.copies_issued();
  };
  EXPECT_EQ(copies_after({id, 1, 3000, 3000}), 0u);  // [3000, 6000): no whole chunk
  EXPECT_EQ(copies_after({id, 0, 0, 3000}), 1u);     // [0, 6000): chunk 0
  EXPECT_EQ(copies_after({id, 3, 9000, 3288}), 1u);  // [9000, 12288): chunk 2 starts at 8192
  EXPECT_EQ(copies_after({TransferId(99), 0, 0, 12288}), 1u);  // not staged here: ignored
  EXPECT_EQ(copies_after({id, 2, 6000, 3000}), 3u);  // [0, 12288): chunks 1 and 2
  EXPECT_EQ(rig.receiver->counters().landing_notices, 4u);
  EXPECT_EQ(rig.receiver->counters().copies_before_verified, 3u);
  ASSERT_TRUE(rig.pump([&] { return rig.copier.poll(0).ok() && rig.copier.poll(1).ok() &&
                                    rig.copier.poll(2).ok(); }));
  EXPECT_TRUE(rig.events.empty());  // copied, but not verified
  rig.receiver->on_transfer_event(recv_event(id));
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(id) != nullptr; }));
  EXPECT_TRUE(rig.event_of(id)->status.ok());
  EXPECT_EQ(rig.copier.copies_issued(), 3u);  // nothing copied twice
  EXPECT_TRUE(std::equal(rig.device.begin(), rig.device.begin() + 12288, rig.region.begin() + 8192));
}

// A notice past the bytes the receiver expects (an extend_receive without
// extend()) fails the transfer: those bytes would never reach the device.
TEST(StagedReceiver, LandingNoticePastTheExpectedBytesFailsTheTransfer) {
  ReceiverRig rig(2, 4096);
  ASSERT_TRUE(rig.receiver);
  const TransferId id(7);
  ASSERT_TRUE(rig.receiver->expect({id, {{0, 100}}, {{rig.device.data(), 100}}}).ok());
  rig.receiver->on_segment_landed({id, 1, 50, 100});
  ASSERT_EQ(rig.transport.cancelled.size(), 1u);
  EXPECT_EQ(rig.transport.cancelled[0], id);
  rig.receiver->on_segment_landed({id, 0, 0, 50});  // failing: ignored
  rig.receiver->on_transfer_event(recv_event(id, Status(StatusCode::kCancelled, "cancelled")));
  ASSERT_TRUE(rig.pump([&] { return rig.event_of(id) != nullptr; }));
  EXPECT_EQ(rig.event_of(id)->status.code(), StatusCode::kOutOfRange);
  EXPECT_NE(rig.event_of(id)->status.message().find("segment 1 landed outside"), std::string::npos)
      << rig.event_of(id)->status.message();
  EXPECT_EQ(rig.copier.copies_issued(), 0u);
}

// ---------------------------------------------------------------- path choice

TEST(DeviceTransferPath, CudaMemoryTypeChoosesUcx) {
  UcxMemoryTypes t{"1.16.0", (1u << kUcsMemoryTypeHost) | (1u << kUcsMemoryTypeCuda) |
                                 (1u << kUcsMemoryTypeCudaManaged)};
  auto c = choose_device_transfer_path(TransportKind::kUcx, t);
  EXPECT_EQ(c.path, DeviceTransferPath::kUcxCudaMemory);
  EXPECT_EQ(c.reason,
            "UCX 1.16.0 supports CUDA memory (memory types {host, cuda, cuda-managed}): KV moves "
            "from and to device pages directly");
}

TEST(DeviceTransferPath, HostOnlyUcxIsStaged) {
  UcxMemoryTypes t{"1.13.1", 1u << kUcsMemoryTypeHost};
  auto c = choose_device_transfer_path(TransportKind::kUcx, t);
  EXPECT_EQ(c.path, DeviceTransferPath::kStagedPinnedHost);
  EXPECT_NE(c.reason.find("UCX 1.13.1 supports memory types {host}, not CUDA"), std::string::npos)
      << c.reason;
  // ROCm only is no help either.
  UcxMemoryTypes rocm{"1.15.0", (1u << kUcsMemoryTypeHost) | (1u << kUcsMemoryTypeRocm)};
  EXPECT_EQ(choose_device_transfer_path(TransportKind::kUcx, rocm).path,
            DeviceTransferPath::kStagedPinnedHost);
}

TEST(DeviceTransferPath, OtherKindsAndQueryErrorsAreStaged) {
  TransportConfig loop;
  loop.kind = TransportKind::kLoopback;
  auto c = choose_device_transfer_path(loop);
  EXPECT_EQ(c.path, DeviceTransferPath::kStagedPinnedHost);
  EXPECT_NE(c.reason.find("'loopback' is not ucx"), std::string::npos) << c.reason;
  auto e = choose_device_transfer_path(TransportKind::kUcx,
                                       Result<UcxMemoryTypes>(unavailable("ucp_init failed")));
  EXPECT_EQ(e.path, DeviceTransferPath::kStagedPinnedHost);
  EXPECT_NE(e.reason.find("UNAVAILABLE: ucp_init failed"), std::string::npos) << e.reason;
}

// Debian's UCX 1.13 has no CUDA support: the real query must say staged,
// and why.
TEST(DeviceTransferPath, ThisMachinesUcxIsStagedAndSaysWhy) {
#if KVGATE_HAVE_UCX
  setenv("UCX_NET_DEVICES", "lo", 0);
  TransportConfig config;
  config.kind = TransportKind::kUcx;
  config.ucx_tls = {"tcp"};
  config.ucx_net_devices = {"lo"};
  auto types = query_ucx_memory_types(config);
  ASSERT_TRUE(types.ok()) << types.status().to_string();
  EXPECT_NE(types->memory_types & (1u << kUcsMemoryTypeHost), 0u);
  if (types->memory_types & (1u << kUcsMemoryTypeCuda))
    GTEST_SKIP() << "this UCX (" << types->ucx_version << ") supports CUDA memory";
  auto c = choose_device_transfer_path(config);
  EXPECT_EQ(c.path, DeviceTransferPath::kStagedPinnedHost);
  EXPECT_NE(c.reason.find("UCX " + types->ucx_version + " supports memory types {host"),
            std::string::npos)
      << c.reason;
  EXPECT_NE(c.reason.find("not CUDA"), std::string::npos) << c.reason;
#else
  TransportConfig config;
  auto c = choose_device_transfer_path(config);
  EXPECT_EQ(c.path, DeviceTransferPath::kStagedPinnedHost);
  EXPECT_NE(c.reason.find("without UCX"), std::string::npos) << c.reason;
#endif
}

TEST(DeviceTransferPath, LoggedAsOneLine) {
  std::vector<std::string> lines;
  log::set_sink([&](std::string_view l) { lines.emplace_back(l); });
  log_device_transfer_path({DeviceTransferPath::kStagedPinnedHost, "UCX 1.13.1 supports x"});
  log::set_sink(nullptr);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("device KV transfer path=staged-pinned-host"), std::string::npos)
      << lines[0];
  EXPECT_NE(lines[0].find("reason=\"UCX 1.13.1 supports x\""), std::string::npos) << lines[0];
}

}  // namespace
}  // namespace kvgate::transport::staging
