// Collective (collective.h) over NCCL: one rank per GPU, data in device
// memory. Built only with -DKVGATE_NCCL=ON (library kvgate_engine_tp_nccl).
//
// Setup: rank 0 calls new_unique_id() and hands the 128 bytes to every rank
// (the coordinator will carry them over the control plane); each rank then
// calls create() with the same id, its rank and the world size. create()
// blocks until every rank has joined or the timeout passes.
//
// Operations are enqueued on the collective's stream; with `synchronous`
// (the default) each call also waits for the stream, so on return the data
// holds the result, as InProcessGroup's contract says. Without it the call
// returns once NCCL has enqueued the operation and the result is ordered on
// stream() (call synchronize() before reading it on the host).
//
// Deadlines: the communicator is non-blocking (ncclConfig_t.blocking = 0),
// so every wait polls ncclCommGetAsyncError / cudaStreamQuery and, past the
// timeout, aborts the communicator (ncclCommAbort) and returns
// DEADLINE_EXCEEDED; the collective is then broken and every later call
// fails fast. NCCL cannot see a size mismatch between ranks: it shows as
// that timeout (or as garbage if the sizes happen to overlap), unlike
// InProcessGroup's INVALID_ARGUMENT.
//
// Determinism: NCCL's ring and tree all-reduce compute each element once and
// copy it to every rank, so ranks agree bit for bit; the order of the sum is
// NCCL's (not rank order) and is reproducible only for a fixed topology,
// NCCL_ALGO/NCCL_PROTO and channel count.
//
// Threading: one thread per rank (the rank's engine thread); each call sets
// the collective's CUDA device on the calling thread first.
//
// UNVERIFIED: compiled in the CUDA leg only; no GPU was available when it
// was written, so not one of its paths has run (engine/tp/README.md).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>

#include <cuda_runtime_api.h>

#include "common/status.h"
#include "engine/tp/collective.h"

// From nccl.h, kept out of this header.
struct ncclComm;

namespace kvgate::engine::tp {

inline constexpr size_t kNcclUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES (checked in the .cpp)
using NcclUniqueIdBytes = std::array<uint8_t, kNcclUniqueIdBytes>;

struct NcclCollectiveOptions {
  int device = 0;                    // CUDA device ordinal of this rank
  cudaStream_t stream = nullptr;     // not owned; null: the collective creates and owns one
  std::chrono::milliseconds timeout{30000};  // join and per-operation deadline
  bool synchronous = true;           // wait for the stream in every call
};

class NcclCollective final : public Collective {
 public:
  // A fresh id for a new group (rank 0 calls it). UNAVAILABLE if NCCL fails.
  static Result<NcclUniqueIdBytes> new_unique_id();

  // Joins the group. INVALID_ARGUMENT for rank outside [0, world) or world
  // < 1; UNAVAILABLE for CUDA/NCCL errors; DEADLINE_EXCEEDED if the group
  // did not form within the timeout.
  static Result<std::unique_ptr<NcclCollective>> create(const NcclUniqueIdBytes& id, int rank, int world,
                                                        const NcclCollectiveOptions& options = {});

  ~NcclCollective() override;
  NcclCollective(const NcclCollective&) = delete;
  NcclCollective& operator=(const NcclCollective&) = delete;

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  // data: device memory of n floats (INVALID_ARGUMENT for host memory).
  Status all_reduce_sum(float* data, size_t n) override;
  // data: device memory of `bytes` bytes.
  Status broadcast(void* data, size_t bytes, int root) override;
  Status barrier() override;

  // Waits (with the deadline) for everything enqueued on stream().
  Status synchronize();
  cudaStream_t stream() const { return stream_; }

 private:
  NcclCollective(int rank, int world, const NcclCollectiveOptions& options)
      : rank_(rank), world_(world), options_(options) {}
  Status check_usable(const void* data, const char* what);
  // Polls the communicator until its pending call is done (or fails / times out).
  Status wait_comm(const char* what);
  Status wait_stream(const char* what);
  Status after_enqueue(int nccl_result, const char* what);
  Status fail(Status s);  // aborts the communicator, marks broken, returns s

  const int rank_;
  const int world_;
  const NcclCollectiveOptions options_;
  ncclComm* comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool own_stream_ = false;
  float* barrier_word_ = nullptr;  // device scratch for barrier()
  bool broken_ = false;
  Status broken_status_;
};

}  // namespace kvgate::engine::tp
