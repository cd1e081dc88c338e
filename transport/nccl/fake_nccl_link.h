// FakeNcclLink: NcclDataLink over host memory inside one process, for tests
// of the nccl transport without a GPU. A FakeNcclFabric stands for one
// communicator of `world` ranks; link(rank) gives that rank's link.
//
// Matching as NCCL does it: per ordered pair (from, to), the n-th send is
// paired with the n-th receive, whatever their sizes. A pair of equal size
// copies the bytes (on match, or on release() while completions are held)
// and both ops finish kOk; unequal sizes finish both kError ("size
// mismatch"), where NCCL would hang or write garbage — the fake makes the
// mistake visible (DATA_LOSS: the pair is out of step). Test controls: hold_completions() keeps matched pairs
// pending until release() (hold_receives(): the receive alone);
// fail_next_match(from, to) fails the next pair
// of that direction. A destroyed link's rank is dead: its pending ops are
// dropped (nothing is copied into its memory afterwards), the other ranks'
// pending and later ops with it finish kError.
//
// crc32c() checksums host memory through the device decomposition
// (crc32c_chunks.h), so the nccl tests exercise the host half of it.
//
// Threading: every method of the fabric and the links may be called from
// any thread (one mutex).
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "transport/nccl/nccl_link.h"

namespace kvgate::transport {

class FakeNcclFabric : public std::enable_shared_from_this<FakeNcclFabric> {
 public:
  static std::shared_ptr<FakeNcclFabric> create(int world);

  // Rank `rank`'s link (one live link per rank). INVALID_ARGUMENT outside
  // [0, world); FAILED_PRECONDITION when that rank's link already exists.
  Result<std::unique_ptr<NcclDataLink>> link(int rank);
  // The next rank without a link, or -1.
  int next_free_rank() const;

  int world() const { return world_; }
  void hold_completions(bool hold);
  // Like hold_completions, for the receive alone: the send finishes on
  // match (NCCL may finish a send before its bytes are in the peer's
  // buffer), the receive and its bytes wait for release().
  void hold_receives(bool hold);
  // Completes every held pair (copies, then kOk).
  void release();
  void fail_next_match(int from, int to);
  // A send of `bytes` (at most 1) from rank `from` to `to` that no link
  // posted: the pair falls out of step (the next receive of `to` from
  // `from` meets it: a size mismatch, DATA_LOSS on the receive).
  Result<uint64_t> post_stray_send(int from, int to, size_t bytes);
  // Pairs matched so far (both directions), and ops still unmatched.
  uint64_t matched() const;
  size_t unmatched() const;

 private:
  friend class FakeNcclLink;
  struct Op {
    bool send = false;
    int self = 0, peer = 0;
    const void* src = nullptr;
    void* dst = nullptr;
    size_t bytes = 0;
    NcclDataLink::OpState state = NcclDataLink::OpState::kPending;
    Status error;
  };
  explicit FakeNcclFabric(int world) : world_(world), alive_(world, false) {}
  Result<uint64_t> post(Op op);
  void match(std::pair<int, int> dir);
  void finish_pair(uint64_t send, uint64_t recv, Status error);
  NcclDataLink::OpState poll(int rank, uint64_t id, Status* error);
  void drop_rank(int rank);

  const int world_;
  mutable std::mutex mu_;
  std::vector<bool> alive_;
  uint64_t next_id_ = 1;
  uint64_t matched_ = 0;
  enum class Hold : uint8_t { kNone, kBoth, kReceives } hold_ = Hold::kNone;
  std::unordered_map<uint64_t, Op> ops_;
  // Unmatched op ids per direction (from, to).
  std::map<std::pair<int, int>, std::deque<uint64_t>> sends_, recvs_;
  struct Held {
    uint64_t send = 0, recv = 0;
    const void* src = nullptr;  // the send's bytes (its op may be gone)
    size_t bytes = 0;
  };
  std::vector<Held> held_;  // matched, not finished
  std::map<std::pair<int, int>, int> fail_next_;
};

}  // namespace kvgate::transport
