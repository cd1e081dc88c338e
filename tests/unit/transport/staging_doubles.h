// Test doubles of the staging tests (staging_sender_test.cpp,
// staging_receiver_test.cpp, staging_cuda_test.cpp): they stand in for the
// device and the network, and check what the staged path does to them.
//
//   - HostCopier (transport/staging/host_copier.h): plain memory stands in
//     for device memory; copies on its worker thread; hold/release decide
//     completion order.
//   - FakeSendTransport: checks what the staged sender hands it — the CRC
//     against the bytes, that no copy ever writes into a buffer whose send
//     the fake has not released, and that a buffer's bytes are unchanged
//     when the fake releases it — and records the order of events with the
//     copier (EventLog). Its segment_released() is what the test released.
//   - FakeRecvTransport: a receiver-side Transport that only records
//     cancel_receive; the test plays its events (recv_event).
//   - SenderRig / ReceiverRig: a StagedSender / StagedReceiver over those,
//     with pump() (a condition with a deadline, never a sleep).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "tests/unit/transport/transport_test_util.h"
#include "transport/staging/host_copier.h"
#include "transport/staging/staged_receiver.h"
#include "transport/staging/staged_sender.h"

namespace kvgate::transport::staging::doubles {

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

// A Transport that only sends, into an in-memory image per transfer.
class FakeSendTransport final : public Transport {
 public:
  // `early_release`: whether segment_released() tells releases before the
  // transfer's event (a real transport: yes); false stands for a transport
  // that frees a segment's bytes only at the event.
  explicit FakeSendTransport(EventLog* log = nullptr, bool early_release = true)
      : log_(log), early_release_(early_release) {}

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
  bool segment_released(PeerId peer, TransferId id, uint32_t index) const override {
    return early_release_ && released(peer, id, index);
  }
  bool releases_segments_early() const override { return early_release_; }
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
  // Whether the test released segment `index` of `id` (release(),
  // complete(), auto release), whatever early_release says.
  bool released(PeerId, TransferId id, uint32_t index) const {
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
  const bool early_release_;
  mutable std::mutex mu_;  // the copier's worker thread calls check_copy_target
  std::map<uint64_t, Send> sends_;
  std::map<Key, Seg> inflight_;
  std::set<Key> released_;
  std::vector<TransferEvent> pending_;
  bool auto_release_ = false, flip_ = false;
  int violations_ = 0, crc_mismatches_ = 0, cancels_ = 0;
};

inline constexpr PeerId kPeer{1};

// A sender over the fake (with the fake's own release probe), with a copier
// whose hooks check every copy target against the fake and log copies by
// source segment.
struct SenderRig {
  // `early_release`: the fake tells per-segment releases (the sender then
  // uses them by itself), or only the transfer's end.
  explicit SenderRig(StagingOptions options, bool early_release = true,
                     std::function<Status(const HostCopyRecord&)> fail = {})
      : transport(&log, early_release),
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
    auto s = StagedSender::create(transport, copier, options);
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
  bool segment_released(PeerId, TransferId, uint32_t) const override { return false; }
  bool releases_segments_early() const override { return false; }
  Status finish(PeerId, TransferId) override { return unimplemented("fake"); }
  Status cancel_send(PeerId, TransferId) override { return unimplemented("fake"); }
  size_t progress(std::vector<TransferEvent>&) override { return 0; }
  TransportCounters counters() const override { return {}; }
  void set_test_hooks(TestHooks) override {}
  Status debug_send_raw(PeerId, std::span<const std::byte>) override { return Status(); }
  std::vector<TransferId> cancelled;
};

inline TransferEvent recv_event(TransferId id, Status status = Status()) {
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

}  // namespace kvgate::transport::staging::doubles
