// transport/staging over every real transport (loopback, ucx am/tag/put on
// tcp, ucx over shared memory), with the transport's per-segment signals
// wired as a node would: StagedSender takes each buffer back when the
// transport releases its segment, StagedReceiver copies each range to the
// device as soon as the transport's landing notice says it is in the pages.
// So one transfer of many more segments than staging buffers streams
// through a small ring, device → device. Part of staging_test (label unit).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "common/crc32c.h"
#include "tests/unit/transport/transport_test_util.h"
#include "transport/staging/host_copier.h"
#include "transport/staging/staged_receiver.h"
#include "transport/staging/staged_sender.h"

namespace kvgate::transport::staging {
namespace {

using namespace std::chrono_literals;
using transport::testing::all_transports;
using transport::testing::random_bytes;
using transport::testing::TransportParam;

class StagedStream : public ::testing::TestWithParam<TransportParam> {};

TEST_P(StagedStream, MoreSegmentsThanBuffersStreamThroughOneTransfer) {
  setenv("UCX_NET_DEVICES", "lo", 0);
  constexpr uint32_t kBuffers = 3;
  constexpr size_t kBufferBytes = 64 << 10;
  constexpr size_t kPage = 64 << 10;
  constexpr size_t kPages = 40;
  constexpr size_t kTotal = kPages * kPage - 1000;  // 40 segments, the last one short
  constexpr size_t kRegion = 2 * kPages * kPage;

  HostCopier send_copier(kBuffers), recv_copier(4);
  auto region_alloc = recv_copier.allocate_pinned(kRegion);
  ASSERT_TRUE(region_alloc.ok());
  std::byte* region = *region_alloc;
  std::memset(region, 0, kRegion);

  // The receiver is created after its transport: the notices reach it
  // through this pointer.
  StagedReceiver* rx = nullptr;
  TransportOptions ro;
  ro.cluster_token = "t";
  ro.region = region;
  ro.region_bytes = kRegion;
  ro.on_segment_landed = [&rx](const SegmentLanded& n) {
    if (rx) rx->on_segment_landed(n);
  };
  auto recv = create_transport(GetParam().config, ro);
  ASSERT_TRUE(recv.ok()) << recv.status().to_string();
  TransportOptions so;
  so.cluster_token = "t";
  auto send = create_transport(GetParam().config, so);
  ASSERT_TRUE(send.ok()) << send.status().to_string();
  auto peer = (*send)->connect(*(*recv)->address());
  ASSERT_TRUE(peer.ok()) << peer.status().to_string();

  auto sender = StagedSender::create(**send, send_copier, {kBuffers, kBufferBytes});
  ASSERT_TRUE(sender.ok()) << sender.status().to_string();
  EXPECT_TRUE((*sender)->has_release_probe());  // the transport's own
  // Copy chunks straddle segment boundaries: a chunk goes once both of
  // its segments landed.
  auto receiver = StagedReceiver::create(**recv, region, kRegion, recv_copier, {48 << 10});
  ASSERT_TRUE(receiver.ok()) << receiver.status().to_string();
  rx = receiver->get();

  // Host pages scattered in the region (every other page, backwards); the
  // device destination in two pieces.
  std::vector<DestRange> host;
  for (size_t i = 0; i < kPages; ++i) host.push_back({(2 * (kPages - 1 - i) + 1) * kPage, kPage});
  host.back().length_bytes -= 1000;
  const auto device_src = random_bytes(kTotal, 77);
  std::vector<std::byte> device_dst(kTotal + 4096);
  const std::vector<DevicePiece> dev = {{device_dst.data(), 1000000},
                                        {device_dst.data() + 1000000 + 4096, kTotal - 1000000}};
  const TransferId id(7);
  auto grant = (*recv)->post_receive({id, host, Clock::now() + 30s});
  ASSERT_TRUE(grant.ok()) << grant.status().to_string();
  ASSERT_TRUE((*receiver)->expect({id, host, dev}).ok());
  ASSERT_TRUE((*sender)->begin(*peer, id, *grant, Clock::now() + 30s).ok());
  // One enqueue: split into 40 transport segments over a ring of 3.
  auto pieces = (*sender)->enqueue(*peer, id, device_src.data(), kTotal, 0);
  ASSERT_TRUE(pieces.ok()) << pieces.status().to_string();
  EXPECT_EQ(pieces->count, kPages);
  ASSERT_TRUE((*sender)->finish(*peer, id).ok());

  std::vector<StagedSendEvent> sent;
  std::vector<DeviceCopyEvent> copied;
  const auto end = Clock::now() + 30s;
  while ((sent.empty() || copied.empty()) && Clock::now() < end) {
    (*sender)->progress();
    std::vector<TransferEvent> evs;
    (*send)->progress(evs);
    (*recv)->progress(evs);
    for (const auto& e : evs) {
      if (e.side == TransferSide::kSend) {
        sent.push_back((*sender)->on_transfer_event(e));
      } else {
        (*receiver)->on_transfer_event(e);
      }
    }
    (*receiver)->progress(copied);
  }
  ASSERT_EQ(sent.size(), 1u);
  ASSERT_EQ(copied.size(), 1u);
  EXPECT_TRUE(sent[0].event.status.ok()) << sent[0].event.status.to_string();
  EXPECT_TRUE(copied[0].status.ok()) << copied[0].status.to_string();
  EXPECT_EQ(copied[0].bytes, kTotal);
  // Device bytes identical, the gap between the pieces untouched.
  EXPECT_EQ(std::memcmp(device_dst.data(), device_src.data(), 1000000), 0);
  EXPECT_EQ(std::memcmp(device_dst.data() + 1000000 + 4096, device_src.data() + 1000000,
                        kTotal - 1000000), 0);
  EXPECT_EQ(device_dst[1000000], std::byte{0});
  // 40 segments through 3 buffers: at least 37 came back before the
  // transfer's event, each CRC'd on the staged bytes.
  ASSERT_EQ(sent[0].segments.size(), kPages);
  for (const auto& s : sent[0].segments)
    EXPECT_EQ(s.crc32c, crc32c(device_src.data() + s.remote_offset, s.bytes)) << s.index;
  EXPECT_GE((*sender)->counters().buffers_released_early, kPages - kBuffers);
  EXPECT_EQ((*sender)->free_buffers(), kBuffers);
  // Every segment announced once, and device copies started before the
  // transport verified the transfer.
  EXPECT_EQ((*receiver)->counters().landing_notices, kPages);
  EXPECT_GT((*receiver)->counters().copies_before_verified, 0u);
  EXPECT_EQ((*receiver)->counters().bytes_copied, kTotal);

  sender->reset();
  rx = nullptr;
  receiver->reset();
  std::vector<TransferEvent> sink;
  transport::testing::destroy_while_progressing(*send, recv->get(), &sink);
  recv->reset();
  recv_copier.free_pinned(region);
}

INSTANTIATE_TEST_SUITE_P(AllTransports, StagedStream, ::testing::ValuesIn(all_transports()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace kvgate::transport::staging
