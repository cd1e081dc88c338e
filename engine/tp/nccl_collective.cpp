#include "engine/tp/nccl_collective.h"

#include <nccl.h>

#include <cstring>
#include <string>
#include <thread>

namespace kvgate::engine::tp {

static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "ncclUniqueId size changed");
static_assert(NCCL_UNIQUE_ID_BYTES == kNcclUniqueIdBytes, "NCCL_UNIQUE_ID_BYTES changed");

namespace {

using Clock = std::chrono::steady_clock;

std::string nccl_error(const char* what, ncclResult_t r, ncclComm_t comm) {
  std::string m = std::string("nccl ") + what + ": " + ncclGetErrorString(r);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') m += std::string(" (") + last + ")";
  }
  return m;
}

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string("cuda ") + what + ": " + cudaGetErrorString(e);
}

// Lets other threads (and NCCL's proxy) run while a wait polls.
void backoff() { std::this_thread::yield(); }

}  // namespace

Result<NcclUniqueIdBytes> NcclCollective::new_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return unavailable(nccl_error("ncclGetUniqueId", r, nullptr));
  NcclUniqueIdBytes out;
  std::memcpy(out.data(), &id, out.size());
  return out;
}

Result<std::unique_ptr<NcclCollective>> NcclCollective::create(const NcclUniqueIdBytes& id_bytes, int rank,
                                                               int world, const NcclCollectiveOptions& options) {
  if (world < 1 || rank < 0 || rank >= world) {
    return invalid_argument("nccl collective: rank " + std::to_string(rank) + " of world " +
                            std::to_string(world));
  }
  if (options.timeout.count() <= 0) return invalid_argument("nccl collective: timeout must be positive");
  std::unique_ptr<NcclCollective> c(new NcclCollective(rank, world, options));
  if (cudaError_t e = cudaSetDevice(options.device); e != cudaSuccess) {
    return unavailable(cuda_error("cudaSetDevice", e));
  }
  if (options.stream != nullptr) {
    c->stream_ = options.stream;
  } else {
    if (cudaError_t e = cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking); e != cudaSuccess) {
      return unavailable(cuda_error("cudaStreamCreate", e));
    }
    c->own_stream_ = true;
  }
  void* word = nullptr;
  if (cudaError_t e = cudaMalloc(&word, sizeof(float)); e != cudaSuccess) {
    return unavailable(cuda_error("cudaMalloc", e));
  }
  c->barrier_word_ = static_cast<float*>(word);
  ncclUniqueId id;
  std::memcpy(&id, id_bytes.data(), sizeof(id));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // calls return ncclInProgress; we poll with a deadline
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, world, id, rank, &config);
  c->comm_ = comm;
  if (r != ncclSuccess && r != ncclInProgress) {
    return c->fail(unavailable(nccl_error("ncclCommInitRankConfig", r, comm)));
  }
  KVGATE_RETURN_IF_ERROR(c->wait_comm("joining the group"));
  return c;
}

NcclCollective::~NcclCollective() {
  cudaSetDevice(options_.device);
  if (comm_ != nullptr) {
    if (!broken_) {
      // Flush what was issued, bounded by the deadline; abort otherwise.
      ncclResult_t r = ncclCommFinalize(comm_);
      const auto deadline = Clock::now() + options_.timeout;
      ncclResult_t state = r;
      while (r == ncclSuccess || r == ncclInProgress) {
        ncclCommGetAsyncError(comm_, &state);
        if (state != ncclInProgress || Clock::now() > deadline) break;
        backoff();
      }
      if (state == ncclSuccess) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    comm_ = nullptr;
  }
  if (barrier_word_ != nullptr) cudaFree(barrier_word_);
  if (own_stream_ && stream_ != nullptr) cudaStreamDestroy(stream_);
}

Status NcclCollective::fail(Status s) {
  if (!broken_) {
    broken_ = true;
    broken_status_ = s;
    if (comm_ != nullptr) {
      ncclCommAbort(comm_);  // also releases peers blocked on us (they see a remote error)
      comm_ = nullptr;
    }
  }
  return s;
}

Status NcclCollective::wait_comm(const char* what) {
  const auto deadline = Clock::now() + options_.timeout;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) return fail(unavailable(nccl_error(what, r, comm_)));
    if (state == ncclSuccess) return Status();
    if (state != ncclInProgress) return fail(unavailable(nccl_error(what, state, comm_)));
    if (Clock::now() > deadline) {
      return fail(Status(StatusCode::kDeadlineExceeded,
                         std::string("nccl ") + what + ": not done within " +
                             std::to_string(options_.timeout.count()) + " ms (a rank missing?)"));
    }
    backoff();
  }
}

Status NcclCollective::wait_stream(const char* what) {
  const auto deadline = Clock::now() + options_.timeout;
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream_);
    if (e == cudaSuccess) return Status();
    if (e != cudaErrorNotReady) return fail(unavailable(cuda_error(what, e)));
    // A peer's failure shows on the communicator while our kernel waits.
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) {
      return fail(unavailable(nccl_error(what, state, comm_)));
    }
    if (Clock::now() > deadline) {
      return fail(Status(StatusCode::kDeadlineExceeded,
                         std::string("nccl ") + what + ": not complete within " +
                             std::to_string(options_.timeout.count()) +
                             " ms (a rank missing, or ranks disagree on the size?)"));
    }
    backoff();
  }
}

Status NcclCollective::check_usable(const void* data, const char* what) {
  if (broken_) return broken_status_;
  if (cudaError_t e = cudaSetDevice(options_.device); e != cudaSuccess) {
    return unavailable(cuda_error("cudaSetDevice", e));
  }
  if (data == nullptr) return Status();
  cudaPointerAttributes attr{};
  if (cudaError_t e = cudaPointerGetAttributes(&attr, data); e != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error the query left behind
    return invalid_argument(std::string("nccl ") + what + ": " + cuda_error("cudaPointerGetAttributes", e));
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    return invalid_argument(std::string("nccl ") + what + ": data is not device memory");
  }
  return Status();
}

Status NcclCollective::after_enqueue(int result, const char* what) {
  const auto r = static_cast<ncclResult_t>(result);
  if (r != ncclSuccess && r != ncclInProgress) return fail(unavailable(nccl_error(what, r, comm_)));
  KVGATE_RETURN_IF_ERROR(wait_comm(what));
  if (options_.synchronous) return wait_stream(what);
  return Status();
}

Status NcclCollective::all_reduce_sum(float* data, size_t n) {
  if (n > 0 && data == nullptr) return invalid_argument("nccl all_reduce_sum of null data");
  KVGATE_RETURN_IF_ERROR(check_usable(data, "all_reduce_sum"));
  if (n == 0) return Status();
  return after_enqueue(ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, stream_), "all_reduce_sum");
}

Status NcclCollective::broadcast(void* data, size_t bytes, int root) {
  if (root < 0 || root >= world_) {
    return invalid_argument("nccl broadcast: root " + std::to_string(root) + " outside the group of " +
                            std::to_string(world_));
  }
  if (bytes > 0 && data == nullptr) return invalid_argument("nccl broadcast of null data");
  KVGATE_RETURN_IF_ERROR(check_usable(data, "broadcast"));
  if (bytes == 0) return Status();
  return after_enqueue(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_), "broadcast");
}

Status NcclCollective::barrier() {
  KVGATE_RETURN_IF_ERROR(check_usable(nullptr, "barrier"));
  // A one-element all-reduce every rank must join; then wait for it even in
  // asynchronous mode (a barrier is about the host).
  const ncclResult_t r = ncclAllReduce(barrier_word_, barrier_word_, 1, ncclFloat32, ncclSum, comm_, stream_);
  if (r != ncclSuccess && r != ncclInProgress) return fail(unavailable(nccl_error("barrier", r, comm_)));
  KVGATE_RETURN_IF_ERROR(wait_comm("barrier"));
  return wait_stream("barrier");
}

Status NcclCollective::synchronize() {
  KVGATE_RETURN_IF_ERROR(check_usable(nullptr, "synchronize"));
  return wait_stream("synchronize");
}

}  // namespace kvgate::engine::tp
