// Prefill once, compress per policy (DESIGN.md §4).
//
// Every policy prefills with full attention, so the prefill of a prompt is
// the same for all of them; only the compression that follows differs.
// prefill_for_policies() runs ONE dense prefill of a prompt with whatever
// the requested policies observe (AttentionStats for h2o/snapkv, a
// GatePrefill per gate policy, fanned out from the forward's layer-observer
// hook), then forks one sequence per policy: dense keeps the plain dense
// cache; every other policy gets a CompressedKvCache built from the dense
// K/V with its own flags (and gate rows) in a page pool of its own. Each
// sequence then decodes on its own (forward_compressed; gate policies with a
// GateDecoder as the layer observer for the step). Used by `kvgate generate`
// (one policy) and `kvgate eval` (a comparison table from one prefill).
//
// prefill_compressed() is the prefill node's form (docs/cluster.md step 4):
// one prefill, one policy, and a CompressedKvCache for EVERY policy — dense
// included, as the single-layer layout with every flag 1, which is exactly
// dense attention — built in a page pool the caller chose (its page size
// must equal the decode node's, which adopts the pages as they are).
//
// Threading: everything here is driven by the thread that owns the
// CpuForward (the engine thread); calls block. A PolicyPlan is immutable and
// may be shared.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/gate_runtime.h"
#include "engine/kv_policy.h"
#include "engine/model.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/layout.h"
#include "kvstore/page_pool.h"
#include "kvstore/wire_image.h"

namespace kvgate::engine {

// A policy resolved for one model: its config and cache layout (dense: the
// single-layer layout, unused by its plain cache).
struct PolicyPlan {
  KvPolicyConfig config;
  kvstore::KvLayout layout;
  std::string name;    // kv_policy_name()
  std::string blocks;  // kv_policy_blocks()
};

// Checks the policy against the model (make_kv_layout's errors: a gate
// policy without a gate model is FAILED_PRECONDITION) before any work.
Result<std::shared_ptr<const PolicyPlan>> plan_kv_policy(const LlamaConfig& config,
                                                         const KvPolicyConfig& policy);

class PolicySequence;

// Bytes of a pool (pages of page_bytes) that can never be the limit of one
// cache of `layout` growing to capacity_tokens: the footprint with every
// distant token retained plus one partly filled page per page list.
// INVALID_ARGUMENT for page_bytes <= 0; the footprint's errors.
Result<int64_t> compressed_pool_bytes(const kvstore::KvLayout& layout, int64_t capacity_tokens,
                                      int64_t page_bytes);

// Retained distant tokens over all (block, head) slots divided by
// n_slots x distant tokens; 1 while nothing is distant.
double cache_keep_rate(const kvstore::CompressedKvCache& cache);

struct CompressedPrefill {
  kvstore::CompressedKvCache cache;  // draws from the caller's pool
  double prefill_seconds = 0.0;      // the full-attention forward pass
  double compress_seconds = 0.0;     // flags (gates) and building the cache
};

// One full-attention prefill of `tokens` with the plan's observers (gate,
// attention statistics; the forward's own observer still sees it), then
// the plan's compressed cache of exactly the prompt, built in `pool` (which
// must outlive the cache and hold whole K/V and gate rows per page:
// INVALID_ARGUMENT before any work otherwise; RESOURCE_EXHAUSTED if it is
// too small — size it with compressed_pool_bytes). Dense gets the
// single-layer layout with every flag 1. The last token's logits go to
// `logits`. Errors as for prefill_for_policies.
Result<CompressedPrefill> prefill_compressed(CpuForward& forward,
                                             const std::shared_ptr<const PolicyPlan>& plan,
                                             std::span<const int32_t> tokens,
                                             kvstore::PagePool* pool, std::span<float> logits);

// One job of prefill_compressed_batch.
struct CompressedPrefillJob {
  std::shared_ptr<const PolicyPlan> plan;
  std::span<const int32_t> tokens;
  kvstore::PagePool* pool = nullptr;  // as for prefill_compressed
  std::span<float> logits;            // the last prompt token's (n_vocab floats)
  // Called (engine thread) as soon as a wire segment is built: after the
  // last layer of its slots' blocks, in wire order (index 0, 1, ...), with
  // its pages in wire order — the cache's own pages in `pool`, final from
  // then on. The prefill node ships them while later layers compute. An
  // error fails this job only (no more calls for it; the batch goes on).
  // May be empty.
  std::function<Status(int64_t index, const kvstore::WireSlotGroup& group,
                       std::span<const kvstore::PageId> pages)>
      on_segment;
};

// The prefill node's form: ONE layer-major full-attention prefill of every
// job's prompt together (CpuForward::prefill_layers; each job's result is
// bit-identical to prefill_compressed of it alone), each job's compressed
// cache built slot by slot as its blocks complete and handed out segment by
// segment through on_segment, so the transfer overlaps the prefill.
// `on_layer` runs after each layer (after the segments of that layer): a
// place to move the transport and check cancels; an error stops the whole
// batch. The outer error: bad arguments for any job (as prefill_compressed,
// and a policy that needs attention statistics batched with others:
// INVALID_ARGUMENT) or an error of the prefill or `on_layer`. Otherwise one
// result per job, in order: its cache, or the error that failed it
// (on_segment's, the pool's, the gate's).
Result<std::vector<Result<CompressedPrefill>>> prefill_compressed_batch(
    CpuForward& forward, std::span<CompressedPrefillJob> jobs,
    const std::function<Status(int64_t layer)>& on_layer = {});

// Runs one full-attention prefill of `tokens` (the forward's current layer
// observer, if any, still sees it) and returns one sequence per plan, in
// plan order, each holding the prompt and able to grow to capacity_tokens.
// The logits of the last prompt token (the same for every policy: the
// prefill is dense) go to `logits`; `prefill_seconds`, if given, receives
// the prefill's time (each sequence's compression is timed on its own).
// Errors: empty prompt or plans, capacity below the prompt, a logits buffer
// smaller than the vocabulary (INVALID_ARGUMENT); snapkv plans with
// different observation windows (INVALID_ARGUMENT: one prefill records one);
// engine, gate and cache errors as they come.
Result<std::vector<std::unique_ptr<PolicySequence>>> prefill_for_policies(
    CpuForward& forward, std::span<const std::shared_ptr<const PolicyPlan>> plans,
    std::span<const int32_t> tokens, int64_t capacity_tokens, std::span<float> logits,
    double* prefill_seconds = nullptr);

// One sequence under one policy after the shared prefill. Owned and driven
// by the forward's thread; keeps its plan (and the gate model) alive.
class PolicySequence {
 public:
  ~PolicySequence();
  PolicySequence(const PolicySequence&) = delete;
  PolicySequence& operator=(const PolicySequence&) = delete;

  // One decode step: appends `token`, writes its next-token logits
  // (n_vocab floats). OUT_OF_RANGE past the capacity; engine and gate errors
  // as they come (the sequence must not be used after an error).
  Status decode(int32_t token, std::span<float> logits);

  const PolicyPlan& plan() const { return *plan_; }
  int64_t n_tokens() const;
  int64_t capacity_tokens() const { return capacity_tokens_; }
  // Bytes the policy holds for the n_tokens() tokens now in the cache: the
  // dense cache's, or the compressed cache's footprint (DESIGN.md §4).
  int64_t kv_bytes() const;
  // A dense fp16 cache of n_tokens() tokens.
  int64_t kv_dense_bytes() const;
  // Retained distant tokens over all (block, head) slots divided by
  // n_slots x distant tokens at n_tokens(); 1 for dense and while nothing
  // is distant.
  double keep_rate() const;
  // The compressed cache (null for dense).
  const kvstore::CompressedKvCache* compressed_cache() const {
    return cache_ ? &*cache_ : nullptr;
  }
  // Time to build this policy's cache from the dense one (flags, gate rows).
  double compress_seconds() const { return compress_seconds_; }

 private:
  friend Result<std::vector<std::unique_ptr<PolicySequence>>> prefill_for_policies(
      CpuForward&, std::span<const std::shared_ptr<const PolicyPlan>>, std::span<const int32_t>,
      int64_t, std::span<float>, double*);
  PolicySequence(CpuForward& forward, std::shared_ptr<const PolicyPlan> plan,
                 int64_t capacity_tokens);

  CpuForward& forward_;
  std::shared_ptr<const PolicyPlan> plan_;
  int64_t capacity_tokens_;
  double compress_seconds_ = 0.0;
  std::unique_ptr<KvCache> dense_;                 // dense policy
  std::unique_ptr<kvstore::PagePool> pool_;        // the others; outlives cache_
  std::optional<kvstore::CompressedKvCache> cache_;
  std::shared_ptr<const AttentionStats> stats_;    // h2o, snapkv (shared between them)
  std::unique_ptr<GateDecoder> gate_decoder_;      // gate, gate+pod
  GateDecision gate_decision_;
  std::vector<uint8_t> flags_;                     // one step's flags, reused
};

}  // namespace kvgate::engine
