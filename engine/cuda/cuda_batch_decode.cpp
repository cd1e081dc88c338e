#include "engine/cuda/cuda_batch_decode.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "engine/kv_policy.h"

namespace kvgate::engine::cuda {

CudaBatchDecoder::CudaBatchDecoder(CudaForward& forward, PageFlush flush)
    : forward_(forward), flush_(std::move(flush)) {}

void CudaBatchDecoder::forget_plan(const PolicyPlan* plan) {
  gates_.erase(plan);
}

Status CudaBatchDecoder::step(std::span<const DecodeItem> items, std::span<float> logits,
                              std::span<Status> statuses) {
  const int64_t n_vocab = forward_.config().n_vocab;
  if (statuses.size() != items.size()) {
    return invalid_argument("cuda batch decode: " + std::to_string(statuses.size()) +
                            " statuses for " + std::to_string(items.size()) + " items");
  }
  if (static_cast<int64_t>(logits.size()) < static_cast<int64_t>(items.size()) * n_vocab) {
    return invalid_argument("cuda batch decode: logits buffer smaller than items x vocabulary");
  }
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].plan == nullptr || items[i].cache == nullptr) {
      return invalid_argument("cuda batch decode: item " + std::to_string(i) +
                              " has no plan or cache");
    }
  }
  order_.resize(items.size());
  for (size_t i = 0; i < items.size(); ++i) order_[i] = i;
  std::stable_sort(order_.begin(), order_.end(),
                   [&](size_t a, size_t b) { return items[a].plan < items[b].plan; });
  const auto max_group =
      static_cast<size_t>(std::max<int64_t>(1, forward_.options().max_decode_batch));
  size_t at = 0;
  while (at < order_.size()) {
    size_t end = at + 1;
    while (end < order_.size() && items[order_[end]].plan == items[order_[at]].plan &&
           end - at < max_group) {
      ++end;
    }
    const std::span<const size_t> members(order_.data() + at, end - at);
    const Status s = run_group(members, items, logits);
    for (size_t m : members) statuses[m] = s;
    at = end;
  }
  return Status();
}

Status CudaBatchDecoder::run_group(std::span<const size_t> members,
                                   std::span<const DecodeItem> items, std::span<float> logits) {
  const int64_t n_vocab = forward_.config().n_vocab;
  const PolicyPlan& plan = *items[members[0]].plan;
  const size_t n = members.size();
  batch_.clear();
  if (flags_.size() < n) flags_.resize(n);
  group_logits_.resize(n * static_cast<size_t>(n_vocab));
  Status run;
  if (policy_uses_gate(plan.config)) {
    if (!plan.config.gate) {
      return failed_precondition(std::string("cuda batch decode: policy '") + plan.name +
                                 "' has no gate model");
    }
    auto& weights = gates_[&plan];
    if (!weights) {
      auto made = CudaGateWeights::create(*plan.config.gate, plan.layout);
      if (!made.ok()) {
        gates_.erase(&plan);
        return made.status();
      }
      weights = std::move(*made);
    }
    for (size_t m : members) batch_.push_back(CompressedItem{items[m].cache, items[m].token, {}, true});
    run = forward_.decode_compressed(batch_, group_logits_.data(), flush_, weights.get(),
                                     plan.config.effective_gate_decision());
  } else {
    for (size_t k = 0; k < n; ++k) {
      const DecodeItem& item = items[members[k]];
      AttentionStats prompt_only;
      prompt_only.n_tokens = item.prompt_tokens;
      const AttentionStats* stats = policy_needs_stats(plan.config) ? &prompt_only : nullptr;
      if (policy_needs_stats(plan.config) && item.cache->n_tokens() < item.prompt_tokens) {
        return invalid_argument("cuda batch decode: a sequence shorter than its prompt");
      }
      KVGATE_RETURN_IF_ERROR(
          policy_flags(plan.config, plan.layout, item.cache->n_tokens(), 1, flags_[k], stats));
      batch_.push_back(CompressedItem{item.cache, item.token, flags_[k], true});
    }
    run = forward_.decode_compressed(batch_, group_logits_.data(), flush_);
  }
  if (!run.ok()) return run;
  for (size_t k = 0; k < n; ++k) {
    std::memcpy(logits.data() + members[k] * static_cast<size_t>(n_vocab),
                group_logits_.data() + k * static_cast<size_t>(n_vocab),
                static_cast<size_t>(n_vocab) * sizeof(float));
  }
  return Status();
}

}  // namespace kvgate::engine::cuda
