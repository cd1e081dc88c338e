// Checks a PrefillJob from a peer before it is queued, and resolves its KV
// policy for this node's model and gate (docs/cluster.md step 4).
//
// Pure function of immutable inputs: safe on any thread (the io_context
// calls it as the job arrives, so a bad job is answered at once and never
// takes a queue slot).
#pragma once

#include <cstdint>
#include <memory>

#include "common/control_protocol.h"
#include "common/status.h"
#include "engine/gate.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "engine/sampler.h"

namespace kvgate::prefill {

struct JobLimits {
  int64_t max_context_tokens = 0;  // model.max_context_tokens or the model's own
  int64_t page_bytes = 0;          // decode.page_tokens * head_dim * 2
};

// The job's plan, or INVALID_ARGUMENT naming the field that is wrong:
// request_id / lease_id of 0, an empty prompt or one longer than the
// context, a token id outside the vocabulary ("prompt_token_ids[3]: ..."),
// sampling parameters out of range ("generation.sampling.top_p: ..."), an
// unknown policy or parameter ("kv_policy.name: ..."), a gate policy on a
// node without a gate file, a policy whose gate rows do not fit whole in
// the decode node's pages, a missing decode address or pool descriptor.
Result<std::shared_ptr<const engine::PolicyPlan>> check_job(
    const control::PrefillJob& job, const engine::LlamaModel& model,
    const std::shared_ptr<const engine::GateModel>& gate, const JobLimits& limits);

// The engine's sampling parameters of a job.
engine::SamplingParams sampling_params(const control::SamplingParams& p);

}  // namespace kvgate::prefill
