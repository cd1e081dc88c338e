#include "transport/nccl/nccl_comm_link.h"

#include <nccl.h>

#include <cstring>
#include <span>
#include <string>
#include <thread>

#include "transport/nccl/crc32c_chunks.h"
#include "transport/nccl/crc32c_kernel.h"

namespace kvgate::transport {

static_assert(sizeof(ncclUniqueId) == kNcclLinkIdBytes, "ncclUniqueId size changed");

namespace {

std::string nccl_error(const char* what, ncclResult_t r, ncclComm_t comm) {
  std::string m = std::string("nccl link: ") + what + ": " + ncclGetErrorString(r);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') m += std::string(" (") + last + ")";
  }
  return m;
}

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string("nccl link: cuda ") + what + ": " + cudaGetErrorString(e);
}

}  // namespace

Result<NcclLinkId> NcclCommLink::new_unique_id() {
  ncclUniqueId id;
  if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) return unavailable(nccl_error("ncclGetUniqueId", r, nullptr));
  NcclLinkId out;
  std::memcpy(out.data(), &id, out.size());
  return out;
}

Result<std::unique_ptr<NcclDataLink>> NcclCommLink::create(const NcclLinkId& id_bytes, int rank, int world,
                                                           const NcclCommLinkOptions& options) {
  if (world < 2 || rank < 0 || rank >= world)
    return invalid_argument("nccl link: rank " + std::to_string(rank) + " of world " + std::to_string(world) +
                            " (a link needs at least 2 ranks)");
  if (options.timeout.count() <= 0) return invalid_argument("nccl link: timeout must be positive");
  std::unique_ptr<NcclCommLink> l(new NcclCommLink(rank, world, options));
  if (cudaError_t e = cudaSetDevice(options.device); e != cudaSuccess) return unavailable(cuda_error("cudaSetDevice", e));
  if (cudaError_t e = cudaStreamCreateWithFlags(&l->crc_stream_, cudaStreamNonBlocking); e != cudaSuccess)
    return unavailable(cuda_error("cudaStreamCreate", e));
  ncclUniqueId id;
  std::memcpy(&id, id_bytes.data(), sizeof(id));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, world, id, rank, &config);
  l->comm_ = comm;
  if (r != ncclSuccess && r != ncclInProgress) return l->fail(unavailable(nccl_error("ncclCommInitRankConfig", r, comm)));
  KVGATE_RETURN_IF_ERROR(l->wait_enqueue("joining"));
  return std::unique_ptr<NcclDataLink>(std::move(l));
}

NcclCommLink::~NcclCommLink() {
  cudaSetDevice(options_.device);
  // Ops may still be pending (a peer that never matched them): abort rather
  // than wait for a finalize that cannot finish.
  if (comm_ != nullptr) {
    bool idle = !broken_;
    for (auto& [id, ev] : ops_) idle &= cudaEventQuery(ev) == cudaSuccess;
    if (idle) {
      ncclCommDestroy(comm_);
    } else {
      ncclCommAbort(comm_);
    }
    comm_ = nullptr;
  }
  for (auto& [id, ev] : ops_) cudaEventDestroy(ev);
  for (cudaEvent_t ev : free_events_) cudaEventDestroy(ev);
  for (auto& [key, s] : streams_) cudaStreamDestroy(s);
  if (crc_stream_ != nullptr) cudaStreamDestroy(crc_stream_);
  if (crc_dev_ != nullptr) cudaFree(crc_dev_);
  if (crc_host_ != nullptr) cudaFreeHost(crc_host_);
}

Status NcclCommLink::fail(Status s) {
  if (!broken_) {
    broken_ = true;
    broken_status_ = s;
    if (comm_ != nullptr) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
  }
  return s;
}

Status NcclCommLink::wait_enqueue(const char* what) {
  const auto deadline = Clock::now() + options_.timeout;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    if (ncclResult_t r = ncclCommGetAsyncError(comm_, &state); r != ncclSuccess)
      return fail(unavailable(nccl_error(what, r, comm_)));
    if (state == ncclSuccess) return {};
    if (state != ncclInProgress) return fail(unavailable(nccl_error(what, state, comm_)));
    if (Clock::now() > deadline)
      return fail(Status(StatusCode::kDeadlineExceeded, std::string("nccl link: ") + what + ": not done within " +
                                                            std::to_string(options_.timeout.count()) + " ms"));
    std::this_thread::yield();
  }
}

Status NcclCommLink::check(int peer, const void* data, size_t bytes, const char* what) {
  if (broken_) return Status(StatusCode::kUnavailable, broken_status_.message());
  if (peer < 0 || peer >= world_ || peer == rank_)
    return invalid_argument(std::string("nccl link: ") + what + ": peer " + std::to_string(peer) +
                            " is not another rank of " + std::to_string(world_));
  if (bytes == 0 || data == nullptr) return invalid_argument(std::string("nccl link: ") + what + ": no bytes");
  if (cudaError_t e = cudaSetDevice(options_.device); e != cudaSuccess) return unavailable(cuda_error("cudaSetDevice", e));
  cudaPointerAttributes attr{};
  if (cudaError_t e = cudaPointerGetAttributes(&attr, data); e != cudaSuccess) {
    cudaGetLastError();
    return invalid_argument(cuda_error("cudaPointerGetAttributes", e));
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return invalid_argument(std::string("nccl link: ") + what + ": the buffer is not device memory");
  return {};
}

Result<cudaStream_t> NcclCommLink::stream_for(bool send, int peer) {
  auto it = streams_.find({send, peer});
  if (it != streams_.end()) return it->second;
  cudaStream_t s = nullptr;
  if (cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking); e != cudaSuccess)
    return unavailable(cuda_error("cudaStreamCreate", e));
  streams_[{send, peer}] = s;
  return s;
}

Result<NcclDataLink::OpId> NcclCommLink::post(bool send, int peer, const void* data, size_t bytes) {
  const char* what = send ? "ncclSend" : "ncclRecv";
  KVGATE_RETURN_IF_ERROR(check(peer, data, bytes, what));
  KVGATE_ASSIGN_OR_RETURN(cudaStream_t stream, stream_for(send, peer));
  cudaEvent_t ev = nullptr;
  if (!free_events_.empty()) {
    ev = free_events_.back();
    free_events_.pop_back();
  } else if (cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming); e != cudaSuccess) {
    return unavailable(cuda_error("cudaEventCreate", e));
  }
  const ncclResult_t r = send ? ncclSend(data, bytes, ncclUint8, peer, comm_, stream)
                              : ncclRecv(const_cast<void*>(data), bytes, ncclUint8, peer, comm_, stream);
  if (r != ncclSuccess && r != ncclInProgress) {
    free_events_.push_back(ev);
    return fail(unavailable(nccl_error(what, r, comm_)));
  }
  if (Status s = wait_enqueue(what); !s.ok()) {
    free_events_.push_back(ev);
    return s;
  }
  if (cudaError_t e = cudaEventRecord(ev, stream); e != cudaSuccess) {
    free_events_.push_back(ev);
    return fail(unavailable(cuda_error("cudaEventRecord", e)));
  }
  const OpId id = next_op_++;
  ops_[id] = ev;
  return id;
}

Result<NcclDataLink::OpId> NcclCommLink::post_send(int peer, const void* data, size_t bytes) {
  return post(true, peer, data, bytes);
}

Result<NcclDataLink::OpId> NcclCommLink::post_recv(int peer, void* data, size_t bytes) {
  return post(false, peer, data, bytes);
}

NcclDataLink::OpState NcclCommLink::poll(OpId op, Status* error) {
  auto it = ops_.find(op);
  auto finish = [&](OpState state, Status why) {
    if (error) *error = std::move(why);
    if (it != ops_.end()) {
      free_events_.push_back(it->second);
      ops_.erase(it);
    }
    return state;
  };
  if (it == ops_.end()) return finish(OpState::kError, invalid_argument("nccl link: unknown op " + std::to_string(op)));
  if (broken_) return finish(OpState::kError, Status(StatusCode::kUnavailable, broken_status_.message()));
  cudaSetDevice(options_.device);
  const cudaError_t e = cudaEventQuery(it->second);
  if (e == cudaSuccess) return finish(OpState::kOk, {});
  if (e != cudaErrorNotReady) return finish(OpState::kError, fail(unavailable(cuda_error("cudaEventQuery", e))));
  // A peer's failure shows on the communicator while our op waits.
  ncclResult_t state = ncclSuccess;
  ncclCommGetAsyncError(comm_, &state);
  if (state != ncclSuccess && state != ncclInProgress)
    return finish(OpState::kError, fail(unavailable(nccl_error("pending op", state, comm_))));
  return OpState::kPending;
}

uint32_t NcclCommLink::crc32c(const void* data, size_t bytes, uint32_t seed) {
  // A failure here cannot be returned: the CRC comes out wrong (never equal
  // by accident in practice), so the transfer fails DATA_LOSS at the
  // receiver's verification rather than passing unchecked.
  constexpr uint32_t kPoison = 0xFFFFFFFFu;
  if (bytes == 0) return seed;
  if (cudaSetDevice(options_.device) != cudaSuccess) return seed ^ kPoison;
  const size_t chunks = (bytes + nccl_crc::kCrcChunkBytes - 1) / nccl_crc::kCrcChunkBytes;
  if (chunks > crc_capacity_) {
    if (crc_dev_ != nullptr) cudaFree(crc_dev_);
    if (crc_host_ != nullptr) cudaFreeHost(crc_host_);
    crc_dev_ = nullptr;
    crc_host_ = nullptr;
    crc_capacity_ = 0;
    if (cudaMalloc(&crc_dev_, chunks * sizeof(uint32_t)) != cudaSuccess ||
        cudaMallocHost(&crc_host_, chunks * sizeof(uint32_t)) != cudaSuccess)
      return seed ^ kPoison;
    crc_capacity_ = chunks;
  }
  if (nccl_crc::launch_chunk_crc32c(data, bytes, crc_dev_, crc_stream_) != cudaSuccess ||
      cudaMemcpyAsync(crc_host_, crc_dev_, chunks * sizeof(uint32_t), cudaMemcpyDeviceToHost, crc_stream_) !=
          cudaSuccess ||
      cudaStreamSynchronize(crc_stream_) != cudaSuccess)
    return seed ^ kPoison;
  return nccl_crc::fold_chunks(seed, std::span<const uint32_t>(crc_host_, chunks), bytes);
}

}  // namespace kvgate::transport
