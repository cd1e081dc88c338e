#include "prefill/job_check.h"

#include <string>

#include "common/config.h"
#include "engine/kv_policy_spec.h"

namespace kvgate::prefill {

engine::SamplingParams sampling_params(const control::SamplingParams& p) {
  engine::SamplingParams s;
  s.temperature = p.temperature;
  s.top_k = p.top_k;
  s.top_p = p.top_p;
  s.min_p = p.min_p;
  s.repetition_penalty = p.repetition_penalty;
  s.repetition_window = p.repetition_window;
  s.seed = p.seed;
  return s;
}

Result<std::shared_ptr<const engine::PolicyPlan>> check_job(
    const control::PrefillJob& job, const engine::LlamaModel& model,
    const std::shared_ptr<const engine::GateModel>& gate, const JobLimits& limits) {
  const engine::LlamaConfig& c = model.config();
  if (!job.request_id.valid()) return invalid_argument("request_id: must not be 0");
  if (!job.lease_id.valid()) return invalid_argument("lease_id: must not be 0");
  const auto n = static_cast<int64_t>(job.prompt_token_ids.size());
  if (n == 0) return invalid_argument("prompt_token_ids: the prompt is empty");
  if (n > limits.max_context_tokens) {
    return invalid_argument("prompt_token_ids: " + std::to_string(n) +
                            " tokens exceed the context of " +
                            std::to_string(limits.max_context_tokens));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = job.prompt_token_ids[static_cast<size_t>(i)];
    if (t < 0 || t >= c.n_vocab) {
      return invalid_argument("prompt_token_ids[" + std::to_string(i) + "]: token id " +
                              std::to_string(t) + " is outside the vocabulary (0.." +
                              std::to_string(c.n_vocab - 1) + ")");
    }
  }
  if (Status s = sampling_params(job.generation.sampling).validate(); !s.ok()) {
    return invalid_argument("generation.sampling: " + s.message());
  }
  if (job.decode_transport_address.empty()) {
    return invalid_argument("decode_transport_address: empty");
  }
  if (auto addr = parse_host_port(job.decode_control_address); !addr.ok()) {
    return invalid_argument("decode_control_address: " + addr.status().message());
  }
  if (job.pool_descriptor.empty()) return invalid_argument("pool_descriptor: empty");

  auto policy = engine::kv_policy_from_spec(job.kv_policy, gate);
  if (!policy.ok()) {
    // A gate policy on a node without a gate is the job's fault here (the
    // coordinator asked for what this node cannot do): kInvalidArgument,
    // with the field the spec parser already named.
    return invalid_argument(policy.status().message());
  }
  auto plan = engine::plan_kv_policy(c, *policy);
  if (!plan.ok()) return invalid_argument("kv_policy: " + plan.status().message());
  const kvstore::KvLayout& layout = (*plan)->layout;
  if (layout.has_gate_state() && limits.page_bytes % layout.gate_state_bytes_per_token != 0) {
    return invalid_argument("kv_policy.name: " + job.kv_policy.name + ": gate rows of " +
                            std::to_string(layout.gate_state_bytes_per_token) +
                            " bytes do not fit whole in the decode pages of " +
                            std::to_string(limits.page_bytes) + " bytes (decode.page_tokens)");
  }
  return *plan;
}

}  // namespace kvgate::prefill
