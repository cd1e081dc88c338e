#include "transport/staging/staged_receiver.h"

#include <algorithm>
#include <string>

namespace kvgate::transport::staging {
namespace {

std::string transfer_name(TransferId id) { return "transfer " + std::to_string(id.value()); }

}  // namespace

Result<std::unique_ptr<StagedReceiver>> StagedReceiver::create(
    Transport& transport, std::byte* region, size_t region_bytes, DeviceCopier& copier,
    const StagedReceiverOptions& options) {
  if (region == nullptr || region_bytes == 0)
    return invalid_argument("staging: the receiver needs the transport's region");
  if (copier.slot_count() == 0) return invalid_argument("staging: the copier has no slots");
  if (options.copy_chunk_bytes == 0) return invalid_argument("staging: copy_chunk_bytes is 0");
  return std::unique_ptr<StagedReceiver>(
      new StagedReceiver(transport, region, region_bytes, copier, options));
}

StagedReceiver::StagedReceiver(Transport& transport, std::byte* region, size_t region_bytes,
                               DeviceCopier& copier, const StagedReceiverOptions& options)
    : transport_(transport),
      region_(region),
      region_bytes_(region_bytes),
      copier_(copier),
      options_(options),
      slots_(copier.slot_count()) {}

StagedReceiver::~StagedReceiver() {
  // The copies read the region and write device pages the owner gets back:
  // let them end (bounded).
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  for (uint32_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].transfer != 0) (void)copier_.wait(i, deadline);
}

StagedReceiver::Xfer* StagedReceiver::find(TransferId id) {
  auto it = xfers_.find(id.value());
  return it == xfers_.end() ? nullptr : &it->second;
}

Status StagedReceiver::append(Xfer& x, std::span<const DestRange> host_ranges,
                              std::span<const DevicePiece> device) {
  if (host_ranges.empty())
    return invalid_argument("staging: " + transfer_name(x.id) + ": no host ranges");
  uint64_t host_total = 0, device_total = 0;
  for (const DestRange& r : host_ranges) {
    if (r.length_bytes == 0 || r.offset_bytes > region_bytes_ ||
        r.length_bytes > region_bytes_ - r.offset_bytes)
      return out_of_range("staging: " + transfer_name(x.id) + ": host range [" +
                          std::to_string(r.offset_bytes) + ", +" + std::to_string(r.length_bytes) +
                          ") is empty or outside the region of " + std::to_string(region_bytes_) +
                          " bytes");
    host_total += r.length_bytes;
  }
  for (const DevicePiece& d : device) {
    if (d.device == nullptr || d.bytes == 0)
      return invalid_argument("staging: " + transfer_name(x.id) + ": a device piece is empty");
    device_total += d.bytes;
  }
  if (host_total != device_total)
    return invalid_argument("staging: " + transfer_name(x.id) + ": " + std::to_string(host_total) +
                            " host bytes but " + std::to_string(device_total) + " device bytes");
  // Walk both lists at once; each op stays inside one host range, one
  // device piece and one chunk.
  size_t h = 0, d = 0;
  uint64_t h_off = 0, d_off = 0, logical = x.total_bytes;
  while (h < host_ranges.size()) {
    const uint64_t n = std::min({host_ranges[h].length_bytes - h_off, device[d].bytes - d_off,
                                 static_cast<uint64_t>(options_.copy_chunk_bytes)});
    x.ops.push_back(
        {region_ + host_ranges[h].offset_bytes + h_off, device[d].device + d_off, n, logical});
    logical += n;
    h_off += n;
    d_off += n;
    if (h_off == host_ranges[h].length_bytes) ++h, h_off = 0;
    if (d < device.size() && d_off == device[d].bytes) ++d, d_off = 0;
  }
  x.total_bytes = logical;
  return Status();
}

Status StagedReceiver::expect(const StagedReceiveSpec& spec) {
  if (find(spec.id) != nullptr)
    return invalid_argument("staging: " + transfer_name(spec.id) + " is already expected");
  Xfer x;
  x.id = spec.id;
  x.order = next_order_++;
  KVGATE_RETURN_IF_ERROR(append(x, spec.host_ranges, spec.device));
  xfers_.emplace(spec.id.value(), std::move(x));
  return Status();
}

Status StagedReceiver::extend(TransferId id, std::span<const DestRange> host_ranges,
                              std::span<const DevicePiece> device) {
  Xfer* x = find(id);
  if (x == nullptr) return not_found("staging: unknown " + transfer_name(id));
  // Validate on a copy so that an error changes nothing.
  Xfer probe;
  probe.id = id;
  probe.total_bytes = x->total_bytes;
  KVGATE_RETURN_IF_ERROR(append(probe, host_ranges, device));
  x->ops.insert(x->ops.end(), probe.ops.begin(), probe.ops.end());
  x->total_bytes = probe.total_bytes;
  return Status();
}

Status StagedReceiver::on_landed(TransferId id, uint64_t logical_offset, uint64_t bytes) {
  Xfer* x = find(id);
  if (x == nullptr) return not_found("staging: unknown " + transfer_name(id));
  if (logical_offset > x->total_bytes || bytes > x->total_bytes - logical_offset)
    return out_of_range("staging: " + transfer_name(id) + ": landed bytes [" +
                        std::to_string(logical_offset) + ", +" + std::to_string(bytes) +
                        ") past its " + std::to_string(x->total_bytes));
  if (bytes == 0) return Status();
  // Merge into the landed intervals: a copy chunk may span segments, and
  // it is copyable once all of it landed, whichever notices covered it.
  uint64_t lo = logical_offset, hi = logical_offset + bytes;
  auto& landed = x->landed;
  auto next = landed.upper_bound(lo);
  if (next != landed.begin()) {
    auto prev = std::prev(next);
    if (prev->second >= lo) {
      lo = prev->first;
      hi = std::max(hi, prev->second);
      next = landed.erase(prev);
    }
  }
  while (next != landed.end() && next->first <= hi) {
    hi = std::max(hi, next->second);
    next = landed.erase(next);
  }
  landed.emplace(lo, hi);
  // Ops are contiguous in logical order; those inside [lo, hi) may copy.
  auto it = std::lower_bound(x->ops.begin(), x->ops.end(), lo,
                             [](const Op& op, uint64_t off) { return op.logical < off; });
  for (; it != x->ops.end() && it->logical + it->bytes <= hi; ++it) it->landed = true;
  return Status();
}

void StagedReceiver::on_segment_landed(const SegmentLanded& notice) {
  Xfer* x = find(notice.id);
  if (x == nullptr || x->failed) return;  // not staged here, or already failing
  ++counters_.landing_notices;
  Status s = on_landed(notice.id, notice.logical_offset, notice.bytes);
  // The transport landed bytes this receiver was never told about (an
  // extend_receive without extend()): they would never reach the device.
  if (!s.ok())
    fail(*x, Status(s.code(), "staging: segment " + std::to_string(notice.segment_index) +
                                  " landed outside what was expected: " + s.message()));
}

void StagedReceiver::fail(Xfer& x, Status status) {
  if (x.failed) return;
  x.failed = true;
  x.failure = std::move(status);
  // Until the transport's event the transfer may still land bytes in the
  // region: it must end there too (its event then follows).
  if (!x.event_seen) (void)transport_.cancel_receive(x.id);
}

Status StagedReceiver::cancel(TransferId id) {
  Xfer* x = find(id);
  if (x == nullptr) return not_found("staging: unknown " + transfer_name(id));
  fail(*x, Status(StatusCode::kCancelled, "staging: " + transfer_name(id) + " cancelled"));
  return Status();
}

void StagedReceiver::on_transfer_event(const TransferEvent& event) {
  if (event.side != TransferSide::kReceive) return;
  Xfer* x = find(event.id);
  if (x == nullptr) return;
  x->event_seen = true;
  if (event.status.ok() && !x->failed) {
    x->verified = true;
  } else if (!x->failed) {
    x->failed = true;
    x->failure = event.status;
  }
}

size_t StagedReceiver::progress(std::vector<DeviceCopyEvent>& events) {
  // 1. Copies that ended.
  for (uint32_t i = 0; i < slots_.size(); ++i) {
    SlotUse& use = slots_[i];
    if (use.transfer == 0) continue;
    Status s = copier_.poll(i);
    if (s.code() == StatusCode::kInProgress) continue;
    Xfer& x = xfers_.at(use.transfer);
    Op& op = x.ops[use.op];
    use.transfer = 0;
    --x.in_flight;
    if (!s.ok()) {
      op.state = OpState::kPending;
      fail(x, Status(s.code(), "staging: device copy of bytes [" + std::to_string(op.logical) +
                                   ", " + std::to_string(op.logical + op.bytes) + ") of " +
                                   transfer_name(x.id) + " failed: " + s.message()));
      continue;
    }
    op.state = OpState::kDone;
    x.copied_bytes += op.bytes;
    counters_.bytes_copied += op.bytes;
  }
  // 2. Free slots take the next chunks: oldest transfer first, verified
  // chunks and landed ones alike.
  std::vector<Xfer*>& order = order_scratch_;
  order.clear();
  for (auto& [id, x] : xfers_)
    if (!x.failed) order.push_back(&x);
  std::sort(order.begin(), order.end(), [](Xfer* a, Xfer* b) { return a->order < b->order; });
  size_t oi = 0, op_index = 0;
  for (uint32_t i = 0; i < slots_.size() && oi < order.size(); ++i) {
    if (slots_[i].transfer != 0) continue;
    // Find the next copyable op.
    Op* op = nullptr;
    while (oi < order.size()) {
      Xfer& x = *order[oi];
      while (op_index < x.ops.size()) {
        Op& cand = x.ops[op_index];
        if (cand.state == OpState::kPending && (cand.landed || x.verified)) {
          op = &cand;
          break;
        }
        ++op_index;
      }
      if (op != nullptr) break;
      ++oi;
      op_index = 0;
    }
    if (op == nullptr) break;
    Xfer& x = *order[oi];
    Status s = copier_.copy_to_device_async(i, op->device, op->host, op->bytes);
    if (!s.ok()) {
      fail(x, Status(s.code(), "staging: device copy of bytes [" + std::to_string(op->logical) +
                                   ", " + std::to_string(op->logical + op->bytes) + ") of " +
                                   transfer_name(x.id) + " could not start: " + s.message()));
      ++oi;
      op_index = 0;
      continue;
    }
    op->state = OpState::kInFlight;
    slots_[i] = {x.id.value(), op_index};
    ++x.in_flight;
    ++counters_.copies_issued;
    if (!x.verified) ++counters_.copies_before_verified;
    ++op_index;
  }
  // 3. Transfers that are done: both the transport's verdict and every
  // copy in, or failed with nothing in flight.
  size_t appended = 0;
  for (auto it = xfers_.begin(); it != xfers_.end();) {
    Xfer& x = it->second;
    const bool all_copied = x.copied_bytes == x.total_bytes;
    if (x.event_seen && x.in_flight == 0 && (x.failed || (x.verified && all_copied))) {
      events.push_back({x.id, x.failed ? x.failure : Status(), x.copied_bytes});
      ++appended;
      it = xfers_.erase(it);
    } else {
      ++it;
    }
  }
  return appended;
}

}  // namespace kvgate::transport::staging
