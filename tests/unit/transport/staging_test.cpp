// transport/staging: the staged device ⇄ pinned host path.
//
// Built up to three times from this file: staging_test (label unit: test
// doubles, no network); with KVGATE_STAGING_INTEGRATION, staging_ucx_test
// (label integration: the real UCX transport on lo); with
// KVGATE_STAGING_GPU in the CUDA leg, staging_cuda_test (label gpu: the
// CUDA copier on a device; skipped without one).
//
// The test doubles: HostCopier (plain memory stands in for device memory;
// copies on its worker thread; hold/release decide completion order) and
// FakeSendTransport, which checks what the staged sender hands it — the
// CRC against the bytes, that no copy ever writes into a buffer whose send
// the fake has not released, and that a buffer's bytes are unchanged when
// the fake releases it — and records the order of events with the copier.
// No sleeps: every wait is a condition with a deadline.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "common/log.h"
#include "tests/unit/transport/transport_test_util.h"
#include "transport/staging/cuda_copier.h"
#include "transport/staging/device_path.h"
#include "transport/staging/host_copier.h"
#include "transport/staging/staged_receiver.h"
#include "transport/staging/staged_sender.h"

#ifdef KVGATE_STAGING_GPU
#include <cuda_runtime.h>
#endif

namespace kvgate::transport::staging {
namespace {

using namespace std::chrono_literals;
using transport::testing::random_bytes;

// Events in order, from the owner thread and the copier's worker thread.
class EventLog {
 public:
  void add(std::string e) {
    std::lock_guard lock(mu_);
    events_.push_back(std::move(e));
  }
  std::vector<std::string> events() const {
    std::lock_guard lock(mu_);
    return events_;
  }
  // Index of `e`, or -1.
  long index(const std::string& e) const {
    std::lock_guard lock(mu_);
    auto it = std::find(events_.begin(), events_.end(), e);
    return it == events_.end() ? -1 : static_cast<long>(it - events_.begin());
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> events_;
};

#ifndef KVGATE_STAGING_INTEGRATION

// A Transport that only sends, into an in-memory image per transfer.
class FakeSendTransport final : public Transport {
 public:
  explicit FakeSendTransport(EventLog* log = nullptr) : log_(log) {}

  std::string_view name() const override { return "fake"; }
  Result<Bytes> address() override { return Bytes{}; }
  Result<PeerId> connect(std::span<const std::byte>) override { return PeerId(1); }
  Result<Bytes> post_receive(const ReceiveSpec&) override { return unimplemented("fake"); }
  Status cancel_receive(TransferId) override { return unimplemented("fake"); }
  Result<Bytes> extend_receive(TransferId, std::span<const DestRange>) override {
    return unimplemented("fake");
  }
  Status begin_send(PeerId, TransferId id, std::span<const std::byte>,
                    Clock::time_point) override {
    std::lock_guard lock(mu_);
    if (sends_.count(id.value())) return invalid_argument("duplicate");
    sends_[id.value()];
    return Status();
  }
  Status extend_send(PeerId, TransferId, std::span<const std::byte>) override { return Status(); }
  Status send_segment(PeerId, TransferId id, uint32_t index, const std::byte* data, size_t bytes,
                      uint64_t remote_offset, std::optional<uint32_t> crc) override {
    std::lock_guard lock(mu_);
    auto it = sends_.find(id.value());
    if (it == sends_.end() || it->second.finished || it->second.ended)
      return invalid_argument("fake: no such live send");
    Send& s = it->second;
    if (s.segs.count(index)) return invalid_argument("fake: segment index reused");
    if (!crc.has_value() || *crc != crc32c(data, bytes)) ++crc_mismatches_;
    for (const auto& [key, seg] : inflight_)
      if (overlaps(seg.data, seg.bytes, data, bytes)) ++violations_;  // two live sends share bytes
    Seg seg{data, bytes, remote_offset, std::vector<std::byte>(data, data + bytes), crc};
    if (s.image.size() < remote_offset + bytes) s.image.resize(remote_offset + bytes);
    std::memcpy(s.image.data() + remote_offset, data, bytes);
    s.segs[index] = seg;
    inflight_[{id.value(), index}] = seg;
    if (log_) log_->add("send " + std::to_string(index));
    return Status();
  }
  Status finish(PeerId, TransferId id) override {
    std::lock_guard lock(mu_);
    auto it = sends_.find(id.value());
    if (it == sends_.end()) return invalid_argument("fake: finish of an unknown send");
    it->second.finished = true;
    if (log_) log_->add("finish " + std::to_string(id.value()));
    return Status();
  }
  Status cancel_send(PeerId, TransferId id) override {
    std::lock_guard lock(mu_);
    auto it = sends_.find(id.value());
    if (it == sends_.end() || it->second.ended) return invalid_argument("fake: not live");
    ++cancels_;
    end_locked(id.value(), Status(StatusCode::kCancelled, "cancelled"));
    return Status();
  }
  size_t progress(std::vector<TransferEvent>& events) override {
    std::lock_guard lock(mu_);
    if (auto_release_) {
      // Release one in-flight segment per call, alternating between the
      // newest and the oldest: out of order with respect to sending.
      if (!inflight_.empty()) {
        auto it = (flip_ = !flip_) ? inflight_.begin() : std::prev(inflight_.end());
        release_locked(it->first.first, it->first.second);
      }
      // A finished send whose segments were all released completes.
      for (auto& [id, s] : sends_)
        if (s.finished && !s.ended && !has_inflight_locked(id)) end_locked(id, Status());
    }
    const size_t n = pending_.size();
    events.insert(events.end(), pending_.begin(), pending_.end());
    pending_.clear();
    return n;
  }
  TransportCounters counters() const override { return {}; }
  void set_test_hooks(TestHooks) override {}
  Status debug_send_raw(PeerId, std::span<const std::byte>) override { return Status(); }

  // ---- test controls and checks
  // The transport is done reading segment `index` of `id`.
  void release(TransferId id, uint32_t index) {
    std::lock_guard lock(mu_);
    release_locked(id.value(), index);
  }
  // The probe handed to StagedSender.
  bool released(PeerId, TransferId id, uint32_t index) {
    std::lock_guard lock(mu_);
    return released_.count({id.value(), index}) != 0;
  }
  // Ends a send (its event comes with the next progress()); every segment
  // is released.
  void complete(TransferId id, Status status = Status()) {
    std::lock_guard lock(mu_);
    end_locked(id.value(), std::move(status));
  }
  void set_auto_release(bool on) {
    std::lock_guard lock(mu_);
    auto_release_ = on;
  }
  // Called by HostCopier (worker thread) before a copy writes `dst`.
  Status check_copy_target(std::byte* dst, size_t bytes) {
    std::lock_guard lock(mu_);
    for (const auto& [key, seg] : inflight_)
      if (overlaps(seg.data, seg.bytes, dst, bytes)) ++violations_;
    return Status();
  }
  std::vector<std::byte> image(TransferId id) {
    std::lock_guard lock(mu_);
    return sends_[id.value()].image;
  }
  std::optional<uint32_t> crc_of(TransferId id, uint32_t index) {
    std::lock_guard lock(mu_);
    return sends_[id.value()].segs[index].crc;
  }
  size_t segments_of(TransferId id) {
    std::lock_guard lock(mu_);
    return sends_[id.value()].segs.size();
  }
  bool finished(TransferId id) {
    std::lock_guard lock(mu_);
    return sends_[id.value()].finished;
  }
  int violations() const {
    std::lock_guard lock(mu_);
    return violations_;
  }
  int crc_mismatches() const {
    std::lock_guard lock(mu_);
    return crc_mismatches_;
  }
  int cancels() const {
    std::lock_guard lock(mu_);
    return cancels_;
  }

 private:
  struct Seg {
    const std::byte* data = nullptr;
    size_t bytes = 0;
    uint64_t remote_offset = 0;
    std::vector<std::byte> snapshot;  // the bytes as handed over
    std::optional<uint32_t> crc;
  };
  struct Send {
    std::map<uint32_t, Seg> segs;
    std::vector<std::byte> image;
    bool finished = false, ended = false;
  };
  using Key = std::pair<uint64_t, uint32_t>;

  static bool overlaps(const std::byte* a, size_t an, const std::byte* b, size_t bn) {
    return a < b + bn && b < a + an;
  }
  bool has_inflight_locked(uint64_t id) const {
    auto it = inflight_.lower_bound({id, 0});
    return it != inflight_.end() && it->first.first == id;
  }
  void release_locked(uint64_t id, uint32_t index) {
    auto it = inflight_.find({id, index});
    if (it == inflight_.end()) return;
    // The staging buffer must hold exactly what was handed over until now.
    if (std::memcmp(it->second.data, it->second.snapshot.data(), it->second.bytes) != 0)
      ++violations_;
    inflight_.erase(it);
    released_.insert({id, index});
    if (log_) log_->add("release " + std::to_string(index));
  }
  void end_locked(uint64_t id, Status status) {
    Send& s = sends_[id];
    if (s.ended) return;
    s.ended = true;
    while (has_inflight_locked(id)) release_locked(id, inflight_.lower_bound({id, 0})->first.second);
    uint64_t bytes = 0;
    for (const auto& [i, seg] : s.segs) bytes += seg.bytes;
    TransferEvent ev;
    ev.side = TransferSide::kSend;
    ev.id = TransferId(id);
    ev.peer = PeerId(1);
    ev.status = std::move(status);
    ev.bytes = bytes;
    ev.segments = static_cast<uint32_t>(s.segs.size());
    pending_.push_back(std::move(ev));
  }

  EventLog* log_;
  mutable std::mutex mu_;  // the copier's worker thread calls check_copy_target
  std::map<uint64_t, Send> sends_;
  std::map<Key, Seg> inflight_;
  std::set<Key> released_;
  std::vector<TransferEvent> pending_;
  bool auto_release_ = false, flip_ = false;
  int violations_ = 0, crc_mismatches_ = 0, cancels_ = 0;
};

constexpr PeerId kPeer{1};

// A sender over the fake, with a copier whose hooks check every copy
// target against the fake and log copies by source segment.
struct SenderRig {
  explicit SenderRig(StagingOptions options, bool probe = true,
                     std::function<Status(const HostCopyRecord&)> fail = {})
      : transport(&log),
        device(random_bytes(size_t{1} << 20, 7)),
        options(options),
        copier(options.buffers,
               HostCopierHooks{
                   [this, fail](const HostCopyRecord& r) {
                     if (fail) {
                       if (Status s = fail(r); !s.ok()) return s;
                     }
                     log.add("copy " + std::to_string(segment_of(r.src)));
                     return transport.check_copy_target(r.dst, r.bytes);
                   },
                   [this](const HostCopyRecord& r, const Status& s) {
                     if (s.ok()) log.add("copied " + std::to_string(segment_of(r.src)));
                   }}) {
    SegmentReleasedFn fn;
    if (probe)
      fn = [this](PeerId p, TransferId id, uint32_t i) { return transport.released(p, id, i); };
    auto s = StagedSender::create(transport, copier, options, fn);
    EXPECT_TRUE(s.ok()) << s.status().to_string();
    if (s.ok()) sender = std::move(*s);
  }
  // Segment k of the device memory is [k * buffer_bytes, +buffer_bytes).
  long segment_of(const std::byte* src) const {
    return static_cast<long>((src - device.data()) / options.buffer_bytes);
  }
  // Progresses the sender and the fake, forwarding events, until `done` or
  // the deadline.
  bool pump(const std::function<bool()>& done, std::chrono::milliseconds limit = 10s) {
    const auto end = Clock::now() + limit;
    while (!done()) {
      if (Clock::now() > end) return false;
      sender->progress();
      std::vector<TransferEvent> evs;
      transport.progress(evs);
      for (const auto& e : evs) events.push_back(sender->on_transfer_event(e));
    }
    return true;
  }
  const StagedSendEvent* event_of(TransferId id) const {
    for (const auto& e : events)
      if (e.event.id == id) return &e;
    return nullptr;
  }

  EventLog log;
  FakeSendTransport transport;
  std::vector<std::byte> device;
  StagingOptions options;
  HostCopier copier;
  std::unique_ptr<StagedSender> sender;
  std::vector<StagedSendEvent> events;
};

#ifndef KVGATE_STAGING_GPU

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

// Without a per-segment release (the Transport as it is today): a buffer
// returns at its transfer's event, a transfer may use at most `buffers`
// segments, and a later transfer waits until every older one finished.
TEST(StagedSender, WithoutReleaseProbeBuffersReturnAtTheEvent) {
  SenderRig rig({3, 1024}, /*probe=*/false);
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

// ---------------------------------------------------------------- receiver

// A Transport the receiver can only cancel receives on.
class FakeRecvTransport final : public Transport {
 public:
  std::string_view name() const override { return "fake-recv"; }
  Result<Bytes> address() override { return Bytes{}; }
  Result<PeerId> connect(std::span<const std::byte>) override { return unimplemented("fake"); }
  Result<Bytes> post_receive(const ReceiveSpec&) override { return Bytes{}; }
  Status cancel_receive(TransferId id) override {
    cancelled.push_back(id);
    return Status();
  }
  Result<Bytes> extend_receive(TransferId, std::span<const DestRange>) override { return Bytes{}; }
  Status begin_send(PeerId, TransferId, std::span<const std::byte>, Clock::time_point) override {
    return unimplemented("fake");
  }
  Status extend_send(PeerId, TransferId, std::span<const std::byte>) override {
    return unimplemented("fake");
  }
  Status send_segment(PeerId, TransferId, uint32_t, const std::byte*, size_t, uint64_t,
                      std::optional<uint32_t>) override {
    return unimplemented("fake");
  }
  Status finish(PeerId, TransferId) override { return unimplemented("fake"); }
  Status cancel_send(PeerId, TransferId) override { return unimplemented("fake"); }
  size_t progress(std::vector<TransferEvent>&) override { return 0; }
  TransportCounters counters() const override { return {}; }
  void set_test_hooks(TestHooks) override {}
  Status debug_send_raw(PeerId, std::span<const std::byte>) override { return Status(); }
  std::vector<TransferId> cancelled;
};

TransferEvent recv_event(TransferId id, Status status = Status()) {
  TransferEvent e;
  e.side = TransferSide::kReceive;
  e.id = id;
  e.status = std::move(status);
  return e;
}

struct ReceiverRig {
  explicit ReceiverRig(uint32_t slots, size_t chunk,
                       std::function<Status(const HostCopyRecord&)> fail = {})
      : region(random_bytes(64 * 1024, 5)),
        device(64 * 1024),
        copier(slots, HostCopierHooks{[this, fail](const HostCopyRecord& r) {
                                        if (fail) {
                                          if (Status s = fail(r); !s.ok()) return s;
                                        }
                                        log.add("copy @" + std::to_string(r.src - region.data()));
                                        return Status();
                                      },
                                      {}}) {
    auto r = StagedReceiver::create(transport, region.data(), region.size(), copier, {chunk});
    EXPECT_TRUE(r.ok());
    if (r.ok()) receiver = std::move(*r);
  }
  bool pump(const std::function<bool()>& done, std::chrono::milliseconds limit = 10s) {
    const auto end = Clock::now() + limit;
    while (!done()) {
      if (Clock::now() > end) return false;
      receiver->progress(events);
    }
    return true;
  }
  const DeviceCopyEvent* event_of(TransferId id) const {
    for (const auto& e : events)
      if (e.id == id) return &e;
    return nullptr;
  }
  // The region's bytes of `ranges`, in logical order.
  std::vector<std::byte> gather(const std::vector<DestRange>& ranges) const {
    std::vector<std::byte> out;
    for (const auto& r : ranges)
      out.insert(out.end(), region.begin() + r.offset_bytes,
                 region.begin() + r.offset_bytes + r.length_bytes);
    return out;
  }

  EventLog log;
  FakeRecvTransport transport;
  std::vector<std::byte> region;  // the transport's (pinned) region, already "landed"
  std::vector<std::byte> device;
  HostCopier copier;
  std::unique_ptr<StagedReceiver> receiver;
  std::vector<DeviceCopyEvent> events;
};

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

#else  // KVGATE_STAGING_GPU

// The CUDA copier on a real device (label gpu; skipped without one). Built
// in the CUDA leg only; on a machine without a GPU it compiles and skips.
bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct DeviceMem {
  explicit DeviceMem(size_t n) { ok = cudaMalloc(&p, n) == cudaSuccess; }
  ~DeviceMem() {
    if (p != nullptr) cudaFree(p);
  }
  std::byte* get() const { return static_cast<std::byte*>(p); }
  void* p = nullptr;
  bool ok = false;
};

TEST(CudaStaging, CopierRoundTripThroughTheDevice) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto c = create_cuda_copier(2);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  DeviceCopier& copier = **c;
  EXPECT_EQ(copier.name(), "cuda");
  const size_t n = (size_t{8} << 20) + 3;
  const auto src = random_bytes(n, 1);
  auto a = PinnedBuffer::allocate(copier, n);
  auto b = PinnedBuffer::allocate(copier, n);
  ASSERT_TRUE(a.ok() && b.ok());
  std::memcpy(a->data(), src.data(), n);
  DeviceMem dev(n);
  ASSERT_TRUE(dev.ok);
  EXPECT_TRUE(copier.poll(0).ok());  // nothing issued yet
  ASSERT_TRUE(copier.copy_to_device_async(0, dev.get(), a->data(), n).ok());
  ASSERT_TRUE(copier.wait(0, Clock::now() + 10s).ok());
  ASSERT_TRUE(copier.copy_to_host_async(1, b->data(), dev.get(), n).ok());
  ASSERT_TRUE(copier.wait(1, Clock::now() + 10s).ok());
  EXPECT_EQ(std::memcmp(b->data(), src.data(), n), 0);
  EXPECT_EQ(copier.poll(2).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(copier.copy_to_host_async(0, nullptr, dev.get(), 1).code(),
            StatusCode::kInvalidArgument);
}

TEST(CudaStaging, SenderAndReceiverMoveDeviceBytes) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto send_copier = create_cuda_copier(4);
  auto recv_copier = create_cuda_copier(4);
  ASSERT_TRUE(send_copier.ok() && recv_copier.ok());
  const size_t n = (size_t{3} << 20) + 17;  // four staging buffers of 1 MiB, the last short
  const auto src = random_bytes(n, 2);
  DeviceMem dev_src(n), dev_dst(n);
  ASSERT_TRUE(dev_src.ok && dev_dst.ok);
  ASSERT_EQ(cudaMemcpy(dev_src.p, src.data(), n, cudaMemcpyHostToDevice), cudaSuccess);

  FakeSendTransport fake;
  fake.set_auto_release(true);
  auto sender = StagedSender::create(
      fake, **send_copier, {4, size_t{1} << 20},
      [&](PeerId p, TransferId id, uint32_t i) { return fake.released(p, id, i); });
  ASSERT_TRUE(sender.ok()) << sender.status().to_string();
  const TransferId id(1);
  ASSERT_TRUE((*sender)->begin(kPeer, id, {}, Clock::now() + 10s).ok());
  auto r = (*sender)->enqueue(kPeer, id, dev_src.get(), n, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->count, 4u);
  ASSERT_TRUE((*sender)->finish(kPeer, id).ok());
  std::vector<StagedSendEvent> events;
  const auto end = Clock::now() + 20s;
  while (events.empty() && Clock::now() < end) {
    (*sender)->progress();
    std::vector<TransferEvent> evs;
    fake.progress(evs);
    for (const auto& e : evs) events.push_back((*sender)->on_transfer_event(e));
  }
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].event.status.ok()) << events[0].event.status.to_string();
  const auto image = fake.image(id);
  ASSERT_EQ(image.size(), n);
  EXPECT_EQ(std::memcmp(image.data(), src.data(), n), 0);
  EXPECT_EQ(fake.crc_mismatches(), 0);

  // The receiver: the image in a pinned region → device pages.
  auto region = PinnedBuffer::allocate(**recv_copier, n);
  ASSERT_TRUE(region.ok());
  std::memcpy(region->data(), image.data(), n);
  auto receiver = StagedReceiver::create(fake, region->data(), n, **recv_copier, {256 * 1024});
  ASSERT_TRUE(receiver.ok());
  ASSERT_TRUE((*receiver)->expect({id, {{0, n}}, {{dev_dst.get(), n}}}).ok());
  TransferEvent ok_event;
  ok_event.side = TransferSide::kReceive;
  ok_event.id = id;
  (*receiver)->on_transfer_event(ok_event);
  std::vector<DeviceCopyEvent> copied;
  while (copied.empty() && Clock::now() < end) (*receiver)->progress(copied);
  ASSERT_EQ(copied.size(), 1u);
  EXPECT_TRUE(copied[0].status.ok()) << copied[0].status.to_string();
  std::vector<std::byte> back(n);
  ASSERT_EQ(cudaMemcpy(back.data(), dev_dst.p, n, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, src);
}

#endif  // KVGATE_STAGING_GPU

#else  // KVGATE_STAGING_INTEGRATION

// The whole staged path over the real UCX transport on lo: device memory
// (HostCopier) → staging ring → UCX (tcp) → the receiver's pinned region →
// device pages. The Transport has no per-segment release today, so the
// sender runs in its event mode (each transfer within the ring).
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

#endif  // KVGATE_STAGING_INTEGRATION

}  // namespace
}  // namespace kvgate::transport::staging
