#include "engine/tp/collective.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>

namespace kvgate::engine::tp {

namespace {

enum class Op { kAllReduce, kBroadcast, kBarrier };

const char* op_name(Op op) {
  switch (op) {
    case Op::kAllReduce: return "all_reduce_sum";
    case Op::kBroadcast: return "broadcast";
    case Op::kBarrier: return "barrier";
  }
  return "?";
}

// What one rank brought to the current operation.
struct Post {
  Op op = Op::kBarrier;
  const void* data = nullptr;
  size_t size = 0;  // floats for all_reduce, bytes for broadcast
  int root = -1;
};

// State shared by the ranks of one group. An operation runs in phases
// separated by sync() (a reusable barrier with a deadline):
//   post; sync A; check every post agrees; [work]; sync C.
// Between sync A and sync C the posts and the ranks' input buffers are
// read-only; after sync C nobody reads them, so the next post may overwrite.
class GroupState {
 public:
  GroupState(int world, std::chrono::milliseconds timeout)
      : world_(world), timeout_(timeout), arrived_(static_cast<size_t>(world), 0),
        posts_(static_cast<size_t>(world)) {}

  int world() const { return world_; }

  Status post(int rank, const Post& p) {
    std::lock_guard<std::mutex> lk(mu_);
    if (broken_) return broken_status_;
    posts_[static_cast<size_t>(rank)] = p;
    // Grown only here: every reader of sum_ finished before the previous
    // operation's sync C, which this rank has passed.
    if (p.op == Op::kAllReduce && sum_.size() < p.size) sum_.resize(p.size);
    return Status();
  }

  // Blocks until every rank has reached this phase (OK), the group breaks
  // (its Status) or the deadline passes (DEADLINE_EXCEEDED naming the ranks
  // that did not arrive; the group is then broken for everybody).
  Status sync(int rank, Op op, const char* phase) {
    std::unique_lock<std::mutex> lk(mu_);
    if (broken_) return broken_status_;
    const uint64_t gen = generation_;
    arrived_[static_cast<size_t>(rank)] = 1;
    if (++n_arrived_ == world_) {
      n_arrived_ = 0;
      std::fill(arrived_.begin(), arrived_.end(), 0);
      ++generation_;
      cv_.notify_all();
      return Status();
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      // A completed phase wins over a later break: every rank did arrive.
      if (generation_ != gen) return Status();
      if (broken_) return broken_status_;
      if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && generation_ == gen && !broken_) {
        std::string missing;
        for (int r = 0; r < world_; ++r) {
          if (!arrived_[static_cast<size_t>(r)]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        }
        broken_ = true;
        broken_status_ = Status(StatusCode::kDeadlineExceeded,
                                std::string("tensor-parallel ") + op_name(op) + ": rank(s) " + missing +
                                    " did not reach " + phase + " within " +
                                    std::to_string(timeout_.count()) + " ms");
        cv_.notify_all();
        return broken_status_;
      }
    }
  }

  // A rank's Collective is gone: ranks waiting for it would wait forever.
  void leave(int rank) {
    std::lock_guard<std::mutex> lk(mu_);
    if (broken_) return;
    broken_ = true;
    broken_status_ = unavailable("tensor-parallel rank " + std::to_string(rank) + " left the group");
    cv_.notify_all();
  }

  // After sync A: INVALID_ARGUMENT if the ranks' posts disagree. Every rank
  // computes the same answer from the same posts.
  Status check_posts() const {
    const Post& p0 = posts_[0];
    for (int r = 1; r < world_; ++r) {
      const Post& p = posts_[static_cast<size_t>(r)];
      const std::string who = "tensor-parallel collective: rank 0 called " + std::string(op_name(p0.op));
      if (p.op != p0.op) {
        return invalid_argument(who + " but rank " + std::to_string(r) + " called " + op_name(p.op));
      }
      if (p.size != p0.size) {
        const char* unit = p0.op == Op::kAllReduce ? " floats" : " bytes";
        return invalid_argument(who + " with " + std::to_string(p0.size) + unit + " but rank " +
                                std::to_string(r) + " with " + std::to_string(p.size) + unit);
      }
      if (p.root != p0.root) {
        return invalid_argument(who + " from root " + std::to_string(p0.root) + " but rank " +
                                std::to_string(r) + " from root " + std::to_string(p.root));
      }
    }
    if (p0.op == Op::kBroadcast && (p0.root < 0 || p0.root >= world_)) {
      return invalid_argument("tensor-parallel broadcast: root " + std::to_string(p0.root) +
                              " outside the group of " + std::to_string(world_));
    }
    return Status();
  }

  const Post& post_of(int rank) const { return posts_[static_cast<size_t>(rank)]; }
  float* sum() { return sum_.data(); }

 private:
  const int world_;
  const std::chrono::milliseconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  int n_arrived_ = 0;
  std::vector<char> arrived_;
  bool broken_ = false;
  Status broken_status_;
  // Written under mu_ by their rank before sync A; read by all between
  // sync A and sync C.
  std::vector<Post> posts_;
  std::vector<float> sum_;  // the all-reduce result, element slices per rank
};

class InProcessCollective final : public Collective {
 public:
  InProcessCollective(std::shared_ptr<GroupState> state, int rank)
      : state_(std::move(state)), rank_(rank) {}
  ~InProcessCollective() override { state_->leave(rank_); }

  int rank() const override { return rank_; }
  int world() const override { return state_->world(); }

  Status all_reduce_sum(float* data, size_t n) override {
    const int w = state_->world();
    if (w == 1) return Status();  // the identity, bit for bit
    if (n > 0 && data == nullptr) return invalid_argument("all_reduce_sum of null data");
    KVGATE_RETURN_IF_ERROR(state_->post(rank_, Post{Op::kAllReduce, data, n, -1}));
    KVGATE_RETURN_IF_ERROR(state_->sync(rank_, Op::kAllReduce, "the start"));
    if (Status s = state_->check_posts(); !s.ok()) {
      KVGATE_RETURN_IF_ERROR(state_->sync(rank_, Op::kAllReduce, "the end"));
      return s;
    }
    // Each rank sums one slice of the elements, always in rank order, so
    // the result does not depend on which thread computed it.
    const size_t begin = n * static_cast<size_t>(rank_) / static_cast<size_t>(w);
    const size_t end = n * static_cast<size_t>(rank_ + 1) / static_cast<size_t>(w);
    float* sum = state_->sum();
    const auto* in0 = static_cast<const float*>(state_->post_of(0).data);
    std::copy(in0 + begin, in0 + end, sum + begin);
    for (int r = 1; r < w; ++r) {
      const auto* in = static_cast<const float*>(state_->post_of(r).data);
      for (size_t i = begin; i < end; ++i) sum[i] += in[i];
    }
    KVGATE_RETURN_IF_ERROR(state_->sync(rank_, Op::kAllReduce, "the reduction"));
    std::copy(sum, sum + n, data);
    return state_->sync(rank_, Op::kAllReduce, "the end");
  }

  Status broadcast(void* data, size_t bytes, int root) override {
    const int w = state_->world();
    if (root < 0 || root >= w) {
      return invalid_argument("tensor-parallel broadcast: root " + std::to_string(root) +
                              " outside the group of " + std::to_string(w));
    }
    if (w == 1) return Status();
    if (bytes > 0 && data == nullptr) return invalid_argument("broadcast of null data");
    KVGATE_RETURN_IF_ERROR(state_->post(rank_, Post{Op::kBroadcast, data, bytes, root}));
    KVGATE_RETURN_IF_ERROR(state_->sync(rank_, Op::kBroadcast, "the start"));
    Status s = state_->check_posts();
    if (s.ok() && rank_ != root && bytes > 0) std::memcpy(data, state_->post_of(root).data, bytes);
    KVGATE_RETURN_IF_ERROR(state_->sync(rank_, Op::kBroadcast, "the end"));
    return s;
  }

  Status barrier() override {
    if (state_->world() == 1) return Status();
    KVGATE_RETURN_IF_ERROR(state_->post(rank_, Post{Op::kBarrier, nullptr, 0, -1}));
    KVGATE_RETURN_IF_ERROR(state_->sync(rank_, Op::kBarrier, "the start"));
    Status s = state_->check_posts();
    KVGATE_RETURN_IF_ERROR(state_->sync(rank_, Op::kBarrier, "the end"));
    return s;
  }

 private:
  std::shared_ptr<GroupState> state_;
  const int rank_;
};

}  // namespace

Result<std::vector<std::unique_ptr<Collective>>> InProcessGroup::create(int world,
                                                                        std::chrono::milliseconds timeout) {
  if (world < 1) return invalid_argument("in-process group of " + std::to_string(world) + " ranks");
  if (timeout.count() <= 0) return invalid_argument("in-process group timeout must be positive");
  auto state = std::make_shared<GroupState>(world, timeout);
  std::vector<std::unique_ptr<Collective>> out;
  out.reserve(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) out.push_back(std::make_unique<InProcessCollective>(state, r));
  return out;
}

}  // namespace kvgate::engine::tp
