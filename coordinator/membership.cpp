#include "coordinator/membership.h"

#include <cstdio>

namespace kvgate::coordinator {

const char* node_state_name(NodeState state) {
  return state == NodeState::kLive ? "live" : "down";
}

namespace {

std::string default_node_name(const control::Hello& hello) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%016llx",
                static_cast<unsigned long long>(hello.node_id.value()));
  return std::string(control::node_role_name(hello.role)) + "-" + buf;
}

void mark_down(NodeInfo& node, const std::string& reason, ClusterClock::time_point now) {
  node.state = NodeState::kDown;
  node.down_reason = reason;
  node.down_at = now;
  // Nothing this coordinator sent is held there any more.
  node.reservations.clear();
  node.outstanding_prefill_tokens = 0;
  node.outstanding_prefill_jobs = 0;
}

}  // namespace

Membership::Membership(MembershipOptions options) : options_(std::move(options)) {}

Status Membership::check_hello(const control::Hello& hello) const {
  if (hello.role != control::NodeRole::kPrefill && hello.role != control::NodeRole::kDecode) {
    return invalid_argument("membership: role " + std::string(control::node_role_name(hello.role)) +
                            " cannot register with a coordinator (prefill or decode only)");
  }
  if (!hello.node_id.valid()) return invalid_argument("membership: node id 0 is not a node id");
  if (hello.model_name != options_.model_name) {
    return invalid_argument("membership: node '" + hello.node_name + "' serves model '" +
                            hello.model_name + "'; this coordinator serves '" +
                            options_.model_name + "'");
  }
  auto it = nodes_.find(hello.node_id);
  if (it != nodes_.end() && it->second.live()) {
    return failed_precondition("membership: node id " + std::to_string(hello.node_id.value()) +
                               " is already registered and live ('" + it->second.name + "')");
  }
  return Status();
}

Status Membership::register_node(const control::Hello& hello, std::shared_ptr<NodeLink> link,
                                 ClusterClock::time_point now) {
  KVGATE_RETURN_IF_ERROR(check_hello(hello));
  if (!link) return invalid_argument("membership: registration without a connection");
  NodeInfo node;
  node.id = hello.node_id;
  node.role = hello.role;
  node.name = hello.node_name.empty() ? default_node_name(hello) : hello.node_name;
  node.model = hello.model_name;
  node.control_address = hello.control_address;
  node.transport_name = hello.transport_name;
  node.transport_address = hello.transport_address;
  node.link = std::move(link);
  node.registered_at = now;
  node.last_heartbeat_at = now;
  node.last.node_id = hello.node_id;
  nodes_[hello.node_id] = std::move(node);
  return Status();
}

Status Membership::heartbeat(NodeId id, const control::Heartbeat& hb,
                             ClusterClock::time_point now) {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) {
    return not_found("membership: heartbeat from unknown node " + std::to_string(id.value()));
  }
  NodeInfo& node = it->second;
  if (!node.live()) {
    return failed_precondition("membership: heartbeat from node '" + node.name +
                               "', which is down (" + node.down_reason + ")");
  }
  if (hb.node_id.valid() && hb.node_id != id) {
    return invalid_argument("membership: heartbeat on the connection of node '" + node.name +
                            "' names node " + std::to_string(hb.node_id.value()));
  }
  node.last = hb;
  node.last.node_id = id;
  node.last_heartbeat_at = now;
  ++node.heartbeats;
  // Granted leases are in this heartbeat's reserved bytes (ordered
  // connection); pending Reserves may not be.
  for (auto r = node.reservations.begin(); r != node.reservations.end();) {
    r = r->second.granted ? node.reservations.erase(r) : std::next(r);
  }
  node.outstanding_prefill_tokens = 0;
  node.outstanding_prefill_jobs = 0;
  return Status();
}

std::vector<NodeId> Membership::sweep(ClusterClock::time_point now) {
  std::vector<NodeId> down;
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    NodeInfo& node = it->second;
    if (node.live() && now - node.last_heartbeat_at > options_.node_deadline) {
      mark_down(node,
                "no heartbeat for " + std::to_string(options_.node_deadline.count()) +
                    " ms (cluster.node_deadline)",
                now);
      down.push_back(node.id);
    }
    if (!node.live() && !node.link && now - node.down_at > options_.forget_after) {
      it = nodes_.erase(it);
    } else {
      ++it;
    }
  }
  return down;
}

bool Membership::connection_closed(NodeId id, const NodeLink* link, const std::string& reason,
                                   ClusterClock::time_point now) {
  auto it = nodes_.find(id);
  if (it == nodes_.end() || it->second.link.get() != link || link == nullptr) return false;
  NodeInfo& node = it->second;
  node.link.reset();
  if (!node.live()) return false;
  mark_down(node, reason, now);
  return true;
}

std::shared_ptr<NodeLink> Membership::take_link(NodeId id) {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) return nullptr;
  return std::move(it->second.link);
}

void Membership::add_reservation(NodeId decode, RequestId request, uint64_t bytes) {
  auto it = nodes_.find(decode);
  if (it == nodes_.end() || !it->second.live()) return;
  it->second.reservations[request] = NodeInfo::Reservation{bytes, false};
}

void Membership::reservation_answered(NodeId decode, RequestId request, bool granted) {
  auto it = nodes_.find(decode);
  if (it == nodes_.end()) return;
  auto r = it->second.reservations.find(request);
  if (r == it->second.reservations.end()) return;
  if (granted) {
    r->second.granted = true;
  } else {
    it->second.reservations.erase(r);
  }
}

void Membership::remove_reservation(NodeId decode, RequestId request) {
  auto it = nodes_.find(decode);
  if (it != nodes_.end()) it->second.reservations.erase(request);
}

void Membership::add_prefill_job(NodeId prefill, uint64_t prompt_tokens) {
  auto it = nodes_.find(prefill);
  if (it == nodes_.end() || !it->second.live()) return;
  it->second.outstanding_prefill_tokens += prompt_tokens;
  ++it->second.outstanding_prefill_jobs;
}

uint64_t Membership::decode_free_bytes(const NodeInfo& node) const {
  uint64_t outstanding = 0;
  for (const auto& [id, r] : node.reservations) outstanding += r.bytes;
  return node.last.pool_free_bytes > outstanding ? node.last.pool_free_bytes - outstanding : 0;
}

uint64_t Membership::prefill_queued_tokens(const NodeInfo& node) const {
  return node.last.queued_tokens + node.outstanding_prefill_tokens;
}

const NodeInfo* Membership::find(NodeId id) const {
  auto it = nodes_.find(id);
  return it == nodes_.end() ? nullptr : &it->second;
}

bool Membership::is_current_link(NodeId id, const NodeLink* link) const {
  const NodeInfo* node = find(id);
  return node != nullptr && node->live() && link != nullptr && node->link.get() == link;
}

MembershipCounts Membership::counts() const {
  MembershipCounts c;
  for (const auto& [id, node] : nodes_) {
    const bool prefill = node.role == control::NodeRole::kPrefill;
    if (node.live()) {
      ++(prefill ? c.live_prefill : c.live_decode);
    } else {
      ++(prefill ? c.down_prefill : c.down_decode);
    }
  }
  return c;
}

}  // namespace kvgate::coordinator
