#include "transport/loopback/loopback_transport.h"

#include <array>
#include <cstring>
#include <deque>
#include <mutex>

namespace kvgate::transport {

namespace {

constexpr uint32_t kAddressMagic = 0x4C47564Bu;  // "KVGL"

struct Item {
  enum Kind : uint8_t { kControl, kData, kDataDone, kPeerGone } kind = kControl;
  uint64_t from = 0;  // sender instance
  Bytes bytes;        // kControl
  std::array<std::byte, wire::kSegmentBytes> header{};  // kData
  const std::byte* src = nullptr;                        // kData
  size_t len = 0;                                        // kData
  uint64_t cookie = 0;                                   // kData, kDataDone (sender's)
};

}  // namespace

struct LoopbackTransport::Inbox {
  std::deque<Item> items;  // guarded by the fabric mutex
};

namespace {

struct Fabric {
  std::mutex mu;
  uint64_t next_instance = 1;
  std::unordered_map<uint64_t, LoopbackTransport::Inbox*> inboxes;
};

Fabric& fabric() {
  static Fabric* f = new Fabric;  // never destroyed: transports may outlive static teardown order
  return *f;
}

// Posts `item` to `to`; false when that transport is gone.
bool post(uint64_t to, Item item) {
  Fabric& f = fabric();
  std::lock_guard lock(f.mu);
  auto it = f.inboxes.find(to);
  if (it == f.inboxes.end()) return false;
  it->second->items.push_back(std::move(item));
  return true;
}

}  // namespace

Result<std::unique_ptr<Transport>> LoopbackTransport::create(const TransportOptions& options) {
  if (options.region == nullptr && options.region_bytes != 0)
    return invalid_argument("transport: loopback: region_bytes without a region");
  return std::unique_ptr<Transport>(new LoopbackTransport(options));
}

LoopbackTransport::LoopbackTransport(const TransportOptions& options)
    : TransportCore(options, wire::DataOp::kActiveMessage), inbox_(std::make_unique<Inbox>()) {
  Fabric& f = fabric();
  std::lock_guard lock(f.mu);
  instance_ = f.next_instance++;
  f.inboxes[instance_] = inbox_.get();
}

LoopbackTransport::~LoopbackTransport() {
  say_goodbye();
  Fabric& f = fabric();
  std::lock_guard lock(f.mu);
  f.inboxes.erase(instance_);
  for (auto& [id, inbox] : f.inboxes) {
    Item gone;
    gone.kind = Item::kPeerGone;
    gone.from = instance_;
    inbox->items.push_back(std::move(gone));
  }
}

Result<Bytes> LoopbackTransport::address() {
  Bytes out(12);
  std::memcpy(out.data(), &kAddressMagic, 4);
  std::memcpy(out.data() + 4, &instance_, 8);
  return out;
}

Status LoopbackTransport::link_connect(PeerId peer, std::span<const std::byte> address) {
  uint32_t magic = 0;
  uint64_t instance = 0;
  if (address.size() != 12) return invalid_argument("transport: loopback: address must be 12 bytes");
  std::memcpy(&magic, address.data(), 4);
  std::memcpy(&instance, address.data() + 4, 8);
  if (magic != kAddressMagic) return invalid_argument("transport: loopback: not a loopback address");
  {
    Fabric& f = fabric();
    std::lock_guard lock(f.mu);
    if (!f.inboxes.count(instance))
      return unavailable("transport: loopback: no transport " + std::to_string(instance) + " in this process");
  }
  peer_instance_[peer.value()] = instance;
  return {};
}

Status LoopbackTransport::link_send_control(PeerId peer, Bytes message) {
  Item item;
  item.kind = Item::kControl;
  item.from = instance_;
  item.bytes = std::move(message);
  if (!post(peer_instance_.at(peer.value()), std::move(item)))
    return unavailable("transport: loopback: peer is gone");
  return {};
}

Status LoopbackTransport::link_send_segment(SegmentOp op) {
  Item item;
  item.kind = Item::kData;
  item.from = instance_;
  std::memcpy(item.header.data(), op.header, wire::kSegmentBytes);
  item.src = op.data;
  item.len = op.bytes;
  item.cookie = op.cookie;
  if (!post(peer_instance_.at(op.peer.value()), std::move(item)))
    return unavailable("transport: loopback: peer is gone");
  return {};
}

Status LoopbackTransport::link_flush(PeerId, uint64_t) {
  return unimplemented("transport: loopback has no one-sided put");
}

void LoopbackTransport::link_progress() {
  std::deque<Item> items;
  Fabric& f = fabric();
  {
    std::lock_guard lock(f.mu);
    items.swap(inbox_->items);
  }
  for (auto& item : items) {
    switch (item.kind) {
      case Item::kControl:
        on_control(item.bytes);
        break;
      case Item::kData: {
        auto landing = on_segment_header(item.header, item.len);
        bool copied = false;
        if (landing.ok()) {
          std::lock_guard lock(f.mu);
          if (f.inboxes.count(item.from)) {
            size_t at = 0;
            for (auto [dst, n] : landing->pieces) {
              std::memcpy(dst, item.src + at, n);
              at += n;
            }
            copied = true;
          }
        }
        if (landing.ok())
          segment_landed(landing->cookie, copied ? Status() : unavailable("transport: loopback: sender is gone"));
        // Like a rendezvous the receiver declined: the send still completes.
        Item done;
        done.kind = Item::kDataDone;
        done.from = instance_;
        done.cookie = item.cookie;
        (void)post(item.from, std::move(done));
        break;
      }
      case Item::kDataDone:
        segment_sent(item.cookie, {});
        break;
      case Item::kPeerGone:
        for (auto& [peer, instance] : peer_instance_)
          if (instance == item.from) peer_lost(PeerId(peer), unavailable("transport: loopback: peer destroyed"));
        break;
    }
  }
}

}  // namespace kvgate::transport
