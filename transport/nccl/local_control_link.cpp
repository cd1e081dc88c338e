#include "transport/nccl/local_control_link.h"

#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

namespace kvgate::transport {

namespace {
constexpr uint32_t kAddressMagic = 0x434C474Bu;  // "KGLC"
}

struct LocalControlLink::State {
  std::vector<Event> inbox;  // guarded by the registry mutex
  uint64_t next_channel = 1;
  // Channel -> (other endpoint, its channel id for the same pipe).
  std::unordered_map<uint64_t, std::pair<uint64_t, uint64_t>> channels;
};

namespace {

struct Registry {
  std::mutex mu;
  uint64_t next_instance = 1;
  std::unordered_map<uint64_t, LocalControlLink::State*> endpoints;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: endpoints may outlive static teardown
  return *r;
}

}  // namespace

std::unique_ptr<NcclControlLink> LocalControlLink::create() {
  return std::unique_ptr<NcclControlLink>(new LocalControlLink());
}

LocalControlLink::LocalControlLink() : state_(std::make_unique<State>()) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  instance_ = r.next_instance++;
  r.endpoints[instance_] = state_.get();
}

LocalControlLink::~LocalControlLink() {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  r.endpoints.erase(instance_);
  for (const auto& [mine, other] : state_->channels) {
    auto it = r.endpoints.find(other.first);
    if (it == r.endpoints.end()) continue;
    it->second->channels.erase(other.second);
    Event closed;
    closed.kind = Event::kClosed;
    closed.channel = other.second;
    closed.status = unavailable("control link: the other endpoint closed");
    it->second->inbox.push_back(std::move(closed));
  }
}

Bytes LocalControlLink::address() const {
  Bytes out(12);
  std::memcpy(out.data(), &kAddressMagic, 4);
  std::memcpy(out.data() + 4, &instance_, 8);
  return out;
}

Result<NcclControlLink::ChannelId> LocalControlLink::open(std::span<const std::byte> address) {
  uint32_t magic = 0;
  uint64_t target = 0;
  if (address.size() != 12) return invalid_argument("control link: a local address is 12 bytes");
  std::memcpy(&magic, address.data(), 4);
  std::memcpy(&target, address.data() + 4, 8);
  if (magic != kAddressMagic) return invalid_argument("control link: not a local control address");
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  auto it = r.endpoints.find(target);
  if (it == r.endpoints.end())
    return unavailable("control link: no endpoint " + std::to_string(target) + " in this process");
  const uint64_t mine = state_->next_channel++;
  const uint64_t theirs = it->second->next_channel++;
  state_->channels[mine] = {target, theirs};
  it->second->channels[theirs] = {instance_, mine};
  return mine;
}

Status LocalControlLink::send(ChannelId channel, Bytes frame) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  auto ch = state_->channels.find(channel);
  if (ch == state_->channels.end()) return unavailable("control link: channel closed");
  auto it = r.endpoints.find(ch->second.first);
  if (it == r.endpoints.end()) return unavailable("control link: the other endpoint closed");
  Event e;
  e.kind = Event::kFrame;
  e.channel = ch->second.second;
  e.frame = std::move(frame);
  it->second->inbox.push_back(std::move(e));
  return {};
}

void LocalControlLink::close(ChannelId channel) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  auto ch = state_->channels.find(channel);
  if (ch == state_->channels.end()) return;
  const auto [other, theirs] = ch->second;
  state_->channels.erase(ch);
  auto it = r.endpoints.find(other);
  if (it == r.endpoints.end()) return;
  it->second->channels.erase(theirs);
  Event closed;
  closed.kind = Event::kClosed;
  closed.channel = theirs;
  closed.status = unavailable("control link: the other endpoint closed the channel");
  it->second->inbox.push_back(std::move(closed));
}

void LocalControlLink::poll(std::vector<Event>& out) {
  Registry& r = registry();
  std::vector<Event> got;
  {
    std::lock_guard lock(r.mu);
    got.swap(state_->inbox);
  }
  for (auto& e : got) out.push_back(std::move(e));
}

}  // namespace kvgate::transport
