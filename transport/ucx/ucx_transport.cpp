#include "transport/ucx/ucx_transport.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <utility>

#include "common/crc32c.h"

namespace kvgate::transport {

namespace {

constexpr unsigned kAmControl = 0x4B1;
constexpr unsigned kAmData = 0x4B2;
constexpr unsigned kAmTagHeader = 0x4B3;
constexpr uint32_t kAddressMagic = 0x5547564Bu;  // "KVGU"
constexpr uint8_t kAddressVersion = 1;
// How long an unannounced tagged message is held (its header may still be
// on the way), and how many at most.
constexpr auto kHoldUnexpected = std::chrono::seconds(1);
constexpr size_t kMaxHeld = 4096;

struct ParsedAddress {
  Bytes worker;
  uint64_t region_base = 0, region_bytes = 0;
  Bytes rkey;
};

void put_u(Bytes& out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(std::byte(static_cast<uint8_t>(v >> (8 * i))));
}

Result<ParsedAddress> parse_address(std::span<const std::byte> a) {
  size_t at = 0;
  auto get = [&](int n, uint64_t& v) -> bool {
    if (a.size() - at < static_cast<size_t>(n)) return false;
    v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t(static_cast<uint8_t>(a[at + i])) << (8 * i);
    at += n;
    return true;
  };
  auto blob = [&](Bytes& out) -> bool {
    uint64_t n = 0;
    if (!get(4, n) || n > wire::kMaxAddressBytes || a.size() - at < n) return false;
    out.assign(a.begin() + at, a.begin() + at + n);
    at += n;
    return true;
  };
  ParsedAddress p;
  uint64_t magic = 0, version = 0;
  if (!get(4, magic) || magic != kAddressMagic) return invalid_argument("transport: ucx: not a ucx address");
  if (!get(1, version) || version != kAddressVersion)
    return invalid_argument("transport: ucx: address version unknown");
  if (!blob(p.worker) || p.worker.empty() || !get(8, p.region_base) || !get(8, p.region_bytes) ||
      !blob(p.rkey) || at != a.size())
    return invalid_argument("transport: ucx: malformed address");
  return p;
}

uint64_t mix64(uint64_t x) {  // splitmix64's finalizer
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The tag of one segment's payload: unguessable without the sender's
// connection nonce, distinct per (transfer, segment) in practice.
uint64_t segment_tag(uint64_t sender_nonce, uint64_t transfer_id, uint32_t index) {
  return mix64(sender_nonce ^ mix64(transfer_id * 0x9E3779B97F4A7C15ull + index));
}

}  // namespace

struct UcxTransport::Peer {
  UcxTransport* self = nullptr;
  PeerId id;
  ucp_ep_h ep = nullptr;
  ucp_rkey_h rkey = nullptr;
  uint64_t remote_base = 0, remote_bytes = 0;
  bool failed = false;
};

enum OpKind { kControlOp, kSegmentOp, kPutOp, kFlushOp, kRecvOp, kDrainOp };

struct UcxTransport::Op {
  UcxTransport* self = nullptr;
  int kind = kControlOp;
  uint64_t cookie = 0;
  uint32_t remaining = 1;  // outstanding UCX requests (put: one per piece)
  ucs_status_t status = UCS_OK;
  uint64_t peer = 0;                           // tag receive: whose segment
  void* request = nullptr;                     // tag receive: to cancel it
  uint64_t expect_bytes = 0;                   // tag receive: the segment's length
  Bytes buffer;                                // control message
  std::byte header[wire::kSegmentBytes];       // AM data header
  std::vector<ucp_dt_iov_t> iov;               // scattered receive
  // Receive through the copy+crc datatype: where the bytes go, a cursor
  // (the piece holding offset piece_base), and the CRC32C of the bytes
  // [0, crc_next) while fragments come in order.
  std::vector<std::pair<std::byte*, size_t>> pieces;
  size_t piece = 0;
  uint64_t piece_base = 0;
  uint32_t crc = 0;
  uint64_t crc_next = 0;
  bool fused = false;
  bool in_order = true;
};

// UCX's generic datatype for a receive: the receive's buffer is its Op.
struct UcxTransport::LandingDt {
  static void* start_pack(void*, const void*, size_t) { return nullptr; }  // receive only
  static void* start_unpack(void*, void* buffer, size_t) { return buffer; }
  static size_t packed_size(void* state) { return static_cast<Op*>(state)->expect_bytes; }
  static size_t pack(void*, size_t, void*, size_t) { return 0; }
  static void finish(void*) {}

  // One fragment of the payload at `offset`: checksummed while hot (in
  // order only), then copied into the pieces.
  static ucs_status_t unpack(void* state, size_t offset, const void* src, size_t length) {
    Op* op = static_cast<Op*>(state);
    if (offset > op->expect_bytes || length > op->expect_bytes - offset) return UCS_ERR_MESSAGE_TRUNCATED;
    if (offset == op->crc_next) {
      op->crc = crc32c(src, length, op->crc);
      op->crc_next += length;
    } else {
      op->in_order = false;
    }
    if (offset < op->piece_base) {
      op->piece = 0;
      op->piece_base = 0;
    }
    while (op->piece < op->pieces.size() && offset >= op->piece_base + op->pieces[op->piece].second) {
      op->piece_base += op->pieces[op->piece].second;
      ++op->piece;
    }
    const auto* from = static_cast<const std::byte*>(src);
    size_t i = op->piece;
    uint64_t base = op->piece_base, at = offset;
    while (length > 0 && i < op->pieces.size()) {
      const auto [dst, n] = op->pieces[i];
      const uint64_t within = at - base;
      const size_t take = std::min<uint64_t>(length, n - within);
      std::memcpy(dst + within, from, take);
      from += take;
      at += take;
      length -= take;
      if (within + take == n) {
        base += n;
        ++i;
      }
    }
    return UCS_OK;
  }
};

bool UcxTransport::lands_by_copy(const std::vector<std::string>& tls) {
  if (tls.empty()) return false;  // UCX's choice: may be zero-copy
  for (const auto& tl : tls)
    if (tl != "tcp" && tl != "posix" && tl != "sysv" && tl != "self") return false;
  return true;
}

Result<UcxOp> UcxTransport::choose_op(const TransportConfig& config) {
  switch (config.ucx_op) {
    case UcxOp::kAm:
    case UcxOp::kTag:
    case UcxOp::kPut:
      return config.ucx_op;
    case UcxOp::kAuto:
      for (const auto& tl : config.ucx_tls) {
        for (const char* rdma : {"rc", "dc", "ud", "ib", "mlx5"})
          if (tl.rfind(rdma, 0) == 0) return UcxOp::kPut;
      }
      return UcxOp::kAm;
  }
  return invalid_argument("transport: unknown ucx_op");
}

std::string_view UcxTransport::op_name() const {
  return data_op_ == UcxOp::kPut ? "put" : data_op_ == UcxOp::kTag ? "tag" : "am";
}

Result<std::unique_ptr<Transport>> UcxTransport::create(const TransportConfig& config,
                                                        const TransportOptions& options) {
  KVGATE_ASSIGN_OR_RETURN(UcxOp op, choose_op(config));
  if (options.region == nullptr && options.region_bytes != 0)
    return invalid_argument("transport: ucx: region_bytes without a region");
  KVGATE_ASSIGN_OR_RETURN(auto ctx, UcxContext::create(config, options.region, options.region_bytes));
  std::unique_ptr<UcxTransport> t(new UcxTransport(options, op, std::move(ctx)));
  KVGATE_RETURN_IF_ERROR(t->install_handlers());
  if (lands_by_copy(config.ucx_tls)) KVGATE_RETURN_IF_ERROR(t->create_landing_datatype());
  return std::unique_ptr<Transport>(std::move(t));
}

UcxTransport::UcxTransport(const TransportOptions& options, UcxOp op, std::unique_ptr<UcxContext> ctx)
    : TransportCore(options, op == UcxOp::kPut ? wire::DataOp::kPut : wire::DataOp::kActiveMessage),
      ctx_(std::move(ctx)),
      data_op_(op) {
  address_.reserve(64 + ctx_->worker_address().size() + ctx_->packed_rkey().size());
  put_u(address_, kAddressMagic, 4);
  put_u(address_, kAddressVersion, 1);
  put_u(address_, ctx_->worker_address().size(), 4);
  address_.insert(address_.end(), ctx_->worker_address().begin(), ctx_->worker_address().end());
  put_u(address_, reinterpret_cast<uintptr_t>(region()), 8);
  put_u(address_, region_bytes(), 8);
  put_u(address_, ctx_->packed_rkey().size(), 4);
  address_.insert(address_.end(), ctx_->packed_rkey().begin(), ctx_->packed_rkey().end());
}

Status UcxTransport::install_handlers() {
  for (auto [id, cb] : {std::pair{kAmControl, &UcxTransport::on_am_control},
                        std::pair{kAmData, &UcxTransport::on_am_data},
                        std::pair{kAmTagHeader, &UcxTransport::on_am_tag_header}}) {
    ucp_am_handler_param_t p{};
    p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                   UCP_AM_HANDLER_PARAM_FIELD_ARG;
    p.id = id;
    p.cb = cb;
    p.arg = this;
    ucs_status_t st = ucp_worker_set_am_recv_handler(ctx_->worker(), &p);
    if (st != UCS_OK) return ucx_status(st, "ucp_worker_set_am_recv_handler");
  }
  return {};
}

Status UcxTransport::create_landing_datatype() {
  static const ucp_generic_dt_ops_t ops = {&LandingDt::start_pack, &LandingDt::start_unpack,
                                           &LandingDt::packed_size, &LandingDt::pack,
                                           &LandingDt::unpack,      &LandingDt::finish};
  ucs_status_t st = ucp_dt_create_generic(&ops, nullptr, &landing_dt_);
  if (st != UCS_OK) {
    landing_dt_ = 0;
    return ucx_status(st, "ucp_dt_create_generic");
  }
  return {};
}

void UcxTransport::set_landing(Op* op, std::vector<std::pair<std::byte*, size_t>>&& pieces,
                               uint64_t bytes, ucp_request_param_t& prm, void*& buffer, size_t& count) {
  op->expect_bytes = bytes;
  if (landing_dt_) {
    op->fused = true;
    op->pieces = std::move(pieces);  // the landing's own list: no copy per segment
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    prm.datatype = landing_dt_;
    buffer = op;
    count = 1;
    return;
  }
  buffer = pieces[0].first;
  count = pieces[0].second;
  if (pieces.size() > 1) {
    op->iov.reserve(pieces.size());
    for (auto [dst, n] : pieces) op->iov.push_back({dst, n});
    prm.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    prm.datatype = ucp_dt_make_iov();
    buffer = op->iov.data();
    count = op->iov.size();
  }
}

UcxTransport::~UcxTransport() {
  cancel_tag_receives(0, false);
  sweep_unexpected(true);
  say_goodbye();
  auto until = [&](auto done, std::chrono::milliseconds limit) {
    const auto end = Clock::now() + limit;
    while (!done() && Clock::now() < end) ucp_worker_progress(ctx_->worker());
  };
  until([&] {
    for (Op* op : live_ops_)
      if (op->kind == kControlOp) return false;
    return true;
  }, std::chrono::milliseconds(500));
  // Let pending wireup and sends drain (a worker destroyed with wireup
  // messages still queued on a tcp endpoint trips an assertion in UCX 1.13).
  std::vector<ucs_status_ptr_t> flushing;
  for (auto& [id, p] : peers_) {
    if (!p->ep || p->failed) continue;
    ucp_request_param_t prm{};
    ucs_status_ptr_t r = ucp_ep_flush_nbx(p->ep, &prm);
    if (r && !UCS_PTR_IS_ERR(r)) flushing.push_back(r);
  }
  until([&] {
    for (auto r : flushing)
      if (ucp_request_check_status(r) == UCS_INPROGRESS) return false;
    return true;
  }, std::chrono::milliseconds(300));
  for (auto r : flushing) ucp_request_free(r);
  closing_ = true;
  std::vector<ucs_status_ptr_t> closing;
  for (auto& [id, p] : peers_) {
    if (p->rkey) ucp_rkey_destroy(p->rkey);
    p->rkey = nullptr;
    if (!p->ep) continue;
    // Forced: a graceful close waits for the peer to progress, which it may
    // never do; the Goodbye above already left (its send completed).
    ucp_request_param_t prm{};
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    prm.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = ucp_ep_close_nbx(p->ep, &prm);
    p->ep = nullptr;
    if (r && !UCS_PTR_IS_ERR(r)) closing.push_back(r);
  }
  until([&] {
    for (auto r : closing)
      if (ucp_request_check_status(r) == UCS_INPROGRESS) return false;
    return true;
  }, std::chrono::milliseconds(1000));
  for (auto r : closing) ucp_request_free(r);
  ctx_.reset();  // may still complete requests: on_send/on_recv see closing_
  for (Op* op : live_ops_) delete op;
  if (landing_dt_) ucp_dt_destroy(landing_dt_);
}

UcxTransport::Peer* UcxTransport::live_peer(PeerId peer) {
  auto it = peers_.find(peer.value());
  if (it == peers_.end() || it->second->failed || !it->second->ep) return nullptr;
  return it->second.get();
}

Status UcxTransport::link_connect(PeerId peer, std::span<const std::byte> address) {
  KVGATE_ASSIGN_OR_RETURN(ParsedAddress a, parse_address(address));
  auto p = std::make_unique<Peer>();
  p->self = this;
  p->id = peer;
  p->remote_base = a.region_base;
  p->remote_bytes = a.region_bytes;
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(a.worker.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &UcxTransport::on_ep_error;
  ep.err_handler.arg = p.get();
  ucs_status_t st = ucp_ep_create(ctx_->worker(), &ep, &p->ep);
  if (st != UCS_OK) return ucx_status(st, "ucp_ep_create");
  if (op() == wire::DataOp::kPut && !a.rkey.empty()) {
    st = ucp_ep_rkey_unpack(p->ep, a.rkey.data(), &p->rkey);
    if (st != UCS_OK) {
      close_peer(*p, true);
      return ucx_status(st, "ucp_ep_rkey_unpack");
    }
  }
  peers_[peer.value()] = std::move(p);
  return {};
}

void UcxTransport::close_peer(Peer& p, bool force) {
  if (p.rkey) ucp_rkey_destroy(p.rkey);
  p.rkey = nullptr;
  if (!p.ep) return;
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  prm.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t r = ucp_ep_close_nbx(p.ep, &prm);
  if (r && !UCS_PTR_IS_ERR(r)) ucp_request_free(r);  // released when it completes
  p.ep = nullptr;
}

UcxTransport::Op* UcxTransport::new_op(int kind, uint64_t cookie) {
  Op* op = new Op;
  op->self = this;
  op->kind = kind;
  op->cookie = cookie;
  live_ops_.insert(op);
  return op;
}

// One UCX request of `op` was issued and returned `request`.
void UcxTransport::track(Op* op, ucs_status_ptr_t request) {
  if (request == nullptr) {
    complete(op, UCS_OK);
  } else if (UCS_PTR_IS_ERR(request)) {
    complete(op, UCS_PTR_STATUS(request));
  }
  // else: the callback completes it
}

void UcxTransport::complete(Op* op, ucs_status_t status) {
  if (status != UCS_OK && op->status == UCS_OK) op->status = status;
  if (--op->remaining > 0) return;
  live_ops_.erase(op);
  if (!closing_) {
    Status s = ucx_status(op->status, "request");
    switch (op->kind) {
      case kSegmentOp:
      case kPutOp:
        segment_sent(op->cookie, std::move(s));
        break;
      case kFlushOp:
        flushed(op->cookie, std::move(s));
        break;
      case kRecvOp:
        segment_landed(op->cookie, std::move(s),
                       op->fused && op->in_order && op->crc_next == op->expect_bytes
                           ? std::optional<uint32_t>(op->crc)
                           : std::nullopt);
        break;
      case kDrainOp:  // a refused segment's payload, consumed and discarded
        break;
      default:
        break;
    }
  }
  delete op;
}

void UcxTransport::on_send(void* request, ucs_status_t status, void* user_data) {
  Op* op = static_cast<Op*>(user_data);
  op->self->complete(op, status);
  ucp_request_free(request);
}

void UcxTransport::on_recv(void* request, ucs_status_t status, size_t, void* user_data) {
  Op* op = static_cast<Op*>(user_data);
  op->self->complete(op, status);
  ucp_request_free(request);
}

void UcxTransport::on_tag_recv(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                               void* user_data) {
  Op* op = static_cast<Op*>(user_data);
  // A tagged message longer than the segment is truncated by UCX (an
  // error); a shorter one would leave stale bytes: both fail the segment.
  if (status == UCS_OK && op->kind == kRecvOp && info->length != op->expect_bytes)
    status = UCS_ERR_MESSAGE_TRUNCATED;
  if (op->kind == kDrainOp) status = UCS_OK;  // truncation is the point
  op->request = nullptr;
  op->self->complete(op, status);
  ucp_request_free(request);
}

void UcxTransport::cancel_tag_receives(uint64_t peer, bool only_dead) {
  std::vector<void*> cancel;
  for (Op* op : live_ops_) {
    if ((op->kind != kRecvOp && op->kind != kDrainOp) || op->request == nullptr) continue;
    if (peer != 0 && op->peer != peer) continue;
    if (only_dead && (op->kind == kDrainOp || cookie_live(op->cookie))) continue;
    cancel.push_back(op->request);
  }
  // Only a receive still waiting for its match is cancelled (UCS_ERR_CANCELED
  // through on_tag_recv); one already receiving completes normally.
  for (void* r : cancel) ucp_request_cancel(ctx_->worker(), r);
}

void UcxTransport::on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
  Peer* p = static_cast<Peer*>(arg);
  if (p->failed) return;
  p->failed = true;
  p->self->failed_peers_.push_back(p->id.value());
}

Status UcxTransport::link_send_control(PeerId peer, Bytes message) {
  Peer* p = live_peer(peer);
  if (!p) return unavailable("transport: ucx: peer endpoint is down");
  Op* op = new_op(kControlOp, 0);
  op->buffer = std::move(message);
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  prm.cb.send = &UcxTransport::on_send;
  prm.user_data = op;
  prm.flags = UCP_AM_SEND_FLAG_EAGER;
  track(op, ucp_am_send_nbx(p->ep, kAmControl, nullptr, 0, op->buffer.data(), op->buffer.size(), &prm));
  return {};
}

Status UcxTransport::link_send_segment(SegmentOp seg) {
  Peer* p = live_peer(seg.peer);
  if (!p) return unavailable("transport: ucx: peer endpoint is down");
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  prm.cb.send = &UcxTransport::on_send;
  if (data_op_ == UcxOp::kTag) return send_tagged(*p, seg);
  if (op() == wire::DataOp::kActiveMessage) {
    Op* op = new_op(kSegmentOp, seg.cookie);
    std::memcpy(op->header, seg.header, wire::kSegmentBytes);
    prm.user_data = op;
    track(op, ucp_am_send_nbx(p->ep, kAmData, op->header, wire::kSegmentBytes, seg.data, seg.bytes, &prm));
    return {};
  }
  if (!p->rkey) return failed_precondition("transport: ucx: put needs the peer's rkey (peer has no region)");
  for (const auto& piece : seg.remote)
    if (piece.region_offset > p->remote_bytes || piece.length_bytes > p->remote_bytes - piece.region_offset)
      return out_of_range("transport: ucx: put outside the peer's region");
  Op* op = new_op(kPutOp, seg.cookie);
  op->remaining = static_cast<uint32_t>(seg.remote.size()) + 1;  // +1: held until all are issued
  prm.user_data = op;
  for (const auto& piece : seg.remote) {
    track(op, ucp_put_nbx(p->ep, seg.data + piece.source_offset, piece.length_bytes,
                          p->remote_base + piece.region_offset, p->rkey, &prm));
  }
  complete(op, UCS_OK);  // releases the +1
  return {};
}

Status UcxTransport::send_tagged(Peer& p, SegmentOp& seg) {
  auto h = wire::decode({seg.header, wire::kSegmentBytes});
  if (!h.ok() || h->type != wire::WireType::kSegment) return internal_error("transport: ucx: bad own segment header");
  const auto& s = std::get<wire::Segment>(h->body);
  // The header first (eager: it must not wait for a rendezvous), then the
  // payload; UCX keeps an unexpected tagged message (or its rendezvous
  // request) until the receiver posts the matching receive.
  Op* hop = new_op(kControlOp, 0);
  std::memcpy(hop->header, seg.header, wire::kSegmentBytes);
  ucp_request_param_t hp{};
  hp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  hp.cb.send = &UcxTransport::on_send;
  hp.user_data = hop;
  hp.flags = UCP_AM_SEND_FLAG_EAGER;
  track(hop, ucp_am_send_nbx(p.ep, kAmTagHeader, hop->header, wire::kSegmentBytes, nullptr, 0, &hp));
  Op* op = new_op(kSegmentOp, seg.cookie);
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  prm.cb.send = &UcxTransport::on_send;
  prm.user_data = op;
  track(op, ucp_tag_send_nbx(p.ep, seg.data, seg.bytes, segment_tag(h->nonce, s.transfer_id, s.index), &prm));
  return {};
}

Status UcxTransport::link_flush(PeerId peer, uint64_t cookie) {
  Peer* p = live_peer(peer);
  if (!p) return unavailable("transport: ucx: peer endpoint is down");
  Op* op = new_op(kFlushOp, cookie);
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  prm.cb.send = &UcxTransport::on_send;
  prm.user_data = op;
  track(op, ucp_ep_flush_nbx(p->ep, &prm));
  return {};
}

ucs_status_t UcxTransport::on_am_control(void* arg, const void*, size_t header_length, void* data,
                                         size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxTransport*>(arg);
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || header_length != 0) {
    // Control messages are sent eager by us; anything else is not ours.
    self->count_malformed(invalid_argument("transport: ucx: control message as rendezvous"));
    return (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) ? UCS_ERR_REJECTED : UCS_OK;
  }
  self->on_control({static_cast<const std::byte*>(data), length});
  return UCS_OK;
}

ucs_status_t UcxTransport::on_am_data(void* arg, const void* header, size_t header_length, void* data,
                                      size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxTransport*>(arg);
  auto landing = self->on_segment_header({static_cast<const std::byte*>(header), header_length}, length);
  if (!landing.ok()) return UCS_OK;  // dropped: a rendezvous is not fetched, its send completes
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    // In UCX's receive buffer, hot: checksummed on the way into the pages.
    const uint32_t crc = crc32c(data, length);
    size_t at = 0;
    for (auto [dst, n] : landing->pieces) {
      std::memcpy(dst, static_cast<const std::byte*>(data) + at, n);
      at += n;
    }
    self->segment_landed(landing->cookie, {}, crc);
    return UCS_OK;
  }
  Op* op = self->new_op(kRecvOp, landing->cookie);
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  prm.cb.recv_am = &UcxTransport::on_recv;
  prm.user_data = op;
  void* buffer = nullptr;
  size_t count = 0;
  self->set_landing(op, std::move(landing->pieces), length, prm, buffer, count);
  self->track(op, ucp_am_recv_data_nbx(self->ctx_->worker(), data, buffer, count, &prm));
  return UCS_INPROGRESS;
}

ucs_status_t UcxTransport::on_am_tag_header(void* arg, const void* header, size_t header_length, void*,
                                            size_t length, const ucp_am_recv_param_t* param) {
  auto* self = static_cast<UcxTransport*>(arg);
  const std::span<const std::byte> h(static_cast<const std::byte*>(header), header_length);
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || length != 0) {
    self->count_malformed(invalid_argument("transport: ucx: tag segment header with a payload"));
    return (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) ? UCS_ERR_REJECTED : UCS_OK;
  }
  auto decoded = wire::decode(h);
  if (!decoded.ok() || decoded->type != wire::WireType::kSegment) {
    (void)self->on_segment_header(h, 0);  // counts it
    return UCS_OK;
  }
  const auto& seg = std::get<wire::Segment>(decoded->body);
  const uint64_t tag = segment_tag(decoded->nonce, seg.transfer_id, seg.index);
  auto landing = self->on_segment_header(h, seg.length_bytes);
  if (!landing.ok()) {
    // From an authenticated peer (the transfer is gone, the segment is
    // refused): consume its payload with a zero-byte receive so that its
    // send completes. From anyone else: nothing is posted on their behalf
    // (their tagged messages are swept and discarded, sweep_unexpected).
    if (landing.status().code() == StatusCode::kUnavailable || seg.length_bytes == 0) return UCS_OK;
    self->receive_tagged(tag, nullptr, 0, {}, self->new_op(kDrainOp, 0));
    return UCS_OK;
  }
  Op* op = self->new_op(kRecvOp, landing->cookie);
  op->peer = landing->peer.value();  // cancelled if that peer is lost
  ucp_request_param_t prm{};
  void* buffer = nullptr;
  size_t count = 0;
  self->set_landing(op, std::move(landing->pieces), seg.length_bytes, prm, buffer, count);
  self->receive_tagged(tag, buffer, count, prm, op);
  return UCS_OK;
}

// `prm` carries the datatype (set_landing), if any.
void UcxTransport::receive_tagged(uint64_t tag, void* buffer, size_t count, ucp_request_param_t prm, Op* op) {
  prm.op_attr_mask |= UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
  prm.cb.recv = &UcxTransport::on_tag_recv;
  prm.user_data = op;
  auto held = held_.find(tag);
  if (held != held_.end()) {  // it arrived before its header and was swept
    const ucp_tag_message_h message = held->second.message;
    held_.erase(held);
    track(op, ucp_tag_msg_recv_nbx(ctx_->worker(), buffer, count, message, &prm));
    return;  // matched already: nothing to cancel
  }
  void* r = ucp_tag_recv_nbx(ctx_->worker(), buffer, count, tag, ~uint64_t{0}, &prm);
  if (r && !UCS_PTR_IS_ERR(r)) op->request = r;
  track(op, r);
}

void UcxTransport::sweep_unexpected(bool discard_all) {
  const auto now = Clock::now();
  auto discard = [&](ucp_tag_message_h message) {
    ucp_request_param_t prm{};
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    prm.cb.recv = &UcxTransport::on_tag_recv;
    Op* op = new_op(kDrainOp, 0);
    prm.user_data = op;
    track(op, ucp_tag_msg_recv_nbx(ctx_->worker(), nullptr, 0, message, &prm));
  };
  for (auto it = held_.begin(); it != held_.end();) {
    if (discard_all || now - it->second.seen >= kHoldUnexpected) {
      discard(it->second.message);
      it = held_.erase(it);
    } else {
      ++it;
    }
  }
  if (discard_all) return;
  // Everything still unexpected now: taken out of UCX's queue (the memory
  // stays UCX's until received or discarded) and held, by tag.
  for (size_t i = 0; i < kMaxHeld; ++i) {
    ucp_tag_recv_info_t info{};
    ucp_tag_message_h m = ucp_tag_probe_nb(ctx_->worker(), 0, 0, 1, &info);
    if (m == nullptr) break;
    if (held_.size() >= kMaxHeld || !held_.emplace(info.sender_tag, Held{m, now}).second) discard(m);
  }
}

void UcxTransport::link_progress() {
  // Bounded: a busy worker must not starve the engine loop.
  for (int i = 0; i < 256 && ucp_worker_progress(ctx_->worker()) != 0; ++i) {
  }
  while (!failed_peers_.empty()) {
    const PeerId id(failed_peers_.back());
    failed_peers_.pop_back();
    auto it = peers_.find(id.value());
    if (it == peers_.end()) continue;
    close_peer(*it->second, true);
    cancel_tag_receives(id.value(), false);
    peer_lost(id, unavailable("transport: ucx: endpoint to the peer failed"));
  }
  // Tag receives posted for transfers the core erased (quiesce timeout,
  // lost peer): cancel them before those pages go to someone else.
  const auto now = Clock::now();
  if (now >= next_sweep_) {
    next_sweep_ = now + std::chrono::milliseconds(50);
    cancel_tag_receives(0, true);
    sweep_unexpected(false);
  }
}

}  // namespace kvgate::transport
