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
  group_logits_.resize(members.size() * static_cast<size_t>(n_vocab));
  KVGATE_RETURN_IF_ERROR(group_items(plan, members, items, flags_, batch_, "cuda batch decode"));
  Status run;
  if (policy_uses_gate(plan.config)) {
    auto& weights = gates_[&plan];
    if (!weights) {
      auto made = CudaGateWeights::create(*plan.config.gate, plan.layout);
      if (!made.ok()) {
        gates_.erase(&plan);
        return made.status();
      }
      weights = std::move(*made);
    }
    run = forward_.decode_compressed(batch_, group_logits_.data(), flush_, weights.get(),
                                     plan.config.effective_gate_decision());
  } else {
    run = forward_.decode_compressed(batch_, group_logits_.data(), flush_);
  }
  if (!run.ok()) return run;
  scatter_group_logits(members, group_logits_, n_vocab, logits);
  return Status();
}

}  // namespace kvgate::engine::cuda
