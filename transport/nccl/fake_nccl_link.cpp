#include "transport/nccl/fake_nccl_link.h"

#include <cstring>
#include <string>

#include "transport/nccl/crc32c_chunks.h"

namespace kvgate::transport {

class FakeNcclLink final : public NcclDataLink {
 public:
  FakeNcclLink(std::shared_ptr<FakeNcclFabric> fabric, int rank) : fabric_(std::move(fabric)), rank_(rank) {}
  ~FakeNcclLink() override { fabric_->drop_rank(rank_); }

  int rank() const override { return rank_; }
  int world() const override { return fabric_->world(); }
  Result<OpId> post_send(int peer, const void* data, size_t bytes) override {
    FakeNcclFabric::Op op;
    op.send = true;
    op.self = rank_;
    op.peer = peer;
    op.src = data;
    op.bytes = bytes;
    return fabric_->post(op);
  }
  Result<OpId> post_recv(int peer, void* data, size_t bytes) override {
    FakeNcclFabric::Op op;
    op.self = rank_;
    op.peer = peer;
    op.dst = data;
    op.bytes = bytes;
    return fabric_->post(op);
  }
  OpState poll(OpId op, Status* error) override { return fabric_->poll(rank_, op, error); }
  uint32_t crc32c(const void* data, size_t bytes, uint32_t seed) override {
    return nccl_crc::chunked_crc32c(data, bytes, seed);
  }

 private:
  std::shared_ptr<FakeNcclFabric> fabric_;
  const int rank_;
};

std::shared_ptr<FakeNcclFabric> FakeNcclFabric::create(int world) {
  return std::shared_ptr<FakeNcclFabric>(new FakeNcclFabric(world));
}

Result<std::unique_ptr<NcclDataLink>> FakeNcclFabric::link(int rank) {
  std::lock_guard lock(mu_);
  if (rank < 0 || rank >= world_)
    return invalid_argument("fake nccl: rank " + std::to_string(rank) + " outside [0, " + std::to_string(world_) + ")");
  if (alive_[rank]) return failed_precondition("fake nccl: rank " + std::to_string(rank) + " already has a link");
  alive_[rank] = true;
  return std::unique_ptr<NcclDataLink>(new FakeNcclLink(shared_from_this(), rank));
}

int FakeNcclFabric::next_free_rank() const {
  std::lock_guard lock(mu_);
  for (int r = 0; r < world_; ++r)
    if (!alive_[r]) return r;
  return -1;
}

Result<uint64_t> FakeNcclFabric::post_stray_send(int from, int to, size_t bytes) {
  static const std::byte kStray[1] = {};
  Op op;
  op.send = true;
  op.self = from;
  op.peer = to;
  op.src = kStray;
  op.bytes = bytes;
  if (bytes > sizeof kStray) return invalid_argument("fake nccl: a stray send carries at most 1 byte");
  auto id = post(op);
  if (id.ok()) {
    std::lock_guard lock(mu_);
    ops_[*id].self = -1;  // nobody polls it; dropped with no rank
  }
  return id;
}

Result<uint64_t> FakeNcclFabric::post(Op op) {
  std::lock_guard lock(mu_);
  if (op.peer < 0 || op.peer >= world_ || op.peer == op.self)
    return invalid_argument("fake nccl: peer rank " + std::to_string(op.peer) + " is not another rank of " +
                            std::to_string(world_));
  if (op.bytes == 0) return invalid_argument("fake nccl: zero-byte op");
  const uint64_t id = next_id_++;
  if (!alive_[op.peer]) {
    op.state = NcclDataLink::OpState::kError;
    op.error = unavailable("fake nccl: rank " + std::to_string(op.peer) + " is gone");
    ops_[id] = op;
    return id;
  }
  const auto dir = op.send ? std::pair(op.self, op.peer) : std::pair(op.peer, op.self);
  (op.send ? sends_ : recvs_)[dir].push_back(id);
  ops_[id] = op;
  match(dir);
  return id;
}

void FakeNcclFabric::match(std::pair<int, int> dir) {
  auto& s = sends_[dir];
  auto& r = recvs_[dir];
  while (!s.empty() && !r.empty()) {
    const uint64_t send = s.front(), recv = r.front();
    s.pop_front();
    r.pop_front();
    ++matched_;
    const Op& a = ops_[send];
    const Op& b = ops_[recv];
    Status error;
    if (auto f = fail_next_.find(dir); f != fail_next_.end() && f->second > 0) {
      --f->second;
      error = internal_error("fake nccl: injected failure");
    } else if (a.bytes != b.bytes) {
      error = data_loss("fake nccl: size mismatch (the pair is out of step): rank " + std::to_string(dir.first) + " sent " +
                       std::to_string(a.bytes) + " bytes, rank " + std::to_string(dir.second) + " receives " +
                       std::to_string(b.bytes));
    }
    if (hold_ != Hold::kNone && error.ok()) {
      held_.push_back({send, recv, a.src, a.bytes});
      if (hold_ == Hold::kReceives) ops_[send].state = NcclDataLink::OpState::kOk;
    } else {
      finish_pair(send, recv, error);
    }
  }
}

void FakeNcclFabric::finish_pair(uint64_t send, uint64_t recv, Status error) {
  auto a = ops_.find(send), b = ops_.find(recv);
  if (a == ops_.end() || b == ops_.end()) return;  // a side was dropped with its rank
  if (error.ok()) std::memcpy(b->second.dst, a->second.src, a->second.bytes);
  for (auto* op : {&a->second, &b->second}) {
    op->state = error.ok() ? NcclDataLink::OpState::kOk : NcclDataLink::OpState::kError;
    op->error = error;
  }
}

void FakeNcclFabric::hold_completions(bool hold) {
  std::lock_guard lock(mu_);
  hold_ = hold ? Hold::kBoth : Hold::kNone;
}

void FakeNcclFabric::hold_receives(bool hold) {
  std::lock_guard lock(mu_);
  hold_ = hold ? Hold::kReceives : Hold::kNone;
}

void FakeNcclFabric::release() {
  std::lock_guard lock(mu_);
  for (const Held& h : held_) {
    if (auto r = ops_.find(h.recv); r != ops_.end()) {
      std::memcpy(r->second.dst, h.src, h.bytes);
      r->second.state = NcclDataLink::OpState::kOk;
    }
    if (auto s = ops_.find(h.send); s != ops_.end()) s->second.state = NcclDataLink::OpState::kOk;
  }
  held_.clear();
}

void FakeNcclFabric::fail_next_match(int from, int to) {
  std::lock_guard lock(mu_);
  ++fail_next_[{from, to}];
}

uint64_t FakeNcclFabric::matched() const {
  std::lock_guard lock(mu_);
  return matched_;
}

size_t FakeNcclFabric::unmatched() const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (const auto& [dir, q] : sends_) n += q.size();
  for (const auto& [dir, q] : recvs_) n += q.size();
  return n;
}

NcclDataLink::OpState FakeNcclFabric::poll(int rank, uint64_t id, Status* error) {
  std::lock_guard lock(mu_);
  auto it = ops_.find(id);
  if (it == ops_.end() || it->second.self != rank) {
    if (error) *error = invalid_argument("fake nccl: unknown op " + std::to_string(id));
    return NcclDataLink::OpState::kError;
  }
  const auto state = it->second.state;
  if (state == NcclDataLink::OpState::kPending) return state;
  if (error) *error = it->second.error;
  ops_.erase(it);
  return state;
}

void FakeNcclFabric::drop_rank(int rank) {
  std::lock_guard lock(mu_);
  alive_[rank] = false;
  const Status gone = unavailable("fake nccl: rank " + std::to_string(rank) + " is gone");
  // Held pairs with the rank: the other side fails, nothing is copied.
  std::erase_if(held_, [&](const Held& h) {
    auto r = ops_.find(h.recv);
    if (r == ops_.end() || (r->second.self != rank && r->second.peer != rank)) return r == ops_.end();
    for (uint64_t id : {h.send, h.recv}) {
      auto op = ops_.find(id);
      if (op == ops_.end() || op->second.state != NcclDataLink::OpState::kPending) continue;
      op->second.state = NcclDataLink::OpState::kError;
      op->second.error = gone;
    }
    return true;
  });
  for (auto* queues : {&sends_, &recvs_}) {
    for (auto& [dir, q] : *queues) {
      if (dir.first != rank && dir.second != rank) continue;
      for (uint64_t id : q) {
        Op& op = ops_[id];
        op.state = NcclDataLink::OpState::kError;
        op.error = gone;
      }
      q.clear();
    }
  }
  std::erase_if(ops_, [&](const auto& kv) { return kv.second.self == rank; });
}

}  // namespace kvgate::transport
