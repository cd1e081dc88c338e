#include "engine/tp/tp_bootstrap.h"

#include <utility>

namespace kvgate::engine::tp {

using control::tp_group_error_prefix;

bool TpBootstrap::on_message(const control::Message& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const auto* ready = std::get_if<control::TpReady>(&message)) {
    auto it = pending_.find(ready->group);
    if (it == pending_.end() || it->second.answer) return false;
    it->second.answer = *ready;
    cv_.notify_all();
    return true;
  }
  if (const auto* error = std::get_if<control::Error>(&message)) {
    if (error->request_id.valid()) return false;
    for (auto& [group, p] : pending_) {
      if (p.answer || error->message.rfind(tp_group_error_prefix(group), 0) != 0) continue;
      p.answer = Result<control::TpReady>(error->status());
      cv_.notify_all();
      return true;
    }
  }
  return false;
}

void TpBootstrap::on_closed(const Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = Status(reason.ok() ? StatusCode::kUnavailable : reason.code(),
                   "coordinator connection closed: " + reason.message());
  cv_.notify_all();
}

Result<control::TpReady> TpBootstrap::join(control::Connection& conn, const control::TpJoin& join,
                                           Deadline deadline) {
  const std::string prefix = tp_group_error_prefix(join.group);
  std::unique_lock<std::mutex> lock(mu_);
  if (closed_) return *closed_;
  if (pending_.count(join.group) != 0) {
    return failed_precondition(prefix + "a join of this group is already pending here");
  }
  auto it = pending_.emplace(join.group, Pending{}).first;
  // Sent under the lock: the answer cannot be delivered before the pending
  // entry exists, and send() only queues (never calls back).
  conn.send(join);
  cv_.wait_until(lock, deadline, [&] { return it->second.answer.has_value() || closed_; });
  Result<control::TpReady> out =
      it->second.answer ? std::move(*it->second.answer)
      : closed_         ? Result<control::TpReady>(*closed_)
                        : Result<control::TpReady>(Status(
                              StatusCode::kDeadlineExceeded,
                              prefix + "no TpReady from the coordinator before the deadline"));
  pending_.erase(it);
  return out;
}

bool TpBootstrap::pending(const std::string& group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.count(group) != 0;
}

Result<control::TpReady> join_tp_group(TpBootstrap& bootstrap, control::Connection& conn,
                                       const std::string& group, uint32_t rank, uint32_t world,
                                       const std::optional<control::Bytes>& unique_id,
                                       TpBootstrap::Deadline deadline) {
  control::TpJoin join;
  join.group = group;
  join.rank = rank;
  join.world = world;
  if (unique_id) join.unique_id = *unique_id;
  // The decoder's checks, here so that a bad join fails before it is sent
  // (the coordinator would close the connection on an undecodable frame).
  const control::Message as_message = join;
  std::vector<std::byte> payload(control::payload_bytes(as_message));
  control::write_payload(as_message, payload);
  if (auto decoded = control::decode_payload(control::MessageType::kTpJoin, payload);
      !decoded.ok()) {
    return decoded.status();
  }
  KVGATE_ASSIGN_OR_RETURN(control::TpReady ready, bootstrap.join(conn, join, deadline));
  const std::string prefix = tp_group_error_prefix(group);
  if (ready.group != group || ready.world != world || ready.members.size() != world) {
    return data_loss(prefix + "TpReady for group '" + ready.group + "' world " +
                     std::to_string(ready.world) + " with " +
                     std::to_string(ready.members.size()) + " members does not match the join");
  }
  if (rank == 0 && ready.unique_id != join.unique_id) {
    return data_loss(prefix + "TpReady.unique_id differs from the id rank 0 sent");
  }
  return ready;
}

}  // namespace kvgate::engine::tp
