// transport/staging over the real UCX transport on lo (staging_ucx_test,
// label integration): device memory (HostCopier) → staging ring → UCX (tcp)
// → the receiver's pinned region → device pages.
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <vector>

#include "common/crc32c.h"
#include "tests/unit/transport/transport_test_util.h"
#include "transport/staging/host_copier.h"
#include "transport/staging/staged_receiver.h"
#include "transport/staging/staged_sender.h"

namespace kvgate::transport::staging {
namespace {

using namespace std::chrono_literals;
using transport::testing::random_bytes;

// The whole staged path over the real UCX transport on lo: device memory
// (HostCopier) → staging ring → UCX (tcp) → the receiver's pinned region →
// device pages. The sender takes its buffers back per segment (the
// transport's segment_released); the receiver copies at each transfer's OK
// (landing notices are exercised over every transport in
// staging_stream_test.cpp).
TEST(StagedUcx, DeviceToDeviceOverUcxTcp) {
  setenv("UCX_NET_DEVICES", "lo", 0);
  TransportConfig config;
  config.kind = TransportKind::kUcx;
  config.ucx_op = UcxOp::kAm;
  config.ucx_tls = {"tcp"};
  config.ucx_net_devices = {"lo"};

  constexpr size_t kRegion = size_t{4} << 20;
  HostCopier recv_copier(4), send_copier(4);
  auto region_alloc = recv_copier.allocate_pinned(kRegion);
  ASSERT_TRUE(region_alloc.ok());
  std::byte* region = *region_alloc;
  std::memset(region, 0, kRegion);

  TransportOptions ro;
  ro.cluster_token = "t";
  ro.region = region;
  ro.region_bytes = kRegion;
  auto recv = create_transport(config, ro);
  ASSERT_TRUE(recv.ok()) << recv.status().to_string();
  TransportOptions so;
  so.cluster_token = "t";
  auto send = create_transport(config, so);
  ASSERT_TRUE(send.ok()) << send.status().to_string();
  auto addr = (*recv)->address();
  ASSERT_TRUE(addr.ok());
  auto peer = (*send)->connect(*addr);
  ASSERT_TRUE(peer.ok());

  auto sender = StagedSender::create(**send, send_copier, {4, 256 * 1024});
  ASSERT_TRUE(sender.ok());
  auto receiver = StagedReceiver::create(**recv, region, kRegion, recv_copier, {128 * 1024});
  ASSERT_TRUE(receiver.ok());

  // Three transfers: one byte; page-sized pieces; one split over the whole
  // ring (4 x 256 KiB, the last piece short).
  const std::vector<std::vector<size_t>> shapes = {{1}, {4096, 4096, 4096}, {1000000}};
  const auto src = random_bytes(size_t{2} << 20, 9);
  std::vector<std::byte> device_dst(size_t{2} << 20);
  std::vector<std::byte> grants[3];
  uint64_t src_at = 0, region_at = 0;
  std::vector<uint64_t> src_base, totals;
  for (uint32_t t = 0; t < shapes.size(); ++t) {
    const uint64_t total = std::accumulate(shapes[t].begin(), shapes[t].end(), uint64_t{0});
    // Host pages scattered: the transfer's bytes in two ranges, second first.
    const uint64_t half = (total + 1) / 2;
    std::vector<DestRange> host = {{region_at + total, total - half}, {region_at, half}};
    if (total - half == 0) host = {{region_at, half}};
    const TransferId id(t + 1);
    auto g = (*recv)->post_receive({id, host, Clock::now() + 20s});
    ASSERT_TRUE(g.ok()) << g.status().to_string();
    grants[t] = *g;
    ASSERT_TRUE((*receiver)->expect({id, host, {{device_dst.data() + src_at, total}}}).ok());
    ASSERT_TRUE((*sender)->begin(*peer, id, grants[t], Clock::now() + 20s).ok());
    uint64_t off = 0;
    for (size_t n : shapes[t]) {
      auto r = (*sender)->enqueue(*peer, id, src.data() + src_at + off, n, off);
      ASSERT_TRUE(r.ok()) << r.status().to_string();
      off += n;
    }
    ASSERT_TRUE((*sender)->finish(*peer, id).ok());
    src_base.push_back(src_at);
    totals.push_back(total);
    src_at += total;
    region_at += 2 * total + 4096;
  }

  std::vector<StagedSendEvent> sent;
  std::vector<DeviceCopyEvent> copied;
  const auto end = Clock::now() + 30s;
  while ((sent.size() < 3 || copied.size() < 3) && Clock::now() < end) {
    (*sender)->progress();
    std::vector<TransferEvent> evs;
    (*send)->progress(evs);
    (*recv)->progress(evs);
    for (const auto& e : evs) {
      if (e.side == TransferSide::kSend) sent.push_back((*sender)->on_transfer_event(e));
      else (*receiver)->on_transfer_event(e);
    }
    (*receiver)->progress(copied);
  }
  ASSERT_EQ(sent.size(), 3u);
  ASSERT_EQ(copied.size(), 3u);
  for (const auto& e : sent) EXPECT_TRUE(e.event.status.ok()) << e.event.status.to_string();
  for (const auto& e : copied) EXPECT_TRUE(e.status.ok()) << e.status.to_string();
  for (size_t t = 0; t < 3; ++t) {
    EXPECT_TRUE(std::equal(device_dst.begin() + src_base[t],
                           device_dst.begin() + src_base[t] + totals[t],
                           src.begin() + src_base[t]))
        << "transfer " << t + 1;
  }
  // The split transfer became four transport segments, each CRC'd on the
  // staged bytes.
  const StagedSendEvent* big = nullptr;
  for (const auto& e : sent)
    if (e.event.id == TransferId(3)) big = &e;
  ASSERT_TRUE(big);
  ASSERT_EQ(big->segments.size(), 4u);
  for (const auto& s : big->segments)
    EXPECT_EQ(s.crc32c, crc32c(src.data() + src_base[2] + s.remote_offset, s.bytes));
  EXPECT_EQ((*sender)->free_buffers(), 4u);
  sender->reset();
  receiver->reset();
  std::vector<TransferEvent> sink;
  transport::testing::destroy_while_progressing(*send, recv->get(), &sink);
  recv->reset();
  recv_copier.free_pinned(region);
}

}  // namespace
}  // namespace kvgate::transport::staging
