// One tensor-parallel rank's forward pass of one sequence on the CPU.
//
// Per layer, with the rank's shard (tp_shard.h):
//   RMSNorm (replicated) -> q/k/v for the rank's heads (column-parallel) ->
//   RoPE -> causal attention over the rank's heads with its own dense K/V
//   cache of its KV heads -> wo partial (row-parallel) -> all_reduce_sum ->
//   residual -> RMSNorm -> gate/up for the rank's MLP columns -> SwiGLU ->
//   w_down partial -> all_reduce_sum -> residual;
// then final norm and logits (replicated: every rank computes the same
// logits, bit for bit, because the all-reduce hands every rank the same
// residual stream).
//
// The kernels and their order are CpuForward's (engine/model.cpp), chunked
// the same way (max_batch_tokens), so world 1 reproduces CpuForward::prefill
// and its decode steps bit for bit. With world > 1 the row-parallel matmuls
// sum their K dimension in pieces (per rank, then across ranks), so results
// differ from world 1 in float rounding only (tp_forward_test bounds it).
//
// Threading: a TpForward belongs to its rank's thread; the ranks of a group
// run concurrently and call the collective in the same order. forward()
// blocks on the collective until every rank reaches the same point.
// Errors: bad tokens / no room are INVALID_ARGUMENT / OUT_OF_RANGE before any
// work (each rank checks the same inputs, so all ranks fail alike); a
// collective error is returned as is, and the rank's cache is then invalid
// until reset().
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/cpu/isa.h"
#include "engine/cpu/matmul.h"
#include "engine/cpu/thread_pool.h"
#include "engine/model.h"
#include "engine/tp/collective.h"
#include "engine/tp/tp_shard.h"

namespace kvgate::engine::tp {

struct TpForwardOptions {
  int n_threads = 1;               // this rank's pool (counts the caller)
  cpu::Isa isa = cpu::best_isa();
  int64_t max_batch_tokens = 512;  // tokens per step, as ForwardOptions
};

class TpForward {
 public:
  // INVALID_ARGUMENT if the collective's rank/world do not match the shard's.
  // The shard and the collective are not owned and must outlive the forward.
  static Result<std::unique_ptr<TpForward>> create(const TpShard& shard, Collective& comm,
                                                   const TpForwardOptions& options);

  // Empties the rank's K/V cache and sizes it for capacity_tokens.
  Status reset(int64_t capacity_tokens);
  // Appends `tokens` at n_tokens() (full causal attention over the cache),
  // in steps of max_batch_tokens; logits_out (n_vocab floats, or null to
  // skip the vocabulary projection on this rank) gets the last token's.
  Status forward(std::span<const int32_t> tokens, float* logits_out);
  // reset(tokens.size()) + forward(tokens): a prefill of one sequence.
  Status prefill(std::span<const int32_t> tokens, float* logits_out);

  int64_t n_tokens() const { return cache_ ? cache_->n_tokens() : 0; }
  // The rank's cache: KV heads are local indices (0 = the rank's first).
  const KvCache* cache() const { return cache_.get(); }
  const TpShard& shard() const { return shard_; }

 private:
  TpForward(const TpShard& shard, Collective& comm, const TpForwardOptions& options);
  Status step(std::span<const int32_t> tokens, float* logits_out);
  Status run_layer(int64_t layer, int64_t n);
  void attention(int64_t layer, int64_t n);

  const TpShard& shard_;
  Collective& comm_;
  TpForwardOptions options_;
  LlamaConfig local_;  // the model's config with the rank's head counts
  int64_t n_q_ = 0, n_kv_ = 0, n_ff_ = 0;
  cpu::ThreadPool pool_;
  cpu::MatmulWorkspace ws_;
  std::unique_ptr<KvCache> cache_;
  // Scratch for max_batch_tokens rows, grown once.
  std::vector<float> x_, xn_, partial_, q_, k_, v_, attn_, gate_, up_, scores_;
  std::vector<int64_t> row_pos_;
};

}  // namespace kvgate::engine::tp
