#include "transport/nccl/nccl_transport.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>

namespace kvgate::transport {

namespace {

constexpr uint32_t kAddressMagic = 0x4E47564Bu;  // "KVGN"
constexpr uint8_t kAddressVersion = 1;
// Frames on the control link: a type byte, then the body.
enum FrameType : uint8_t { kIdent = 1, kCore = 2, kPut = 3 };
// Most pieces one Put frame may name (a segment of kMaxRanges pages).
constexpr uint64_t kMaxPutPieces = kMaxRanges;

void put_u(Bytes& out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(std::byte(static_cast<uint8_t>(v >> (8 * i))));
}

// A bounded little-endian reader over an untrusted frame.
struct Reader {
  std::span<const std::byte> a;
  size_t at = 0;
  bool get(int n, uint64_t& v) {
    if (a.size() - at < static_cast<size_t>(n)) return false;
    v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t(static_cast<uint8_t>(a[at + i])) << (8 * i);
    at += n;
    return true;
  }
  bool blob(std::span<const std::byte>& out, uint64_t max) {
    uint64_t n = 0;
    if (!get(4, n) || n > max || a.size() - at < n) return false;
    out = a.subspan(at, n);
    at += n;
    return true;
  }
  bool done() const { return at == a.size(); }
};

struct ParsedAddress {
  int rank = 0, world = 0;
  std::span<const std::byte> control;
};

Result<ParsedAddress> parse_address(std::span<const std::byte> a) {
  Reader r{a};
  uint64_t magic = 0, version = 0, rank = 0, world = 0;
  if (!r.get(4, magic) || magic != kAddressMagic) return invalid_argument("transport: nccl: not an nccl address");
  if (!r.get(1, version) || version != kAddressVersion)
    return invalid_argument("transport: nccl: address version unknown");
  ParsedAddress p;
  if (!r.get(4, rank) || !r.get(4, world) || !r.blob(p.control, wire::kMaxAddressBytes) || !r.done() ||
      world == 0 || rank >= world)
    return invalid_argument("transport: nccl: malformed address");
  p.rank = static_cast<int>(rank);
  p.world = static_cast<int>(world);
  return p;
}

std::mutex& provider_mu() {
  static std::mutex mu;
  return mu;
}
NcclLinkProvider& provider() {
  static NcclLinkProvider p;
  return p;
}

}  // namespace

void set_nccl_link_provider(NcclLinkProvider p) {
  std::lock_guard lock(provider_mu());
  provider() = std::move(p);
}

Result<std::unique_ptr<Transport>> create_nccl_transport_from_provider(const TransportOptions& options) {
  NcclLinkProvider p;
  {
    std::lock_guard lock(provider_mu());
    p = provider();
  }
  if (!p)
    return unimplemented(
        "transport: nccl: cannot be built from the config alone: a nccl transport needs this rank's NCCL "
        "communicator (an NcclDataLink, e.g. NcclCommLink over a communicator formed through the "
        "coordinator's tensor-parallel bootstrap) and a control link; call set_nccl_link_provider() "
        "once at startup, or build one with NcclTransport::create(options, links)");
  KVGATE_ASSIGN_OR_RETURN(NcclLinks links, p());
  return NcclTransport::create(options, std::move(links));
}

Result<std::unique_ptr<Transport>> NcclTransport::create(const TransportOptions& options, NcclLinks links) {
  if (!links.data || !links.control) return invalid_argument("transport: nccl: a data link and a control link are needed");
  if (options.region == nullptr && options.region_bytes != 0)
    return invalid_argument("transport: nccl: region_bytes without a region");
  if (links.data->world() < 2) return invalid_argument("transport: nccl: the communicator has fewer than 2 ranks");
  return std::unique_ptr<Transport>(new NcclTransport(options, std::move(links)));
}

NcclTransport::NcclTransport(const TransportOptions& options, NcclLinks links)
    : TransportCore(options, wire::DataOp::kPut),
      data_(std::move(links.data)),
      control_(std::move(links.control)),
      token_(options.cluster_token) {
  put_u(address_, kAddressMagic, 4);
  put_u(address_, kAddressVersion, 1);
  put_u(address_, static_cast<uint32_t>(data_->rank()), 4);
  put_u(address_, static_cast<uint32_t>(data_->world()), 4);
  const Bytes c = control_->address();
  put_u(address_, c.size(), 4);
  address_.insert(address_.end(), c.begin(), c.end());
}

NcclTransport::~NcclTransport() {
  say_goodbye();
  control_.reset();  // closes the channels: peers see this side go
  data_.reset();
}

uint32_t NcclTransport::link_crc32c(const std::byte* data, size_t bytes, uint32_t seed) {
  return data_->crc32c(data, bytes, seed);
}

Status NcclTransport::send_frame(int rank, Bytes frame) {
  auto it = out_.find(rank);
  if (it == out_.end()) return unavailable("transport: nccl: no channel to rank " + std::to_string(rank));
  return control_->send(it->second.channel, std::move(frame));
}

Status NcclTransport::link_connect(PeerId peer, std::span<const std::byte> address) {
  KVGATE_ASSIGN_OR_RETURN(ParsedAddress a, parse_address(address));
  if (a.world != data_->world())
    return invalid_argument("transport: nccl: the peer's communicator has " + std::to_string(a.world) +
                            " ranks, ours " + std::to_string(data_->world()));
  if (a.rank == data_->rank())
    return invalid_argument("transport: nccl: the peer is this rank (" + std::to_string(a.rank) + ")");
  if (!out_.count(a.rank)) {
    KVGATE_ASSIGN_OR_RETURN(auto channel, control_->open(a.control));
    Bytes ident{std::byte{kIdent}};
    put_u(ident, static_cast<uint32_t>(data_->rank()), 4);
    put_u(ident, static_cast<uint32_t>(data_->world()), 4);
    put_u(ident, token_.size(), 4);
    for (char ch : token_) ident.push_back(std::byte(static_cast<uint8_t>(ch)));
    KVGATE_RETURN_IF_ERROR(control_->send(channel, std::move(ident)));
    out_[a.rank] = {channel};
  }
  peer_rank_[peer.value()] = a.rank;
  return {};
}

Status NcclTransport::link_send_control(PeerId peer, Bytes message) {
  Bytes frame;
  frame.reserve(message.size() + 1);
  frame.push_back(std::byte{kCore});
  frame.insert(frame.end(), message.begin(), message.end());
  return send_frame(peer_rank_.at(peer.value()), std::move(frame));
}

Status NcclTransport::link_send_segment(SegmentOp op) {
  const int rank = peer_rank_.at(op.peer.value());
  SendOp s;
  s.cookie = op.cookie;
  Bytes frame{std::byte{kPut}};
  put_u(frame, 0, 4);  // piece count, filled below
  uint64_t at = 0;
  for (const auto& p : op.remote) {
    auto id = data_->post_send(rank, op.data + at, p.length_bytes);
    if (!id.ok()) {
      // Announce only what was posted: the pair stays in step.
      s.error = id.status();
      break;
    }
    s.ops.push_back(*id);
    put_u(frame, p.region_offset, 8);
    put_u(frame, p.length_bytes, 8);
    at += p.length_bytes;
  }
  const uint32_t n = static_cast<uint32_t>(s.ops.size());
  std::memcpy(frame.data() + 1, &n, 4);  // little-endian hosts only (as the rest of the wire)
  if (n > 0) {
    Status st = send_frame(rank, std::move(frame));
    if (!st.ok() && s.error.ok()) s.error = st;
  }
  if (s.ops.empty()) return s.error.ok() ? internal_error("transport: nccl: segment without pieces") : s.error;
  sends_.push_back(std::move(s));
  return {};
}

Status NcclTransport::link_flush(PeerId, uint64_t cookie) {
  // The receiver hands the manifest to its core only after its receives
  // of every earlier Put frame finished: nothing to wait for here.
  flushes_.push_back(cookie);
  return {};
}

void NcclTransport::lose_rank(int rank, const Status& why) {
  std::vector<uint64_t> peers;
  for (const auto& [peer, r] : peer_rank_)
    if (r == rank) peers.push_back(peer);
  for (uint64_t p : peers) peer_lost(PeerId(p), why);
}

void NcclTransport::break_pair(NcclControlLink::ChannelId id, Inbound& in, const Status& why) {
  in.broken = true;
  in.queue.clear();
  control_->close(id);
  in.closed = true;
  if (in.rank < 0) return;
  if (auto out = out_.find(in.rank); out != out_.end()) {
    control_->close(out->second.channel);  // the peer hears of it: its channel closes
    out_.erase(out);
  }
  lose_rank(in.rank, data_loss("transport: nccl: rank " + std::to_string(in.rank) +
                               " is out of step (every later transfer with it would mismatch): " +
                               why.message()));
}

void NcclTransport::handle_ident(Inbound& in, std::span<const std::byte> body) {
  Reader r{body};
  uint64_t rank = 0, world = 0;
  std::span<const std::byte> token;
  if (in.rank >= 0 || !r.get(4, rank) || !r.get(4, world) || !r.blob(token, wire::kMaxAddressBytes) || !r.done()) {
    count_malformed(invalid_argument("transport: nccl: malformed or repeated Ident"));
    return;
  }
  if (world != static_cast<uint64_t>(data_->world()) || rank >= world || rank == static_cast<uint64_t>(data_->rank()))
    return;  // not a rank of this communicator: never honoured
  in.rank = static_cast<int>(rank);
  const std::string_view t(reinterpret_cast<const char*>(token.data()), token.size());
  if (!wire::tokens_equal(t, token_)) return;
  for (const auto& [id, other] : in_)
    if (&other != &in && other.authed && !other.closed && other.rank == in.rank) return;
  in.authed = true;
}

bool NcclTransport::handle_put(NcclControlLink::ChannelId id, Inbound& in, std::span<const std::byte> body) {
  if (!in.authed) return true;  // never posted: its sends stay unmatched
  Reader r{body};
  uint64_t n = 0;
  std::vector<std::pair<uint64_t, uint64_t>> pieces;
  bool ok = r.get(4, n) && n > 0 && n <= kMaxPutPieces;
  for (uint64_t i = 0; ok && i < n; ++i) {
    uint64_t off = 0, len = 0;
    ok = r.get(8, off) && r.get(8, len) && len > 0 && off <= region_bytes() && len <= region_bytes() - off;
    pieces.emplace_back(off, len);
  }
  if (!ok || !r.done()) {
    Status why = data_loss("transport: nccl: rank " + std::to_string(in.rank) +
                           " announced data outside the region or a malformed Put frame");
    count_malformed(why);
    break_pair(id, in, why);
    return false;
  }
  for (const auto& [off, len] : pieces) {
    auto op = data_->post_recv(in.rank, region() + off, len);
    if (!op.ok()) {
      break_pair(id, in, unavailable("transport: nccl: posting a receive failed: " + op.status().message()));
      return false;
    }
    recvs_.push_back({id, *op});
    ++in.outstanding;
  }
  return true;
}

void NcclTransport::drain(NcclControlLink::ChannelId id, Inbound& in) {
  while (!in.queue.empty() && !in.broken) {
    const Bytes& f = in.queue.front();
    if (f.empty()) {
      count_malformed(invalid_argument("transport: nccl: empty frame"));
    } else {
      const auto type = static_cast<uint8_t>(f[0]);
      const auto body = std::span<const std::byte>(f).subspan(1);
      if (type == kCore) {
        if (in.outstanding > 0) return;  // behind the bytes announced before it
        on_control(body);
      } else if (type == kPut) {
        if (!handle_put(id, in, body)) break;
      } else if (type == kIdent) {
        handle_ident(in, body);
      } else {
        count_malformed(invalid_argument("transport: nccl: unknown frame type " + std::to_string(type)));
      }
    }
    in.queue.pop_front();
  }
}

void NcclTransport::link_progress() {
  // Sends: a segment is sent once all of its pieces are.
  for (auto it = sends_.begin(); it != sends_.end();) {
    auto& ops = it->ops;
    for (auto op = ops.begin(); op != ops.end();) {
      Status error;
      const auto state = data_->poll(*op, &error);
      if (state == NcclDataLink::OpState::kPending) {
        ++op;
        continue;
      }
      if (state == NcclDataLink::OpState::kError && it->error.ok()) it->error = error;
      op = ops.erase(op);
    }
    if (!ops.empty()) {
      ++it;
      continue;
    }
    const uint64_t cookie = it->cookie;
    Status st = std::move(it->error);
    it = sends_.erase(it);
    segment_sent(cookie, std::move(st));
  }
  for (auto it = recvs_.begin(); it != recvs_.end();) {
    Status error;
    const auto state = data_->poll(it->op, &error);
    if (state == NcclDataLink::OpState::kPending) {
      ++it;
      continue;
    }
    const NcclControlLink::ChannelId channel = it->channel;
    it = recvs_.erase(it);
    auto in = in_.find(channel);
    if (in == in_.end()) continue;
    if (in->second.outstanding > 0) --in->second.outstanding;
    if (state == NcclDataLink::OpState::kOk) continue;
    count_malformed(error);
    // Another failure is the sender's to report (its send failed too) and
    // the manifest's CRC32C stands behind it. Out of step, every later
    // receive of the pair would take another segment's bytes: cut it off.
    if (error.code() == StatusCode::kDataLoss && !in->second.broken) break_pair(channel, in->second, error);
  }
  for (uint64_t cookie : std::exchange(flushes_, {})) flushed(cookie, {});

  events_scratch_.clear();
  control_->poll(events_scratch_);
  std::vector<std::pair<NcclControlLink::ChannelId, Status>> closed;
  for (auto& e : events_scratch_) {
    if (e.kind == NcclControlLink::Event::kClosed) {
      closed.emplace_back(e.channel, std::move(e.status));
      continue;
    }
    // Frames on our outbound channels: the peer has nothing to say there.
    bool outbound = false;
    for (const auto& [rank, o] : out_) outbound |= o.channel == e.channel;
    if (outbound) {
      count_malformed(invalid_argument("transport: nccl: frame on an outbound channel"));
      continue;
    }
    in_[e.channel].queue.push_back(std::move(e.frame));
  }
  // Frames first (a Goodbye or a Manifest sent just before the peer went),
  // then the closes: the rank behind a closed channel is gone for every
  // peer id it had.
  for (auto& [id, in] : in_) drain(id, in);
  for (const auto& [channel, why] : closed) {
    int rank = -1;
    if (auto in = in_.find(channel); in != in_.end()) {
      in->second.closed = true;
      rank = in->second.rank;
    }
    for (auto it = out_.begin(); it != out_.end(); ++it) {
      if (it->second.channel != channel) continue;
      rank = it->first;
      out_.erase(it);
      break;
    }
    if (rank >= 0)
      lose_rank(rank, unavailable("transport: nccl: control channel with rank " + std::to_string(rank) +
                                  " closed: " + why.message()));
  }
  // A closed channel is forgotten once nothing of it is pending; frames
  // still behind receives wait for them (the peer's last Manifest).
  for (auto it = in_.begin(); it != in_.end();) {
    const Inbound& in = it->second;
    it = in.closed && (in.queue.empty() || in.broken) && in.outstanding == 0 ? in_.erase(it) : std::next(it);
  }
}

}  // namespace kvgate::transport
