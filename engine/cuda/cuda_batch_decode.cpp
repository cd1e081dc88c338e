#include "engine/cuda/cuda_batch_decode.h"

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
  return step_by_plan(items, logits, forward_.config().n_vocab, statuses,
                      static_cast<size_t>(forward_.options().max_decode_batch), order_,
                      "cuda batch decode", [&](std::span<const size_t> members) {
                        return run_group(members, items, logits);
                      });
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
      KVGATE_RETURN_IF_ERROR(decode_step_flags(plan, item, flags_[k]));
      batch_.push_back(CompressedItem{item.cache, item.token, flags_[k], true});
    }
    run = forward_.decode_compressed(batch_, group_logits_.data(), flush_);
  }
  if (!run.ok()) return run;
  scatter_group_logits(members, group_logits_, n_vocab, logits);
  return Status();
}

}  // namespace kvgate::engine::cuda
