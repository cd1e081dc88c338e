// The prefill of a compressed cache on the GPU: the full-attention prefill
// on CudaForward, the Attention-Gate's prefill side on the device (the gate
// kernels of gate.cu, fed by the forward's PrefillObserver), then the
// compressed cache built from the downloaded dense K/V — the GPU form of
// engine::prefill_compressed (policy_cache.h), for the prefill node.
//
//   CudaGatePrefill: engine::GatePrefill's work on the device for the
//   window-context attention gate in threshold mode. observe() projects
//   each gate slot's [Wq;Wk;Wv] at its gate block's first layer, chunk by
//   chunk; finish() runs the window logits and the flags over the whole
//   prompt and returns GatePrefill::finish()'s outputs (flags per layout
//   slot, fp16 gate rows), so build_from_dense takes them unchanged.
//   Layout slots that share a gate slot copy its result, as on the CPU.
//
// Not covered on the GPU (UNIMPLEMENTED, naming the alternative): the
// linear gate, the cache gate context, budget mode (a top-k over the
// prompt's logits), and policies that rank by attention statistics (h2o,
// snapkv: the prefill attention kernel does not gather them).
//
// Threading: one owner thread, the forward's.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/cuda/cuda_forward.h"
#include "engine/gate.h"
#include "engine/gate_runtime.h"
#include "engine/policy_cache.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/page_pool.h"

namespace kvgate::engine::cuda {

class CudaGatePrefill {
 public:
  // For a prompt of n_tokens under caches of `layout` (make_gate_layout of
  // `gate`). Uploads the gate's weights; allocates the projections
  // (n_tokens x gate slots x 3D floats), logits and flags. `gate` and
  // `layout` must outlive this object.
  static Result<std::unique_ptr<CudaGatePrefill>> create(const GateModel& gate,
                                                         const kvstore::KvLayout& layout,
                                                         int64_t n_tokens);
  ~CudaGatePrefill();
  CudaGatePrefill(const CudaGatePrefill&) = delete;
  CudaGatePrefill& operator=(const CudaGatePrefill&) = delete;

  // A PrefillObserver (cuda_forward.h): enqueues the projections of the
  // gate slots based at `layer` for rows [first_pos, first_pos + n_rows).
  Status observe(int64_t layer, const float* xn_dev, int64_t n_rows, int64_t first_pos,
                 cudaStream_t stream);

  // After every layer was observed for every token: flags[slot * n_tokens
  // + t] and gate_rows [token][slot][2D] as GatePrefill::finish(). Waits
  // for `stream`. UNIMPLEMENTED in budget mode.
  Status finish(const GateDecision& decision, cudaStream_t stream, std::vector<uint8_t>& flags,
                std::vector<fp16_t>& gate_rows);
  kvstore::DenseGate dense_gate(const std::vector<fp16_t>& gate_rows) const;

  struct Impl;

 private:
  explicit CudaGatePrefill(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// engine::prefill_compressed on the GPU: resets `forward` (its dense cache
// holds the prompt afterwards), prefills `tokens` (the gate observing, for
// gate policies), builds the plan's compressed cache in `pool` from the
// downloaded K/V, and writes the last token's logits. Errors: empty prompt,
// a prompt longer than the forward's context, a logits span smaller than
// the vocabulary (INVALID_ARGUMENT); the unsupported policies above
// (UNIMPLEMENTED); forward, gate and cache errors as they come.
Result<CompressedPrefill> prefill_compressed_cuda(CudaForward& forward,
                                                  const std::shared_ptr<const PolicyPlan>& plan,
                                                  std::span<const int32_t> tokens,
                                                  kvstore::PageSource* pool,
                                                  std::span<float> logits);

// engine::prefill_compressed_batch's contract on the GPU, for the prefill
// node: the jobs run one after another (each prefill_compressed_cuda into
// its own pool); after each job, its wire segments are handed to
// on_segment in wire order (the cache is complete by then, so the transfer
// overlaps the next job's prefill rather than the job's own layers), then
// on_layer(-1) runs (the node moves its transport and checks cancels). A
// job's error fails that job only; the outer error is on_layer's or bad
// arguments (no jobs, a job without plan or pool).
Result<std::vector<Result<CompressedPrefill>>> prefill_compressed_batch_cuda(
    CudaForward& forward, std::span<CompressedPrefillJob> jobs,
    const std::function<Status(int64_t layer)>& on_layer = {});

}  // namespace kvgate::engine::cuda
