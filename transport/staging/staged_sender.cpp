#include "transport/staging/staged_sender.h"

#include <algorithm>
#include <string>

#include "common/crc32c.h"

namespace kvgate::transport::staging {
namespace {

std::string transfer_name(TransferId id) { return "transfer " + std::to_string(id.value()); }

// "segment 3 (bytes [a, b) of transfer 7)"
std::string segment_name(TransferId id, uint32_t segment, uint64_t offset, uint64_t bytes) {
  return "segment " + std::to_string(segment) + " (bytes [" + std::to_string(offset) + ", " +
         std::to_string(offset + bytes) + ") of " + transfer_name(id) + ")";
}

}  // namespace

Result<std::unique_ptr<StagedSender>> StagedSender::create(Transport& transport,
                                                           DeviceCopier& copier,
                                                           const StagingOptions& options,
                                                           SegmentReleasedFn released) {
  if (options.buffers == 0 || options.buffer_bytes == 0)
    return invalid_argument("staging: buffers and buffer_bytes must be > 0");
  if (options.buffers > copier.slot_count())
    return invalid_argument("staging: " + std::to_string(options.buffers) +
                            " buffers need as many copy slots; the " +
                            std::string(copier.name()) + " copier has " +
                            std::to_string(copier.slot_count()));
  // The transport's own per-segment release, where it has one: buffers
  // then return per segment and a transfer may use any number of them.
  if (!released && transport.releases_segments_early()) {
    released = [&transport](PeerId peer, TransferId id, uint32_t segment) {
      return transport.segment_released(peer, id, segment);
    };
  }
  std::unique_ptr<StagedSender> s(new StagedSender(transport, copier, options, std::move(released)));
  s->buffers_.resize(options.buffers);
  for (Buffer& b : s->buffers_) {
    KVGATE_ASSIGN_OR_RETURN(b.mem, PinnedBuffer::allocate(copier, options.buffer_bytes));
  }
  return s;
}

StagedSender::StagedSender(Transport& transport, DeviceCopier& copier,
                           const StagingOptions& options, SegmentReleasedFn released)
    : transport_(transport), copier_(copier), options_(options), released_(std::move(released)) {}

StagedSender::~StagedSender() {
  // A copy still in flight writes into its buffer: wait for it (bounded)
  // and leak the buffer rather than free memory a DMA may still write.
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  for (uint32_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].state != BufState::kCopying) continue;
    Status s = copier_.wait(i, deadline);
    if (s.code() == StatusCode::kDeadlineExceeded) (void)buffers_[i].mem.release_leak();
  }
}

StagedSender::Xfer* StagedSender::find(PeerId peer, TransferId id) {
  auto it = xfers_.find({peer.value(), id.value()});
  return it == xfers_.end() ? nullptr : &it->second;
}

uint32_t StagedSender::free_buffers() const {
  return static_cast<uint32_t>(std::count_if(buffers_.begin(), buffers_.end(), [](const Buffer& b) {
    return b.state == BufState::kFree;
  }));
}

Status StagedSender::begin(PeerId peer, TransferId id, std::span<const std::byte> grant,
                           Clock::time_point deadline) {
  if (find(peer, id) != nullptr)
    return invalid_argument("staging: " + transfer_name(id) + " to peer " +
                            std::to_string(peer.value()) + " already begun");
  KVGATE_RETURN_IF_ERROR(transport_.begin_send(peer, id, grant, deadline));
  Xfer& x = xfers_[{peer.value(), id.value()}];
  x.peer = peer;
  x.id = id;
  x.order = next_order_++;
  return Status();
}

Result<StagedSegments> StagedSender::enqueue(PeerId peer, TransferId id,
                                             const std::byte* device_src, size_t bytes,
                                             uint64_t remote_offset) {
  Xfer* x = find(peer, id);
  if (x == nullptr) return invalid_argument("staging: unknown " + transfer_name(id));
  if (x->failed) return x->failure;
  if (x->finish_requested)
    return invalid_argument("staging: " + transfer_name(id) + ": enqueue after finish");
  if (device_src == nullptr || bytes == 0)
    return invalid_argument("staging: " + transfer_name(id) + ": a segment needs bytes");
  const uint64_t pieces = (bytes + options_.buffer_bytes - 1) / options_.buffer_bytes;
  if (x->next_segment + pieces > kMaxSegments)
    return invalid_argument("staging: " + transfer_name(id) + " would exceed " +
                            std::to_string(kMaxSegments) + " segments");
  if (!released_ && x->next_segment + pieces > buffers_.size())
    return resource_exhausted(
        "staging: " + transfer_name(id) + " needs " + std::to_string(x->next_segment + pieces) +
        " staging buffers of " + std::to_string(options_.buffer_bytes) + " bytes, the ring has " +
        std::to_string(buffers_.size()) +
        ": the " + std::string(transport_.name()) +
        " transport does not release segments before the transfer's end, so neither does a "
        "buffer");
  StagedSegments out{x->next_segment, static_cast<uint32_t>(pieces)};
  for (uint64_t done = 0; done < bytes;) {
    const size_t n = std::min<size_t>(options_.buffer_bytes, bytes - done);
    x->queued.push_back({device_src + done, n, remote_offset + done, x->next_segment++});
    done += n;
  }
  x->sent.resize(x->next_segment);
  return out;
}

Status StagedSender::finish(PeerId peer, TransferId id) {
  Xfer* x = find(peer, id);
  if (x == nullptr) return invalid_argument("staging: unknown " + transfer_name(id));
  if (x->failed) return x->failure;
  x->finish_requested = true;
  return Status();
}

Status StagedSender::cancel(PeerId peer, TransferId id) {
  Xfer* x = find(peer, id);
  if (x == nullptr) return invalid_argument("staging: unknown " + transfer_name(id));
  if (!x->failed) fail(*x, Status(StatusCode::kCancelled, "cancelled"));
  return Status();
}

void StagedSender::fail(Xfer& x, Status status) {
  x.failed = true;
  x.failure = std::move(status);
  x.queued.clear();
  if (x.failure.code() != StatusCode::kCancelled) ++counters_.transfers_failed_by_staging;
  // The transport answers with the transfer's event (kCancelled), which
  // on_transfer_event turns back into this failure. An error here means
  // the transport already ended it: its event is on the way anyway.
  if (!x.event_seen) (void)transport_.cancel_send(x.peer, x.id);
}

StagedSender::Xfer* StagedSender::next_to_stage() {
  Xfer* best = nullptr;
  for (auto& [key, x] : xfers_) {
    if (x.failed || x.event_seen) continue;
    if (!x.queued.empty() || (!released_ && !x.finish_requested)) {
      if (best == nullptr || x.order < best->order) best = &x;
    }
  }
  // Without a release probe only the oldest open transfer may take
  // buffers; with it, the oldest transfer that has something queued.
  if (best != nullptr && best->queued.empty()) return nullptr;
  return best;
}

void StagedSender::complete_copy(uint32_t i, Status copy_status) {
  Buffer& b = buffers_[i];
  auto it = xfers_.find(b.key);
  b.state = BufState::kFree;
  if (it == xfers_.end()) return;  // cannot happen: a transfer outlives its copies
  Xfer& x = it->second;
  --x.copying;
  const Chunk& c = b.chunk;
  if (x.failed || x.event_seen) {
    maybe_erase(b.key);
    return;
  }
  if (!copy_status.ok()) {
    fail(x, Status(copy_status.code(), "staging: device copy of " +
                                           segment_name(x.id, c.segment, c.remote_offset, c.bytes) +
                                           " failed: " + copy_status.message()));
    return;
  }
  const uint32_t crc = crc32c(b.mem.data(), c.bytes);
  Status s = transport_.send_segment(x.peer, x.id, c.segment, b.mem.data(), c.bytes,
                                     c.remote_offset, crc);
  if (!s.ok()) {
    fail(x, Status(s.code(), "staging: send of " +
                                 segment_name(x.id, c.segment, c.remote_offset, c.bytes) + ": " +
                                 s.message()));
    return;
  }
  b.state = BufState::kSent;
  x.sent[c.segment] = {c.segment, c.remote_offset, c.bytes, crc};
  ++counters_.segments_sent;
  counters_.bytes_sent += c.bytes;
}

void StagedSender::progress() {
  // 1. Copies that completed: checksum and hand to the transport.
  for (uint32_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].state != BufState::kCopying) continue;
    Status s = copier_.poll(i);
    if (s.code() == StatusCode::kInProgress) continue;
    complete_copy(i, std::move(s));
  }
  // 2. Buffers the transport released (per-segment probe).
  if (released_) {
    for (Buffer& b : buffers_) {
      if (b.state != BufState::kSent) continue;
      if (released_(PeerId(b.key.first), TransferId(b.key.second), b.chunk.segment)) {
        b.state = BufState::kFree;
        ++counters_.buffers_released_early;
      }
    }
  }
  // 3. finish() once every segment was handed over.
  for (auto& [key, x] : xfers_) {
    if (!x.finish_requested || x.finish_called || x.failed || x.event_seen) continue;
    if (!x.queued.empty() || x.copying != 0) continue;
    x.finish_called = true;
    if (Status s = transport_.finish(x.peer, x.id); !s.ok())
      fail(x, Status(s.code(), "staging: finish of " + transfer_name(x.id) + ": " + s.message()));
  }
  // 4. Free buffers take the next copies.
  for (uint32_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].state != BufState::kFree) continue;
    Xfer* x = next_to_stage();
    if (x == nullptr) break;
    Buffer& b = buffers_[i];
    b.chunk = x->queued.front();
    x->queued.pop_front();
    b.key = {x->peer.value(), x->id.value()};
    Status s = copier_.copy_to_host_async(i, b.mem.data(), b.chunk.src, b.chunk.bytes);
    if (!s.ok()) {
      fail(*x, Status(s.code(), "staging: device copy of " +
                                    segment_name(x->id, b.chunk.segment, b.chunk.remote_offset,
                                                 b.chunk.bytes) +
                                    " could not start: " + s.message()));
      continue;
    }
    b.state = BufState::kCopying;
    ++x->copying;
    ++counters_.copies_issued;
  }
}

void StagedSender::maybe_erase(const Key& key) {
  auto it = xfers_.find(key);
  if (it != xfers_.end() && it->second.event_seen && it->second.copying == 0) xfers_.erase(it);
}

StagedSendEvent StagedSender::on_transfer_event(const TransferEvent& event) {
  StagedSendEvent out{event, {}};
  if (event.side != TransferSide::kSend) return out;
  const Key key{event.peer.value(), event.id.value()};
  auto it = xfers_.find(key);
  if (it == xfers_.end()) return out;
  Xfer& x = it->second;
  // The transport no longer reads any of the transfer's bytes.
  for (Buffer& b : buffers_)
    if (b.state == BufState::kSent && b.key == key) b.state = BufState::kFree;
  x.event_seen = true;
  x.queued.clear();
  if (!event.status.ok() && x.failed && x.failure.code() != StatusCode::kCancelled)
    out.event.status = x.failure;
  // Failed by the transport (deadline, peer lost): copies still in flight
  // are dropped when they end, and enqueue() answers with the failure.
  if (!event.status.ok() && !x.failed) {
    x.failed = true;
    x.failure = event.status;
  }
  for (const StagedSegmentInfo& s : x.sent)
    if (s.bytes != 0) out.segments.push_back(s);
  maybe_erase(key);
  return out;
}

}  // namespace kvgate::transport::staging
