// Collective operations among the ranks of a tensor-parallel group.
//
// Collective is the interface a rank's forward (tp_forward.h) uses; two
// implementations:
//   - InProcessGroup: `world` Collective objects for threads of one process
//     (the CPU path, and the tests). Shared buffers, a mutex and a condition
//     variable; every wait has a deadline.
//   - NcclCollective (nccl_collective.h, -DKVGATE_NCCL=ON): one rank per GPU
//     over an ncclComm_t; pointers are device pointers.
//
// Semantics every implementation keeps: each rank calls the same sequence of
// operations with the same sizes; all_reduce_sum hands every rank
// bit-identical results (so replicated computation after it stays identical
// on all ranks); for world 1 every operation is the identity (the data is
// unchanged bit for bit). InProcessGroup also fixes the order of the sum,
// rank order (((r0 + r1) + r2) + ...) for every element, so a run is
// reproducible; NCCL picks its own order (nccl_collective.h).
//
// Threading: a Collective belongs to one thread (its rank's); different
// ranks' objects are used concurrently. Calls block until every rank has
// joined the operation or the group's deadline passes.
// Errors (Status, never a crash or a hang):
//   INVALID_ARGUMENT  ranks disagree on the operation, its size or its root;
//                     every rank gets it, and the group stays usable
//   DEADLINE_EXCEEDED a rank did not join within the timeout
//   UNAVAILABLE       a rank left the group (its Collective was destroyed)
// After either of the last two the group is broken: every later call on any
// rank fails fast with the same Status.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <vector>

#include "common/status.h"

namespace kvgate::engine::tp {

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  // data[0..n) = the element-wise sum of every rank's data[0..n).
  virtual Status all_reduce_sum(float* data, size_t n) = 0;
  // data[0..bytes) = root's data[0..bytes) on every rank.
  virtual Status broadcast(void* data, size_t bytes, int root) = 0;
  // Returns once every rank has called barrier().
  virtual Status barrier() = 0;
};

// The ranks of one group in one process. create() returns the `world`
// Collectives (index = rank); hand each to its own thread. They share the
// group state, which lives until the last of them is destroyed.
class InProcessGroup {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout{30000};

  // INVALID_ARGUMENT for world < 1 or a timeout <= 0.
  static Result<std::vector<std::unique_ptr<Collective>>> create(
      int world, std::chrono::milliseconds timeout = kDefaultTimeout);
};

}  // namespace kvgate::engine::tp
