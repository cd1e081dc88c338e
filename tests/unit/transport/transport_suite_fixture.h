// The fixture of the transport suite (one suite over every transport): a
// receiver with an 8 MiB region and a connected sender of the transport
// under test, plus helpers to read the region back. Shared by the suite's
// files (transport_suite_test.cpp, transport_segment_signals_test.cpp),
// which form one test binary and one parameterized suite.
//
// The receiver is created with TransportOptions::on_segment_landed set: it
// records every landing notice in landed_, with the number of receive
// events the test had seen when it came, and runs on_landed_check_ (a
// test's own check of the pages at that moment), so every scenario of the
// suite runs with landing notices on.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tests/unit/transport/transport_test_util.h"
#include "transport/wire.h"

namespace kvgate::transport::testing {

inline constexpr size_t kRegionBytes = size_t{8} << 20;
inline constexpr size_t kPageBytes = 64 << 10;

// A landing notice and how many receive events had been seen when it came.
struct LandedNotice {
  SegmentLanded notice;
  size_t receive_events_before = 0;
};

class TransportSuite : public ::testing::TestWithParam<TransportParam> {
 protected:
  void SetUp() override {
    setenv("UCX_NET_DEVICES", "lo", 0);
    region_.assign(kRegionBytes, std::byte{0});
    TransportOptions ro;
    ro.cluster_token = "secret";
    ro.region = region_.data();
    ro.region_bytes = region_.size();
    // Runs inside receiver_->progress(received_), before that call appends
    // its events: received_ holds exactly the events reported before it.
    ro.on_segment_landed = [this](const SegmentLanded& n) {
      landed_.push_back({n, received_.size()});
      if (on_landed_check_) on_landed_check_(n);
    };
    auto r = create_transport(GetParam().config, ro);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    receiver_ = std::move(*r);
    sender_ = make_sender("secret");
    ASSERT_TRUE(sender_);
    auto addr = receiver_->address();
    ASSERT_TRUE(addr.ok());
    auto peer = sender_->connect(*addr);
    ASSERT_TRUE(peer.ok()) << peer.status().to_string();
    peer_ = *peer;
  }

  void TearDown() override {
    if (sender_ && receiver_) destroy_while_progressing(sender_, receiver_.get(), &received_);
  }

  std::unique_ptr<Transport> make_sender(const std::string& token) {
    TransportOptions so;
    so.cluster_token = token;
    auto s = create_transport(GetParam().config, so);
    EXPECT_TRUE(s.ok()) << s.status().to_string();
    return s.ok() ? std::move(*s) : nullptr;
  }

  bool is_put() const { return GetParam().name.find("put") != std::string::npos; }
  bool is_loopback() const { return GetParam().config.kind == TransportKind::kLoopback; }

  // `n` pages of the region, scattered (reverse order, every other page).
  std::vector<DestRange> pages(size_t first, size_t n) {
    std::vector<DestRange> r;
    for (size_t i = 0; i < n; ++i) r.push_back({(first + 2 * (n - 1 - i)) * kPageBytes, kPageBytes});
    return r;
  }

  bool pump_until(const std::function<bool()>& done) {
    return pump({sender_.get(), receiver_.get()}, {&sent_, &received_}, done);
  }
  bool both_done(size_t n = 1) { return sent_.size() >= n && received_.size() >= n; }

  Bytes post(TransferId id, const std::vector<DestRange>& ranges, std::chrono::milliseconds deadline = 20000ms) {
    auto g = receiver_->post_receive({id, ranges, Clock::now() + deadline});
    EXPECT_TRUE(g.ok()) << g.status().to_string();
    return g.ok() ? *g : Bytes{};
  }

  // The landing notices of transfer `id`, in delivery order.
  std::vector<LandedNotice> landed_of(TransferId id) const {
    std::vector<LandedNotice> out;
    for (const auto& n : landed_)
      if (n.notice.id == id) out.push_back(n);
    return out;
  }

  std::vector<std::byte> region_;
  std::unique_ptr<Transport> receiver_, sender_;
  PeerId peer_;
  std::vector<TransferEvent> sent_, received_;
  std::vector<LandedNotice> landed_;
  std::function<void(const SegmentLanded&)> on_landed_check_;
};

// Reads logical [offset, +n) of `ranges` out of the region.
inline std::vector<std::byte> gather(const std::vector<std::byte>& region,
                                     const std::vector<DestRange>& ranges, uint64_t offset, uint64_t n) {
  wire::RangeMap map(ranges);
  std::vector<wire::Piece> pieces;
  EXPECT_TRUE(map.map(offset, n, pieces).ok());
  std::vector<std::byte> out(n);
  for (const auto& p : pieces)
    std::memcpy(out.data() + p.source_offset, region.data() + p.region_offset, p.length_bytes);
  return out;
}

// True once logical [0, n) of `ranges` in the region holds src's first n
// bytes: those segments landed (every backend writes the pages inside
// progress(), on this thread, so reading between calls is safe).
inline bool prefix_landed(const std::vector<std::byte>& region, const std::vector<DestRange>& ranges,
                          const std::vector<std::byte>& src, uint64_t n) {
  return gather(region, ranges, 0, n) == std::vector<std::byte>(src.begin(), src.begin() + n);
}

inline std::vector<DestRange> concat(std::vector<DestRange> a, const std::vector<DestRange>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace kvgate::transport::testing
