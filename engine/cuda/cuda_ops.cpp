#include "engine/cuda/cuda_ops.h"

#include <cmath>
#include <string>

#include "engine/cuda/kernels.h"

namespace kvgate::engine::cuda {
namespace {

Status launched(cudaError_t err, const char* what) {
  return cuda_status(static_cast<int>(err), what);
}

Status need(const void* p, const char* what) {
  if (p == nullptr) return invalid_argument(std::string("cuda: ") + what + " is null");
  return Status();
}

constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

}  // namespace

Status gemv(const GemvPlan& plan, const void* w_dev, const float* x_dev, int64_t n_tokens,
            float* y_dev, void* workspace_dev, cudaStream_t stream) {
  if (n_tokens < 1 || n_tokens > plan.n_tokens) {
    return invalid_argument("cuda gemv: " + std::to_string(n_tokens) + " tokens for a plan of " +
                            std::to_string(plan.n_tokens));
  }
  KVGATE_RETURN_IF_ERROR(need(w_dev, "gemv weights"));
  KVGATE_RETURN_IF_ERROR(need(x_dev, "gemv input"));
  KVGATE_RETURN_IF_ERROR(need(y_dev, "gemv output"));
  if (plan.type == GgmlType::kF16) {
    return launched(kernels::gemv_f16(w_dev, plan.rows, plan.cols, x_dev, n_tokens, y_dev, stream),
                    "gemv f16 launch");
  }
  KVGATE_RETURN_IF_ERROR(need(workspace_dev, "gemv workspace"));
  auto* ws = static_cast<char*>(workspace_dev);
  auto* qs = reinterpret_cast<int8_t*>(ws + plan.acts_qs_offset);
  auto* d = reinterpret_cast<float*>(ws + plan.acts_d_offset);
  auto* s = reinterpret_cast<float*>(ws + plan.acts_s_offset);
  const bool q41 = plan.type == GgmlType::kQ4_1;
  KVGATE_RETURN_IF_ERROR(
      launched(kernels::quantize_q8(x_dev, n_tokens, plan.cols, qs, d, s, q41, stream),
               "activation quantization launch"));
  if (q41) {
    return launched(
        kernels::gemv_q4_1(w_dev, plan.rows, plan.cols, qs, d, s, n_tokens, y_dev, stream),
        "gemv q4_1 launch");
  }
  return launched(kernels::gemv_q8_0(w_dev, plan.rows, plan.cols, qs, d, n_tokens, y_dev, stream),
                  "gemv q8_0 launch");
}

Status rms_norm(const float* x_dev, const float* weight_dev, float* out_dev, int64_t n_rows,
                int64_t n, float eps, cudaStream_t stream) {
  if (n_rows < 1 || n < 1 || n_rows > kMaxGridX) {
    return invalid_argument("cuda rms_norm: rows (" + std::to_string(n_rows) + ") and n (" +
                            std::to_string(n) + ") must be >= 1");
  }
  KVGATE_RETURN_IF_ERROR(need(x_dev, "rms_norm input"));
  KVGATE_RETURN_IF_ERROR(need(weight_dev, "rms_norm weight"));
  KVGATE_RETURN_IF_ERROR(need(out_dev, "rms_norm output"));
  return launched(kernels::rms_norm(x_dev, weight_dev, out_dev, n_rows, n, eps, stream),
                  "rms_norm launch");
}

Status rope_norm(float* x_dev, int64_t n_rows, int64_t n_heads, int64_t head_dim,
                 const int32_t* positions_dev, float freq_base, cudaStream_t stream) {
  if (n_rows < 1 || n_heads < 1 || head_dim < 2 || head_dim % 2 != 0 || n_rows > kMaxGridX ||
      head_dim > 8192) {
    return invalid_argument("cuda rope: rows (" + std::to_string(n_rows) + ") and heads (" +
                            std::to_string(n_heads) + ") must be >= 1 and head_dim (" +
                            std::to_string(head_dim) + ") even in [2, 8192]");
  }
  if (!(freq_base > 1.0f) || !std::isfinite(freq_base)) {
    return invalid_argument("cuda rope: freq_base must be a finite number > 1");
  }
  KVGATE_RETURN_IF_ERROR(need(x_dev, "rope input"));
  KVGATE_RETURN_IF_ERROR(need(positions_dev, "rope positions"));
  // The same float expression as engine/cpu/ops.cpp, so the angle chains
  // start from the same bits.
  const float theta_scale = std::pow(freq_base, -2.0f / static_cast<float>(head_dim));
  return launched(
      kernels::rope_norm(x_dev, n_rows, n_heads, head_dim, positions_dev, theta_scale, stream),
      "rope launch");
}

Status swiglu(const float* gate_dev, const float* up_dev, float* out_dev, int64_t n,
              cudaStream_t stream) {
  if (n < 1) return invalid_argument("cuda swiglu: n must be >= 1");
  KVGATE_RETURN_IF_ERROR(need(gate_dev, "swiglu gate"));
  KVGATE_RETURN_IF_ERROR(need(up_dev, "swiglu up"));
  KVGATE_RETURN_IF_ERROR(need(out_dev, "swiglu output"));
  return launched(kernels::swiglu(gate_dev, up_dev, out_dev, n, stream), "swiglu launch");
}

Status decode_attention(const AttentionPlan& plan, const AttnTask* tasks_dev, int64_t n_tasks,
                        float* workspace_dev, cudaStream_t stream) {
  if (n_tasks < 1 || n_tasks > plan.shape.n_tasks) {
    return invalid_argument("cuda attention: " + std::to_string(n_tasks) + " tasks for a plan of " +
                            std::to_string(plan.shape.n_tasks));
  }
  KVGATE_RETURN_IF_ERROR(need(tasks_dev, "attention tasks"));
  KVGATE_RETURN_IF_ERROR(need(workspace_dev, "attention workspace"));
  const float scale = 1.0f / std::sqrt(static_cast<float>(plan.shape.head_dim));
  return launched(
      kernels::decode_attention(tasks_dev, n_tasks, plan.shape.group, plan.shape.head_dim,
                                plan.shape.page_tokens, plan.n_splits, plan.rows_per_split, scale,
                                workspace_dev, plan.shared_bytes, stream),
      "attention launch");
}

Status prefill_attention(const PrefillAttentionPlan& plan, const float* q_dev, int64_t n_queries,
                         int64_t past, const uint16_t* k_dev, const uint16_t* v_dev, float* out_dev,
                         cudaStream_t stream) {
  const PrefillAttentionShape& s = plan.shape;
  if (n_queries < 1 || n_queries > s.max_queries) {
    return invalid_argument("cuda prefill attention: " + std::to_string(n_queries) +
                            " queries for a plan of " + std::to_string(s.max_queries));
  }
  if (past < 0 || past > s.max_context - n_queries) {
    return invalid_argument("cuda prefill attention: " + std::to_string(n_queries) +
                            " queries after " + std::to_string(past) + " tokens exceed the " +
                            std::to_string(s.max_context) + "-row cache");
  }
  KVGATE_RETURN_IF_ERROR(need(q_dev, "prefill attention queries"));
  KVGATE_RETURN_IF_ERROR(need(k_dev, "prefill attention keys"));
  KVGATE_RETURN_IF_ERROR(need(v_dev, "prefill attention values"));
  KVGATE_RETURN_IF_ERROR(need(out_dev, "prefill attention output"));
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  return launched(
      kernels::prefill_attention(q_dev, n_queries, s.n_heads, s.head_dim, k_dev, v_dev,
                                 s.max_context * s.head_dim, plan.group, past, scale, out_dev,
                                 plan.queries_per_warp, plan.shared_bytes, stream),
      "prefill attention launch");
}

Status gather_pages(const PageCopyPlan& plan, const void* const* pages_dev, void* staging_dev,
                    cudaStream_t stream) {
  if (plan.n_pages == 0) return Status();
  KVGATE_RETURN_IF_ERROR(need(pages_dev, "page list"));
  KVGATE_RETURN_IF_ERROR(need(staging_dev, "staging buffer"));
  return launched(
      kernels::gather_pages(pages_dev, plan.n_pages, plan.page_bytes, staging_dev, stream),
      "page gather launch");
}

Status scatter_pages(const PageCopyPlan& plan, const void* staging_dev, void* const* pages_dev,
                     cudaStream_t stream) {
  if (plan.n_pages == 0) return Status();
  KVGATE_RETURN_IF_ERROR(need(pages_dev, "page list"));
  KVGATE_RETURN_IF_ERROR(need(staging_dev, "staging buffer"));
  return launched(
      kernels::scatter_pages(staging_dev, plan.n_pages, plan.page_bytes, pages_dev, stream),
      "page scatter launch");
}

Status argmax(const float* logits_dev, int64_t n_rows, int64_t vocab, int32_t* out_dev,
              cudaStream_t stream) {
  KVGATE_RETURN_IF_ERROR(check_sampling_shape(n_rows, vocab));
  KVGATE_RETURN_IF_ERROR(need(logits_dev, "logits"));
  KVGATE_RETURN_IF_ERROR(need(out_dev, "token output"));
  return launched(kernels::argmax_rows(logits_dev, n_rows, vocab, out_dev, stream),
                  "argmax launch");
}

Status sample(const float* logits_dev, int64_t n_rows, int64_t vocab, const SampleRow* rows_dev,
              int32_t* out_dev, cudaStream_t stream) {
  KVGATE_RETURN_IF_ERROR(check_sampling_shape(n_rows, vocab));
  KVGATE_RETURN_IF_ERROR(need(logits_dev, "logits"));
  KVGATE_RETURN_IF_ERROR(need(rows_dev, "sampling rows"));
  KVGATE_RETURN_IF_ERROR(need(out_dev, "token output"));
  return launched(kernels::sample_rows(logits_dev, n_rows, vocab, rows_dev, out_dev,
                                       sampling_shared_bytes(), stream),
                  "sampling launch");
}

namespace {

// A plan made by plan_gate (a default or hand-edited one would launch a
// wrong grid).
Status check_gate_plan(const GatePlan& plan) {
  auto again = plan_gate(plan.n_tokens, plan.n_slots, plan.heads, plan.head_dim, plan.n_sink,
                         plan.n_window, plan.n_embd);
  if (!again.ok()) return again.status();
  if (again->project_blocks != plan.project_blocks || again->logit_blocks != plan.logit_blocks ||
      again->flag_blocks != plan.flag_blocks || again->dim != plan.dim) {
    return invalid_argument("cuda gate: plan does not come from plan_gate");
  }
  return Status();
}

}  // namespace

Status gate_project(const GatePlan& plan, const float* w_dev, const float* x_dev, float* proj_dev,
                    cudaStream_t stream) {
  KVGATE_RETURN_IF_ERROR(check_gate_plan(plan));
  KVGATE_RETURN_IF_ERROR(need(w_dev, "gate weights"));
  KVGATE_RETURN_IF_ERROR(need(x_dev, "gate input"));
  KVGATE_RETURN_IF_ERROR(need(proj_dev, "gate projections"));
  return launched(kernels::gate_project(w_dev, x_dev, plan.n_tokens, plan.n_slots, plan.dim,
                                        plan.n_embd, proj_dev, plan.project_blocks,
                                        plan.project_threads, stream),
                  "gate_project launch");
}

Status gate_logits_window(const GatePlan& plan, const float* proj_dev, const float* wo_dev,
                          const float* bias_dev, float* logits_dev, cudaStream_t stream) {
  KVGATE_RETURN_IF_ERROR(check_gate_plan(plan));
  KVGATE_RETURN_IF_ERROR(need(proj_dev, "gate projections"));
  KVGATE_RETURN_IF_ERROR(need(wo_dev, "gate wo"));
  KVGATE_RETURN_IF_ERROR(need(bias_dev, "gate bias"));
  KVGATE_RETURN_IF_ERROR(need(logits_dev, "gate logits"));
  return launched(kernels::gate_logits_window(proj_dev, plan.n_tokens, plan.n_slots,
                                              static_cast<int>(plan.heads),
                                              static_cast<int>(plan.head_dim), plan.n_sink,
                                              plan.n_window, wo_dev, bias_dev, logits_dev, stream),
                  "gate_logits_window launch");
}

Status gate_flags(const GatePlan& plan, const float* logits_dev, const float* threshold_dev,
                  float offset, uint8_t* flags_dev, cudaStream_t stream) {
  KVGATE_RETURN_IF_ERROR(check_gate_plan(plan));
  if (!std::isfinite(offset)) return invalid_argument("cuda gate_flags: offset is not finite");
  KVGATE_RETURN_IF_ERROR(need(logits_dev, "gate logits"));
  KVGATE_RETURN_IF_ERROR(need(threshold_dev, "gate thresholds"));
  KVGATE_RETURN_IF_ERROR(need(flags_dev, "gate flags"));
  return launched(kernels::gate_flags(logits_dev, plan.n_tokens, plan.n_slots, plan.n_sink,
                                      threshold_dev, offset, flags_dev, plan.flag_blocks,
                                      plan.flag_threads, stream),
                  "gate_flags launch");
}

}  // namespace kvgate::engine::cuda
