// Batched decode of compressed sequences of mixed KV policies (DESIGN.md §3
// "decode steps a batch of sequences of different lengths together", §4).
//
// The decode node holds many requests, each a CompressedKvCache adopted from
// a prefill node's wire image, each under its own policy. BatchDecoder runs
// one decode step over all of them: items are grouped by policy plan (the
// same PolicyPlan object), each group is one CpuForward::forward_compressed
// call; gate policies get a GateDecoder (one per plan, reused) bound to the
// group's caches as the forward's layer observer, so every new token's flags
// are set during the step (deferred flags); the other policies take their
// flags from policy_flags() at the token's position (h2o/snapkv: tokens past
// the prompt are kept, in budget mode while the slot's budget lasts — the
// prompt length is all policy_flags needs for them).
//
// Page growth is the caller's: before a step every cache's page source must
// hold max_append_pages(cache) free pages (the decode node extends the
// request's lease first), so a step never fails half-way for lack of pages.
// A group whose forward fails anyway reports the error for each of its items
// (their caches may have advanced: the caller must drop them); other groups
// are unaffected.
//
// Threading: owned by the engine thread that owns the CpuForward and the
// caches; step() blocks for the forward passes. Not synchronized.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/gate_runtime.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "kvstore/compressed_cache.h"

namespace kvgate::engine {

// Pages the next append to `cache` may take at most: a new ring page round
// (K and V per (layer, head), and a gate ring round) while the window still
// fills, or, once a token leaves the window each step, the pages that token
// would need in every slot were its flag 1 there (the flags of the leaving
// token are not visible from outside the cache, so all are assumed kept).
int64_t max_append_pages(const kvstore::CompressedKvCache& cache);

// One sequence's share of a step.
struct DecodeItem {
  // The policy the cache was built for; items with the same plan object
  // share one forward call. Must stay alive for the step.
  const PolicyPlan* plan = nullptr;
  kvstore::CompressedKvCache* cache = nullptr;
  int32_t token = 0;           // appended at cache->n_tokens()
  int64_t prompt_tokens = 0;   // h2o/snapkv: the prompt length their ranking covered
};

// The step's shape shared by the CPU and GPU batch decoders: checks the
// arguments (INVALID_ARGUMENT, nothing run: sizes that do not match, an
// item without plan or cache), then calls run_group(members) for each run
// of items with the same plan (item order kept within a plan, at most
// max_group members per call; `order` is scratch) and sets every member's
// status to its group's result. `what` prefixes the errors.
Status step_by_plan(std::span<const DecodeItem> items, std::span<float> logits, int64_t n_vocab,
                    std::span<Status> statuses, size_t max_group, std::vector<size_t>& order,
                    const char* what,
                    const std::function<Status(std::span<const size_t> members)>& run_group);

// The forward's items of one group (members of `items`, all of `plan`):
// for a gate policy every token's flags deferred (the gate sets them during
// the step; FAILED_PRECONDITION without a gate model), else its flags from
// policy_flags() at its position (h2o/snapkv read only the prompt length
// for tokens past the prompt; INVALID_ARGUMENT for a sequence shorter than
// its prompt). `flags` is scratch, one vector per member, borrowed by
// `batch` until the next call. `what` prefixes the errors.
Status group_items(const PolicyPlan& plan, std::span<const size_t> members,
                   std::span<const DecodeItem> items, std::vector<std::vector<uint8_t>>& flags,
                   std::vector<CompressedItem>& batch, const char* what);

// Copies a group's logits (n_vocab per member, member order) into the
// step's rows (n_vocab per item, item order).
void scatter_group_logits(std::span<const size_t> members, std::span<const float> group_logits,
                          int64_t n_vocab, std::span<float> logits);

class BatchDecoder {
 public:
  explicit BatchDecoder(CpuForward& forward);
  BatchDecoder(const BatchDecoder&) = delete;
  BatchDecoder& operator=(const BatchDecoder&) = delete;

  // One decode step. `logits` receives n_vocab floats per item, in item
  // order; `statuses` one Status per item (OK, or the error of its group).
  // INVALID_ARGUMENT (nothing run) for mismatched sizes or an item without a
  // plan or cache. Restores the forward's previous layer observer.
  Status step(std::span<const DecodeItem> items, std::span<float> logits,
              std::span<Status> statuses);

  // Drops the per-plan state of plans no longer used (their GateDecoders).
  void forget_plan(const PolicyPlan* plan);

 private:
  Status run_group(std::span<const size_t> members, std::span<const DecodeItem> items,
                   std::span<float> logits);

  CpuForward& forward_;
  std::map<const PolicyPlan*, std::unique_ptr<GateDecoder>> gate_decoders_;
  // Reused per step (no allocation once warm).
  std::vector<CompressedItem> batch_;
  std::vector<kvstore::CompressedKvCache*> caches_;
  std::vector<std::vector<uint8_t>> flags_;  // per group member
  std::vector<float> group_logits_;
  std::vector<size_t> order_;
};

}  // namespace kvgate::engine
