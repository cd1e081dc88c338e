// CudaBatchDecoder: engine::BatchDecoder (engine/batch_decode.h) on the GPU
// — one decode step over compressed sequences of mixed KV policies whose
// caches live in device memory (a device page pool). Items are grouped by
// policy plan; each group is one CudaForward::decode_compressed call. Gate
// policies get the gate's weights on the device (CudaGateWeights, made on a
// plan's first step and kept until forget_plan), so the new tokens' flags
// are computed during the step; the other policies take their flags from
// policy_flags() as on the CPU. Page growth is the caller's, as for
// BatchDecoder (max_append_pages before each step).
//
// Threading: owned by the thread that owns the CudaForward and the caches;
// step() blocks until the step is done. Not synchronized.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/batch_decode.h"
#include "engine/cuda/cuda_forward.h"
#include "engine/policy_cache.h"

namespace kvgate::engine::cuda {

class CudaBatchDecoder {
 public:
  // `flush`: the device page pool's flush (cuda_forward.h, PageFlush).
  CudaBatchDecoder(CudaForward& forward, PageFlush flush);
  CudaBatchDecoder(const CudaBatchDecoder&) = delete;
  CudaBatchDecoder& operator=(const CudaBatchDecoder&) = delete;

  // As BatchDecoder::step: `logits` gets n_vocab floats per item in item
  // order, `statuses` one Status per item (OK, or its group's error);
  // INVALID_ARGUMENT (nothing run) for mismatched sizes or an item without
  // a plan or cache. Groups are cut at the forward's max_decode_batch.
  Status step(std::span<const DecodeItem> items, std::span<float> logits,
              std::span<Status> statuses);

  // Drops a plan's device gate weights.
  void forget_plan(const PolicyPlan* plan);

 private:
  Status run_group(std::span<const size_t> members, std::span<const DecodeItem> items,
                   std::span<float> logits);

  CudaForward& forward_;
  PageFlush flush_;
  std::map<const PolicyPlan*, std::unique_ptr<CudaGateWeights>> gates_;
  std::vector<CompressedItem> batch_;
  std::vector<std::vector<uint8_t>> flags_;
  std::vector<float> group_logits_;
  std::vector<size_t> order_;
};

}  // namespace kvgate::engine::cuda
