// NcclCommLink: NcclDataLink over a real NCCL communicator (built only with
// -DKVGATE_NCCL=ON, library kvgate_transport_nccl).
//
// The link forms a communicator of its own for KV shipping (not the
// tensor-parallel collective's: p2p ops issued between two all-reduces of
// another communicator cannot reorder them), from a unique id handed to
// every rank the way engine/tp does it (the coordinator's TP bootstrap,
// tp_bootstrap.h: rank 0 makes the id with new_unique_id(), every member
// joins with it). The communicator is non-blocking (ncclConfig_t.blocking =
// 0): create() and every enqueue poll ncclCommGetAsyncError with a deadline.
//
// Each op is one ncclSend/ncclRecv of bytes (ncclUint8) on a stream per
// (peer, direction) — a posted receive waits in its stream until the peer
// sends, and must not hold back this rank's sends or its receives from other
// ranks — followed by a cudaEvent recorded after it; poll() queries the
// event (and the communicator's async error). Both buffers must be device
// (or managed) memory: INVALID_ARGUMENT otherwise.
//
// crc32c(): the chunk kernel (crc32c_kernel.h) on a stream of the link,
// chunk CRCs copied back, folded on the host; blocks until done.
//
// Errors: any NCCL/CUDA error aborts the communicator (ncclCommAbort, which
// also releases peers blocked on us); every pending op then finishes kError
// and every later call fails UNAVAILABLE with the first error.
//
// Threading: owner thread only; every call sets the link's device first.
//
// UNVERIFIED: compiled and linked, never run — no GPU was available when it
// was written. In particular untested: several p2p streams of one
// communicator in flight at once (NCCL serialises them on its channels;
// ordering per pair is issue order, which is what the transport relies on),
// and the kernel's speed (one thread per 4 KiB chunk, bytewise table).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <unordered_map>
#include <vector>

#include <cuda_runtime_api.h>

#include "transport/nccl/nccl_link.h"

struct ncclComm;

namespace kvgate::transport {

inline constexpr size_t kNcclLinkIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES (checked in the .cpp)
using NcclLinkId = std::array<uint8_t, kNcclLinkIdBytes>;

struct NcclCommLinkOptions {
  int device = 0;                            // CUDA device of this rank
  std::chrono::milliseconds timeout{30000};  // joining, and each enqueue
};

class NcclCommLink final : public NcclDataLink {
 public:
  // A fresh id (rank 0 calls it and hands it to the others). UNAVAILABLE on error.
  static Result<NcclLinkId> new_unique_id();
  // Joins: blocks until every rank joined or the timeout passed
  // (DEADLINE_EXCEEDED). INVALID_ARGUMENT for rank outside [0, world) or
  // world < 2; UNAVAILABLE for CUDA/NCCL errors.
  static Result<std::unique_ptr<NcclDataLink>> create(const NcclLinkId& id, int rank, int world,
                                                      const NcclCommLinkOptions& options = {});
  ~NcclCommLink() override;

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  Result<OpId> post_send(int peer, const void* data, size_t bytes) override;
  Result<OpId> post_recv(int peer, void* data, size_t bytes) override;
  OpState poll(OpId op, Status* error) override;
  uint32_t crc32c(const void* data, size_t bytes, uint32_t seed) override;

 private:
  NcclCommLink(int rank, int world, const NcclCommLinkOptions& options)
      : rank_(rank), world_(world), options_(options) {}
  Result<OpId> post(bool send, int peer, const void* data, size_t bytes);
  Status check(int peer, const void* data, size_t bytes, const char* what);
  Status wait_enqueue(const char* what);
  Status fail(Status s);
  Result<cudaStream_t> stream_for(bool send, int peer);

  const int rank_;
  const int world_;
  const NcclCommLinkOptions options_;
  ncclComm* comm_ = nullptr;
  bool broken_ = false;
  Status broken_status_;
  std::map<std::pair<bool, int>, cudaStream_t> streams_;  // (send?, peer)
  std::unordered_map<OpId, cudaEvent_t> ops_;
  std::vector<cudaEvent_t> free_events_;
  OpId next_op_ = 1;
  // crc32c(): its stream, the chunk CRCs on the device and on the host.
  cudaStream_t crc_stream_ = nullptr;
  uint32_t* crc_dev_ = nullptr;
  uint32_t* crc_host_ = nullptr;  // pinned
  size_t crc_capacity_ = 0;       // entries in both
};

}  // namespace kvgate::transport
