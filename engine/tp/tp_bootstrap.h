// The node side of the tensor-parallel bootstrap (control_protocol.h
// "tensor-parallel bootstrap", docs/cluster.md, engine/tp/README.md
// "Bootstrap"): a rank sends TpJoin on its registration connection to the
// coordinator and waits for the group's TpReady (or an Error naming the
// group), then builds its collective:
//
//   TpBootstrap tp;                 // handlers of the coordinator connection:
//   on_message: if (tp.on_message(m)) return;   ... the node's own dispatch
//   on_closed:  tp.on_closed(status);
//   ...
//   Bytes id = rank == 0 ? nccl_unique_id_bytes() : Bytes{};
//   auto ready = join_tp_group(tp, *conn, "llama70b-0", rank, world, id, deadline);
//   auto coll = NcclCollective::create(ready->unique_id, rank, ready->world);
//
// Lives in engine/tp (library kvgate_engine_tp_bootstrap) because its only
// user is a TP rank; it needs the control protocol and the Connection
// interface only (no sockets of its own, no CUDA).
//
// Threading: on_message / on_closed are called from the connection's
// handlers (its io thread); join() blocks the calling thread and must NOT
// run on that io thread (it waits for on_message). Several groups may be
// joined at once from different threads; one join per group at a time.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "common/control_channel.h"
#include "common/control_protocol.h"
#include "common/status.h"

namespace kvgate::engine::tp {

class TpBootstrap {
 public:
  using Deadline = std::chrono::steady_clock::time_point;

  TpBootstrap() = default;
  TpBootstrap(const TpBootstrap&) = delete;
  TpBootstrap& operator=(const TpBootstrap&) = delete;

  // Every message of the coordinator connection. True when it answered a
  // pending join (the TpReady of its group, or an Error with request id none
  // whose message starts with control::tp_group_error_prefix(group)); the
  // caller then handles it no further. Never blocks.
  bool on_message(const control::Message& message);
  // The connection closed: pending and later joins fail with `reason`
  // (code kept, message prefixed "coordinator connection closed: ").
  void on_closed(const Status& reason);

  // Sends `join` on `conn` and waits until the group's answer or
  // `deadline`. Errors: the coordinator's Error for the group (its code:
  // kInvalidArgument / kFailedPrecondition for a refused join, kUnavailable
  // when another member left, kDeadlineExceeded when the group timed out at
  // the coordinator); kDeadlineExceeded naming the group when `deadline`
  // passes; kFailedPrecondition when a join of the same group is already
  // pending here; the close status (see on_closed).
  Result<control::TpReady> join(control::Connection& conn, const control::TpJoin& join,
                                Deadline deadline);

  // True while a join of `group` waits here; its TpJoin is then already
  // queued on the connection (for tests and diagnostics).
  bool pending(const std::string& group) const;

 private:
  struct Pending {
    std::optional<Result<control::TpReady>> answer;
  };
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, Pending> pending_;  // by group
  std::optional<Status> closed_;
};

// Builds the TpJoin (unique_id: exactly kTpUniqueIdBytes for rank 0,
// nullopt or empty for the others), checks it as the coordinator would
// (kInvalidArgument naming the field, nothing sent), joins, and checks the
// TpReady against what was asked: same group and world, rank 0 gets its own
// id back (kDataLoss otherwise).
Result<control::TpReady> join_tp_group(TpBootstrap& bootstrap, control::Connection& conn,
                                       const std::string& group, uint32_t rank, uint32_t world,
                                       const std::optional<control::Bytes>& unique_id,
                                       TpBootstrap::Deadline deadline);

}  // namespace kvgate::engine::tp
