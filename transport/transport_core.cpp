#include "transport/transport_core.h"

#include <algorithm>
#include <cstdio>
#include <string>

#include "common/crc32c.h"

namespace kvgate::transport {

namespace {

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

std::string tid(uint64_t id) { return "transfer " + std::to_string(id); }

// CRC work between two link_progress() calls: ~20 µs of checksumming, short
// enough that a tcp socket's buffer does not run dry meanwhile.
constexpr uint64_t kCrcChunkBytes = 512 << 10;
// Most CRC work one progress() call does (bounds how long it blocks when
// segments keep landing while it checksums).
constexpr uint64_t kCrcPerProgressBytes = uint64_t{256} << 20;

}  // namespace

TransportCore::TransportCore(const TransportOptions& options, wire::DataOp op)
    : options_(options),
      op_(op),
      region_(options.region),
      region_bytes_(options.region ? options.region_bytes : 0),
      rng_(std::random_device{}()) {}

uint64_t TransportCore::new_nonce() {
  uint64_t n = 0;
  while (n == 0 || by_remote_nonce_.count(n) || pending_outbound_.count(n)) n = rng_();
  return n;
}

TransportCore::Conn* TransportCore::conn(PeerId peer) {
  auto it = conns_.find(peer.value());
  return it == conns_.end() ? nullptr : &it->second;
}

TransportCore::Conn* TransportCore::conn_by_remote_nonce(uint64_t nonce, PeerId& peer) {
  auto it = by_remote_nonce_.find(nonce);
  if (it == by_remote_nonce_.end()) return nullptr;
  peer = PeerId(it->second);
  Conn* c = conn(peer);
  return c && !c->lost ? c : nullptr;
}

void TransportCore::send_control(PeerId peer, const Conn& c, wire::WireType type, wire::Body body) {
  if (c.lost) return;
  wire::Message m{type, c.local_nonce, std::move(body)};
  // A failed send surfaces as the peer's loss through the backend.
  (void)link_send_control(peer, wire::encode(m));
}

void TransportCore::count_malformed(const Status& why) { ++counters_.malformed_messages; }

uint32_t TransportCore::link_crc32c(const std::byte* data, size_t bytes, uint32_t seed) {
  return crc32c(data, bytes, seed);
}

// ------------------------------------------------------------ handshake

Result<PeerId> TransportCore::connect(std::span<const std::byte> address) {
  const PeerId peer(next_peer_++);
  Conn c;
  c.outbound = true;
  c.local_nonce = new_nonce();
  KVGATE_RETURN_IF_ERROR(link_connect(peer, address));
  KVGATE_ASSIGN_OR_RETURN(Bytes self, this->address());
  pending_outbound_[c.local_nonce] = peer.value();
  auto& stored = conns_[peer.value()] = c;
  send_control(peer, stored, wire::WireType::kHello,
               wire::Hello{options_.cluster_token, op_, std::move(self)});
  return peer;
}

void TransportCore::handle_hello(uint64_t nonce, wire::Hello hello) {
  if (nonce == 0 || by_remote_nonce_.count(nonce)) {
    count_malformed(invalid_argument("duplicate Hello"));
    return;
  }
  if (!wire::tokens_equal(hello.cluster_token, options_.cluster_token)) {
    ++counters_.refused_peers;  // never answered: its later messages are dropped
    return;
  }
  const PeerId peer(next_peer_++);
  if (!link_connect(peer, hello.reply_address).ok()) {
    count_malformed(invalid_argument("Hello.reply_address unusable"));
    return;
  }
  Conn c;
  c.local_nonce = new_nonce();
  c.remote_nonce = nonce;
  c.ready = true;
  c.peer_op = hello.op;
  by_remote_nonce_[nonce] = peer.value();
  auto& stored = conns_[peer.value()] = c;
  send_control(peer, stored, wire::WireType::kHelloAck,
               wire::HelloAck{options_.cluster_token, op_, nonce});
}

void TransportCore::handle_hello_ack(uint64_t nonce, const wire::HelloAck& ack) {
  auto it = pending_outbound_.find(ack.echo_nonce);
  if (it == pending_outbound_.end() || nonce == 0 || by_remote_nonce_.count(nonce)) {
    ++counters_.dropped_messages;
    return;
  }
  const PeerId peer(it->second);
  pending_outbound_.erase(it);
  Conn* c = conn(peer);
  if (!c || c->lost) return;
  if (!wire::tokens_equal(ack.cluster_token, options_.cluster_token)) {
    ++counters_.refused_peers;
    peer_lost(peer, Status(StatusCode::kPermissionDenied,
                           "transport: peer presented the wrong cluster token"));
    return;
  }
  c->remote_nonce = nonce;
  c->peer_op = ack.op;
  c->ready = true;
  by_remote_nonce_[nonce] = peer.value();
}

void TransportCore::peer_lost(PeerId peer, Status status) {
  Conn* c = conn(peer);
  if (!c || c->lost) return;
  c->lost = true;
  if (c->remote_nonce) by_remote_nonce_.erase(c->remote_nonce);
  pending_outbound_.erase(c->local_nonce);
  for (auto& [key, t] : sends_) {
    if (key.first != peer.value()) continue;
    if (!t.failed) fail_send(t, status, false);
    t.notify_peer = false;
  }
  for (auto& [id, t] : recvs_) {
    if (t.peer != peer) continue;
    if (!t.failed) fail_recv(t, status, false);
    t.await_stop = false;
  }
}

void TransportCore::say_goodbye() {
  for (auto& [id, c] : conns_) {
    if (!c.lost && (c.ready || c.outbound))
      send_control(PeerId(id), c, wire::WireType::kGoodbye, wire::Goodbye{});
  }
}

Status TransportCore::debug_send_raw(PeerId peer, std::span<const std::byte> message) {
  Conn* c = conn(peer);
  if (!c) return invalid_argument("transport: unknown peer");
  return link_send_control(peer, Bytes(message.begin(), message.end()));
}

// ------------------------------------------------------------- receiver

Status TransportCore::check_ranges(const char* call, std::span<const DestRange> ranges) const {
  for (const auto& r : ranges) {
    if (r.length_bytes == 0 || r.offset_bytes > region_bytes_ ||
        r.length_bytes > region_bytes_ - r.offset_bytes)
      return out_of_range(std::string("transport: ") + call + ": range [" + std::to_string(r.offset_bytes) +
                          ", +" + std::to_string(r.length_bytes) + ") is empty or outside the " +
                          std::to_string(region_bytes_) + "-byte region");
  }
  return {};
}

Result<Bytes> TransportCore::post_receive(const ReceiveSpec& spec) {
  if (!spec.id.valid()) return invalid_argument("transport: post_receive: transfer id 0");
  if (recvs_.count(spec.id.value()))
    return invalid_argument("transport: post_receive: " + tid(spec.id.value()) + " already posted");
  if (spec.ranges.empty() || spec.ranges.size() > kMaxRanges)
    return invalid_argument("transport: post_receive: need 1.." + std::to_string(kMaxRanges) +
                            " ranges, got " + std::to_string(spec.ranges.size()));
  KVGATE_RETURN_IF_ERROR(check_ranges("post_receive", spec.ranges));
  RecvTransfer t;
  t.id = spec.id;
  t.map = wire::RangeMap(spec.ranges);
  t.start = Clock::now();
  t.deadline = spec.deadline;
  recvs_.emplace(spec.id.value(), std::move(t));
  return wire::encode_grant(wire::Grant{spec.id.value(), spec.ranges});
}

Result<Bytes> TransportCore::extend_receive(TransferId id, std::span<const DestRange> more) {
  const std::string who = "transport: extend_receive: " + tid(id.value());
  auto it = recvs_.find(id.value());
  if (it == recvs_.end()) return not_found(who + " is not posted (never, or already reported)");
  RecvTransfer& t = it->second;
  if (t.failed)
    return failed_precondition(who + " already failed: " + t.status.to_string());
  // After the manifest the sender issues nothing more: a larger grant could
  // never be used, and the verdict may already be on its way.
  if (t.manifest) return failed_precondition(who + ": the sender already sent its manifest");
  if (more.empty()) return invalid_argument(who + ": no ranges to add");
  const size_t have = t.map.ranges().size();
  if (more.size() > kMaxRanges - have)
    return invalid_argument(who + ": " + std::to_string(have) + " + " + std::to_string(more.size()) +
                            " ranges exceed " + std::to_string(kMaxRanges));
  KVGATE_RETURN_IF_ERROR(check_ranges("extend_receive", more));
  // Appending keeps every logical offset already mapped (landed or landing
  // segments, their CRC jobs) where it was.
  t.map.append(more);
  return wire::encode_grant(wire::Grant{id.value(), t.map.ranges()});
}

Status TransportCore::cancel_receive(TransferId id) {
  auto it = recvs_.find(id.value());
  if (it == recvs_.end()) return not_found("transport: cancel_receive: no " + tid(id.value()));
  if (!it->second.failed) fail_recv(it->second, Status(StatusCode::kCancelled, "transport: cancelled"), true);
  return {};
}

TransportCore::RecvTransfer* TransportCore::claim(PeerId peer, uint64_t transfer_id) {
  auto it = recvs_.find(transfer_id);
  if (it == recvs_.end()) return nullptr;
  RecvTransfer& t = it->second;
  if (!t.peer.valid()) t.peer = peer;
  return t.peer == peer ? &t : nullptr;
}

Result<TransportCore::Landing> TransportCore::on_segment_header(std::span<const std::byte> header,
                                                                size_t payload_bytes) {
  auto decoded = wire::decode(header);
  if (!decoded.ok() || decoded->type != wire::WireType::kSegment) {
    Status s = decoded.ok() ? invalid_argument("transport: data header is not a Segment") : decoded.status();
    count_malformed(s);
    return s;
  }
  PeerId peer;
  Conn* c = conn_by_remote_nonce(decoded->nonce, peer);
  if (!c) {
    ++counters_.dropped_messages;
    return unavailable("transport: data from an unauthenticated endpoint");
  }
  const auto& seg = std::get<wire::Segment>(decoded->body);
  if (c->peer_op != wire::DataOp::kActiveMessage) {
    Status s = invalid_argument("transport: data message from a peer that announced put");
    count_malformed(s);
    return s;
  }
  RecvTransfer* t = claim(peer, seg.transfer_id);
  if (!t || t->failed) {
    ++counters_.dropped_messages;
    return not_found("transport: no live " + tid(seg.transfer_id) + " for this peer");
  }
  Status bad;
  if (t->manifest) {
    bad = data_loss("transport: " + tid(seg.transfer_id) + ": segment after the manifest");
  } else if (seg.length_bytes != payload_bytes) {
    bad = data_loss("transport: " + tid(seg.transfer_id) + ": segment " + std::to_string(seg.index) +
                    " announces " + std::to_string(seg.length_bytes) + " bytes, carries " +
                    std::to_string(payload_bytes));
  } else if (seg.index < t->segs.size() && t->segs[seg.index].state != SegState::kNone) {
    bad = data_loss("transport: " + tid(seg.transfer_id) + ": segment " + std::to_string(seg.index) +
                    " sent twice");
  }
  if (!bad.ok()) {
    count_malformed(bad);
    fail_recv(*t, bad, true);
    return bad;
  }
  pieces_scratch_.clear();
  Status fit = t->map.map(seg.offset_bytes, seg.length_bytes, pieces_scratch_);
  if (!fit.ok()) {
    fail_recv(*t, fit, true);
    return fit;
  }
  if (seg.index >= t->segs.size()) t->segs.resize(seg.index + 1);
  t->segs[seg.index] = {seg.offset_bytes, seg.length_bytes, SegState::kInFlight};
  ++t->landing;
  Landing landing;
  landing.cookie = next_cookie_++;
  landing.peer = peer;
  ops_[landing.cookie] = {OpRef::kRecv, peer.value(), seg.transfer_id, seg.index};
  landing.pieces.reserve(pieces_scratch_.size());
  for (const auto& p : pieces_scratch_)
    landing.pieces.emplace_back(region_ + p.region_offset, static_cast<size_t>(p.length_bytes));
  return landing;
}

void TransportCore::segment_landed(uint64_t cookie, Status status, std::optional<uint32_t> crc) {
  auto op = ops_.find(cookie);
  if (op == ops_.end()) return;
  const OpRef ref = op->second;
  ops_.erase(op);
  auto it = recvs_.find(ref.transfer);
  if (it == recvs_.end() || it->second.peer.value() != ref.peer) return;
  RecvTransfer& t = it->second;
  --t.landing;
  RecvSeg& seg = t.segs[ref.segment];
  seg.state = status.ok() ? SegState::kDone : SegState::kNone;
  if (status.ok() && !t.failed) {
    // A test hook that alters landed bytes needs the pass over the pages.
    if (crc && !hooks_.before_verify) {
      seg.crc = *crc;
      seg.crc_bytes = seg.length;
      ++counters_.segments_checksummed_landing;
    } else {
      crc_jobs_.push_back({TransferSide::kReceive, ref.peer, ref.transfer, ref.segment});
    }
    note_landed(t, ref.segment);
  }
  if (!status.ok() && !t.failed)
    fail_recv(t, unavailable("transport: " + tid(t.id.value()) + ": segment " +
                             std::to_string(ref.segment) + " failed: " + status.message()), true);
}

void TransportCore::handle_manifest(PeerId peer, wire::Manifest manifest) {
  RecvTransfer* t = claim(peer, manifest.transfer_id);
  if (!t) {
    ++counters_.dropped_messages;
    return;
  }
  if (t->failed) {
    t->await_stop = false;  // the sender finished: nothing of it is in flight
    return;
  }
  if (t->manifest) {
    Status s = data_loss("transport: " + tid(manifest.transfer_id) + ": second manifest");
    count_malformed(s);
    fail_recv(*t, s, true);
    return;
  }
  t->manifest = std::move(manifest);
}

void TransportCore::handle_stopped(PeerId peer, const wire::Verdict& v) {
  RecvTransfer* t = claim(peer, v.transfer_id);
  if (!t) {
    ++counters_.dropped_messages;
    return;
  }
  if (!t->failed) fail_recv(*t, Status(v.code, "peer: " + v.reason), false);
  t->await_stop = false;
}

Status TransportCore::check_structure(RecvTransfer& t) {
  const auto& man = *t.manifest;
  const std::string who = "transport: " + tid(t.id.value());
  if (!t.segs.empty() || conn(t.peer)->peer_op == wire::DataOp::kActiveMessage) {
    if (t.segs.size() > man.segments.size())
      return data_loss(who + ": received segment " + std::to_string(t.segs.size() - 1) +
                       " beyond the manifest's " + std::to_string(man.segments.size()));
    for (size_t i = 0; i < man.segments.size(); ++i) {
      if (i >= t.segs.size() || t.segs[i].state != SegState::kDone)
        return data_loss(who + ": segment " + std::to_string(i) + " was never received");
      if (t.segs[i].offset != man.segments[i].offset_bytes || t.segs[i].length != man.segments[i].length_bytes)
        return data_loss(who + ": segment " + std::to_string(i) + " disagrees with the manifest");
    }
    return {};
  }
  // Put: the sender wrote the pages itself; the manifest names the segments.
  for (const auto& e : man.segments) {
    pieces_scratch_.clear();
    KVGATE_RETURN_IF_ERROR(t.map.map(e.offset_bytes, e.length_bytes, pieces_scratch_));
  }
  t.segs.resize(man.segments.size());
  for (size_t i = 0; i < man.segments.size(); ++i) {
    const auto& e = man.segments[i];
    t.segs[i] = {e.offset_bytes, e.length_bytes, SegState::kDone};
    if (e.length_bytes > 0)
      crc_jobs_.push_back({TransferSide::kReceive, t.peer.value(), t.id.value(), static_cast<uint32_t>(i)});
    // The sender flushed its puts before the manifest: the bytes are in.
    note_landed(t, static_cast<uint32_t>(i));
  }
  return {};
}

bool TransportCore::crc_step(uint64_t budget) {
  while (crc_head_ < crc_jobs_.size() && budget > 0) {
    const CrcJob j = crc_jobs_[crc_head_];
    if (j.side == TransferSide::kSend) {
      auto it = sends_.find({j.peer, j.transfer});
      if (it == sends_.end() || it->second.failed || j.segment >= it->second.segs.size()) {
        ++crc_head_;
        continue;
      }
      SendSeg& s = it->second.segs[j.segment];
      const uint64_t n = std::min(budget, s.length - s.crc_bytes);
      s.crc = link_crc32c(s.data + s.crc_bytes, n, s.crc);
      s.crc_bytes += n;
      budget -= n;
      if (s.crc_bytes == s.length) ++crc_head_;
      continue;
    }
    auto it = recvs_.find(j.transfer);
    if (it == recvs_.end() || it->second.failed || it->second.peer.value() != j.peer ||
        j.segment >= it->second.segs.size()) {
      ++crc_head_;
      continue;
    }
    RecvTransfer& t = it->second;
    RecvSeg& s = t.segs[j.segment];
    if (s.state != SegState::kDone || s.crc_bytes == s.length) {
      ++crc_head_;
      continue;
    }
    pieces_scratch_.clear();
    if (s.crc_bytes == 0 && hooks_.before_verify) {
      if (t.map.map(s.offset, s.length, pieces_scratch_).ok())
        hooks_.before_verify(t.id, j.segment,
                             {region_ + pieces_scratch_[0].region_offset, pieces_scratch_[0].length_bytes});
      pieces_scratch_.clear();
    }
    const uint64_t n = std::min(budget, s.length - s.crc_bytes);
    if (!t.map.map(s.offset + s.crc_bytes, n, pieces_scratch_).ok()) {
      ++crc_head_;  // cannot happen: the segment was mapped when it arrived
      continue;
    }
    for (const auto& p : pieces_scratch_) s.crc = link_crc32c(region_ + p.region_offset, p.length_bytes, s.crc);
    s.crc_bytes += n;
    budget -= n;
    if (s.crc_bytes == s.length) ++crc_head_;
  }
  if (crc_head_ == crc_jobs_.size()) {
    crc_jobs_.clear();
    crc_head_ = 0;
    return false;
  }
  return true;
}

// After check_structure and once every segment is checksummed.
Status TransportCore::verify(RecvTransfer& t) {
  const auto& man = *t.manifest;
  for (size_t i = 0; i < man.segments.size(); ++i) {
    const auto& s = t.segs[i];
    if (s.crc != man.segments[i].crc32c)
      return data_loss("transport: " + tid(t.id.value()) + ": segment " + std::to_string(i) + " CRC32C " +
                       hex32(s.crc) + " != manifest " + hex32(man.segments[i].crc32c));
  }
  return {};
}

void TransportCore::fail_recv(RecvTransfer& t, Status status, bool tell_peer) {
  t.failed = true;
  // Notices not yet delivered are withdrawn: the owner hears of no landing
  // after the transfer failed.
  if (!landed_.empty())
    std::erase_if(landed_, [&](const SegmentLanded& n) { return n.id == t.id; });
  t.status = std::move(status);
  t.quiesce_deadline = Clock::now() + options_.quiesce_timeout;
  Conn* c = t.peer.valid() ? conn(t.peer) : nullptr;
  if (tell_peer && c && !c->lost) {
    send_control(t.peer, *c, wire::WireType::kResult,
                 wire::Verdict{t.id.value(), t.status.code(), t.status.message()});
    // Until the sender confirms (Stopped) or finished (manifest), its data
    // may still be on the way into the pages.
    t.await_stop = !t.manifest;
  }
}

bool TransportCore::advance_recv(RecvTransfer& t, Clock::time_point now) {
  if (!t.failed && now >= t.deadline)
    fail_recv(t, Status(StatusCode::kDeadlineExceeded, "transport: " + tid(t.id.value()) +
                        ": deadline passed before the transfer completed"), true);
  if (!t.failed && t.manifest && t.landing == 0 && !t.checked) {
    Status s = check_structure(t);
    if (s.ok()) {
      t.checked = true;
    } else {
      fail_recv(t, std::move(s), true);
    }
  }
  bool summed = t.checked;
  for (size_t i = 0; summed && i < t.segs.size(); ++i) summed = t.segs[i].crc_bytes == t.segs[i].length;
  if (!t.failed && summed) {
    Status s = verify(t);
    if (s.ok()) {
      Conn* c = conn(t.peer);
      send_control(t.peer, *c, wire::WireType::kResult, wire::Verdict{t.id.value(), StatusCode::kOk, ""});
      emit(TransferSide::kReceive, t.id, t.peer, {}, t.manifest->total_bytes,
           static_cast<uint32_t>(t.manifest->segments.size()), t.start);
      return true;
    }
    fail_recv(t, std::move(s), true);
  }
  if (t.failed && ((t.landing == 0 && !t.await_stop) || now >= t.quiesce_deadline)) {
    uint64_t landed = 0;
    uint32_t n = 0;
    for (const auto& s : t.segs)
      if (s.state == SegState::kDone) landed += s.length, ++n;
    emit(TransferSide::kReceive, t.id, t.peer, t.status, landed, n, t.start);
    return true;
  }
  return false;
}

// --------------------------------------------------------------- sender

Status TransportCore::begin_send(PeerId peer, TransferId id, std::span<const std::byte> grant,
                                 Clock::time_point deadline) {
  Conn* c = conn(peer);
  if (!c) return invalid_argument("transport: begin_send: unknown peer " + std::to_string(peer.value()));
  if (sends_.count({peer.value(), id.value()}))
    return invalid_argument("transport: begin_send: " + tid(id.value()) + " already started");
  KVGATE_ASSIGN_OR_RETURN(wire::Grant g, wire::decode_grant(grant));
  if (g.transfer_id != id.value())
    return invalid_argument("transport: begin_send: the grant is for " + tid(g.transfer_id) +
                            ", not " + tid(id.value()));
  SendTransfer t;
  t.peer = peer;
  t.id = id;
  t.map = wire::RangeMap(std::move(g.ranges));
  t.start = Clock::now();
  t.deadline = deadline;
  auto& stored = sends_[{peer.value(), id.value()}] = std::move(t);
  if (c->lost) fail_send(stored, unavailable("transport: peer is gone"), false);
  return {};
}

Status TransportCore::extend_send(PeerId peer, TransferId id, std::span<const std::byte> grant) {
  const std::string who = "transport: extend_send: " + tid(id.value());
  auto it = sends_.find({peer.value(), id.value()});
  if (it == sends_.end()) return invalid_argument(who + " was not begun with peer " + std::to_string(peer.value()));
  SendTransfer& t = it->second;
  if (t.finish_requested) return invalid_argument(who + ": after finish (no segment can use it)");
  if (t.failed) return Status(t.status.code(), who + " already failed: " + t.status.message());
  auto g = wire::decode_grant(grant);
  if (!g.ok()) return invalid_argument(who + ": malformed grant: " + g.status().message());
  if (g->transfer_id != id.value())
    return invalid_argument(who + ": the grant is for " + tid(g->transfer_id));
  const auto& old = t.map.ranges();
  if (g->ranges.size() < old.size())
    return invalid_argument(who + ": the grant has " + std::to_string(g->ranges.size()) +
                            " ranges, fewer than the " + std::to_string(old.size()) + " already granted");
  for (size_t i = 0; i < old.size(); ++i) {
    const DestRange& a = old[i];
    const DestRange& b = g->ranges[i];
    if (!(a == b))
      return invalid_argument(who + ": range " + std::to_string(i) + " is [" + std::to_string(b.offset_bytes) +
                              ", +" + std::to_string(b.length_bytes) + "), the granted one is [" +
                              std::to_string(a.offset_bytes) + ", +" + std::to_string(a.length_bytes) +
                              ") (an extension only appends ranges)");
  }
  // Segments already issued keep the pieces they were mapped to; later
  // ones (and queued ones, in put mode mapped at issue) may use the new bytes.
  t.map.append(std::span(g->ranges).subspan(old.size()));
  return {};
}

Status TransportCore::send_segment(PeerId peer, TransferId id, uint32_t index, const std::byte* data,
                                   size_t bytes, uint64_t remote_offset, std::optional<uint32_t> crc) {
  auto it = sends_.find({peer.value(), id.value()});
  if (it == sends_.end()) return invalid_argument("transport: send_segment: no " + tid(id.value()));
  SendTransfer& t = it->second;
  if (t.finish_requested) return invalid_argument("transport: send_segment after finish");
  if (index >= kMaxSegments) return invalid_argument("transport: segment index over kMaxSegments");
  if (bytes == 0 || data == nullptr) return invalid_argument("transport: empty segment");
  if (index < t.segs.size() && t.segs[index].state != SegState::kNone)
    return invalid_argument("transport: segment " + std::to_string(index) + " already sent");
  if (t.failed) return t.status;
  if (index >= t.segs.size()) t.segs.resize(index + 1);
  SendSeg& s = t.segs[index];
  // A CRC handed over is final at once: no checksum pass over the bytes.
  s = {remote_offset, bytes, crc.value_or(0), crc ? bytes : 0, data, SegState::kQueued};
  const bool check = op_ == wire::DataOp::kPut || !hooks_.skip_sender_range_check;
  if (check && (remote_offset > t.map.total_bytes() || bytes > t.map.total_bytes() - remote_offset)) {
    Status st = out_of_range("transport: " + tid(id.value()) + ": segment " + std::to_string(index) +
                             " [" + std::to_string(remote_offset) + ", +" + std::to_string(bytes) +
                             ") overruns the " + std::to_string(t.map.total_bytes()) + " bytes granted");
    fail_send(t, st, true);
    return st;
  }
  Conn* c = conn(peer);
  if (c->ready || hooks_.send_before_handshake) issue(t, index);
  return {};
}

void TransportCore::send_begin(SendTransfer& t, Conn& c) {
  if (t.begun) return;
  t.begun = true;
  send_control(t.peer, c, wire::WireType::kBegin, wire::Begin{t.id.value()});
}

void TransportCore::issue(SendTransfer& t, uint32_t index) {
  SendSeg& s = t.segs[index];
  Conn* c = conn(t.peer);
  send_begin(t, *c);
  SegmentOp op;
  op.peer = t.peer;
  op.cookie = next_cookie_++;
  op.data = s.data;
  op.bytes = s.length;
  if (op_ == wire::DataOp::kPut) {
    Status fit = t.map.map(s.offset, s.length, op.remote);
    if (!fit.ok()) return fail_send(t, fit, true);
  } else {
    wire::encode_segment(c->local_nonce, {t.id.value(), index, s.offset, s.length}, op.header);
  }
  s.state = SegState::kInFlight;
  ++t.in_flight;
  ops_[op.cookie] = {OpRef::kSend, t.peer.value(), t.id.value(), index};
  const uint64_t cookie = op.cookie;
  Status st = link_send_segment(std::move(op));
  if (!st.ok()) segment_sent(cookie, st);
}

void TransportCore::segment_sent(uint64_t cookie, Status status) {
  auto op = ops_.find(cookie);
  if (op == ops_.end()) return;
  const OpRef ref = op->second;
  ops_.erase(op);
  auto it = sends_.find({ref.peer, ref.transfer});
  if (it == sends_.end()) return;
  SendTransfer& t = it->second;
  --t.in_flight;
  t.segs[ref.segment].state = SegState::kDone;
  // Checksummed now, in progress(): the link just read these bytes, so they
  // are likely still in cache, and the wire never waited for the CRC.
  if (status.ok() && !t.failed && t.segs[ref.segment].crc_bytes < t.segs[ref.segment].length) {
    crc_jobs_.push_back({TransferSide::kSend, ref.peer, ref.transfer, ref.segment});
  }
  if (!status.ok() && !t.failed)
    fail_send(t, unavailable("transport: " + tid(t.id.value()) + ": segment " + std::to_string(ref.segment) +
                             " failed: " + status.message()), true);
}

void TransportCore::flushed(uint64_t cookie, Status status) {
  auto op = ops_.find(cookie);
  if (op == ops_.end()) return;
  const OpRef ref = op->second;
  ops_.erase(op);
  auto it = sends_.find({ref.peer, ref.transfer});
  if (it == sends_.end()) return;
  SendTransfer& t = it->second;
  t.flush_in_flight = false;
  t.flushed = status.ok();
  if (!status.ok() && !t.failed)
    fail_send(t, unavailable("transport: " + tid(t.id.value()) + ": flush failed: " + status.message()), true);
}

Status TransportCore::finish(PeerId peer, TransferId id) {
  auto it = sends_.find({peer.value(), id.value()});
  if (it == sends_.end()) return invalid_argument("transport: finish: no " + tid(id.value()));
  SendTransfer& t = it->second;
  if (t.finish_requested) return invalid_argument("transport: finish called twice");
  for (size_t i = 0; i < t.segs.size(); ++i)
    if (t.segs[i].state == SegState::kNone)
      return invalid_argument("transport: finish: segment " + std::to_string(i) + " missing (indexes must be 0..n-1)");
  t.finish_requested = true;
  return {};
}

Status TransportCore::cancel_send(PeerId peer, TransferId id) {
  auto it = sends_.find({peer.value(), id.value()});
  if (it == sends_.end()) return not_found("transport: cancel_send: no " + tid(id.value()));
  if (!it->second.failed) fail_send(it->second, Status(StatusCode::kCancelled, "transport: cancelled"), true);
  return {};
}

void TransportCore::handle_result(PeerId peer, const wire::Verdict& v) {
  auto it = sends_.find({peer.value(), v.transfer_id});
  if (it == sends_.end()) {
    ++counters_.dropped_messages;
    return;
  }
  SendTransfer& t = it->second;
  if (v.code == StatusCode::kOk) {
    if (!t.manifest_sent) {
      count_malformed(invalid_argument("OK verdict before the manifest"));
      return;
    }
    t.verdict_ok = true;
    return;
  }
  Status s(v.code, "peer: " + v.reason);
  if (t.manifest_sent) {  // nothing in flight: report now
    t.failed = true;
    t.status = std::move(s);
    t.notify_peer = false;
    return;
  }
  if (!t.failed) fail_send(t, std::move(s), true);
}

void TransportCore::fail_send(SendTransfer& t, Status status, bool notify_peer) {
  t.failed = true;
  t.status = std::move(status);
  t.notify_peer = notify_peer;
  t.quiesce_deadline = Clock::now() + options_.quiesce_timeout;
}

bool TransportCore::advance_send(SendTransfer& t, Clock::time_point now) {
  Conn* c = conn(t.peer);
  if (!t.failed && now >= t.deadline)
    fail_send(t, Status(StatusCode::kDeadlineExceeded, "transport: " + tid(t.id.value()) +
                        ": deadline passed before the receiver confirmed"), true);
  if (t.failed) {
    if ((t.in_flight == 0 && !t.flush_in_flight) || now >= t.quiesce_deadline) {
      if (t.notify_peer && c && !c->lost && !t.manifest_sent)
        send_control(t.peer, *c, wire::WireType::kStopped,
                     wire::Verdict{t.id.value(), t.status.code(), t.status.message()});
      uint64_t bytes = 0;
      uint32_t n = 0;
      for (const auto& s : t.segs)
        if (s.state == SegState::kDone) bytes += s.length, ++n;
      emit(TransferSide::kSend, t.id, t.peer, t.status, bytes, n, t.start);
      return true;
    }
    return false;
  }
  if (t.verdict_ok) {
    uint64_t bytes = 0;
    for (const auto& s : t.segs) bytes += s.length;
    emit(TransferSide::kSend, t.id, t.peer, {}, bytes, static_cast<uint32_t>(t.segs.size()), t.start);
    return true;
  }
  if (c->ready) send_begin(t, *c);
  if (c->ready)
    for (uint32_t i = 0; i < t.segs.size() && !t.failed; ++i)
      if (t.segs[i].state == SegState::kQueued) issue(t, i);
  if (t.failed || !t.finish_requested || t.manifest_sent || t.in_flight != 0 || !c->ready) return false;
  for (const auto& s : t.segs)
    if (s.crc_bytes != s.length) return false;  // still being checksummed
  if (op_ == wire::DataOp::kPut && !t.flushed) {
    if (!t.flush_in_flight) {
      const uint64_t cookie = next_cookie_++;
      ops_[cookie] = {OpRef::kFlush, t.peer.value(), t.id.value(), 0};
      t.flush_in_flight = true;
      Status st = link_flush(t.peer, cookie);
      if (!st.ok()) flushed(cookie, st);
    }
    return false;
  }
  wire::Manifest m;
  m.transfer_id = t.id.value();
  m.segments.reserve(t.segs.size());
  for (const auto& s : t.segs) {
    m.segments.push_back({s.offset, s.length, s.crc});
    m.total_bytes += s.length;
  }
  send_control(t.peer, *c, wire::WireType::kManifest, std::move(m));
  t.manifest_sent = true;
  return false;
}

// ------------------------------------------------------------- dispatch

void TransportCore::on_control(std::span<const std::byte> bytes) {
  auto decoded = wire::decode(bytes);
  if (!decoded.ok()) {
    count_malformed(decoded.status());
    return;
  }
  wire::Message& m = *decoded;
  switch (m.type) {
    case wire::WireType::kHello:
      return handle_hello(m.nonce, std::move(std::get<wire::Hello>(m.body)));
    case wire::WireType::kHelloAck:
      return handle_hello_ack(m.nonce, std::get<wire::HelloAck>(m.body));
    default:
      break;
  }
  PeerId peer;
  if (!conn_by_remote_nonce(m.nonce, peer)) {
    ++counters_.dropped_messages;
    return;
  }
  switch (m.type) {
    case wire::WireType::kManifest:
      return handle_manifest(peer, std::move(std::get<wire::Manifest>(m.body)));
    case wire::WireType::kResult:
      return handle_result(peer, std::get<wire::Verdict>(m.body));
    case wire::WireType::kStopped:
      return handle_stopped(peer, std::get<wire::Verdict>(m.body));
    case wire::WireType::kGoodbye:
      return peer_lost(peer, unavailable("transport: peer shut down"));
    case wire::WireType::kBegin:
      if (!claim(peer, std::get<wire::Begin>(m.body).transfer_id)) ++counters_.dropped_messages;
      return;
    default:  // a Segment header as a control message
      count_malformed(invalid_argument("transport: unexpected message type on the control path"));
      return;
  }
}

void TransportCore::emit(TransferSide side, TransferId id, PeerId peer, Status status, uint64_t bytes,
                         uint32_t segments, Clock::time_point start) {
  if (status.ok()) {
    ++counters_.transfers_ok;
  } else {
    ++counters_.transfers_failed;
  }
  events_.push_back({side, id, peer, std::move(status), bytes, segments, Clock::now() - start});
}

void TransportCore::advance() {
  const auto now = Clock::now();
  for (auto it = sends_.begin(); it != sends_.end();)
    it = advance_send(it->second, now) ? sends_.erase(it) : std::next(it);
  for (auto it = recvs_.begin(); it != recvs_.end();)
    it = advance_recv(it->second, now) ? recvs_.erase(it) : std::next(it);
}

size_t TransportCore::progress(std::vector<TransferEvent>& events) {
  link_progress();
  for (uint64_t done = 0; done < kCrcPerProgressBytes && crc_step(kCrcChunkBytes); done += kCrcChunkBytes)
    link_progress();
  advance();
  deliver_landed();  // before this call's events: a notice precedes its OK
  const size_t n = events_.size();
  for (auto& e : events_) events.push_back(std::move(e));
  events_.clear();
  return n;
}

}  // namespace kvgate::transport
