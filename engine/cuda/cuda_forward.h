// CudaForward: the llama forward pass of one sequence on the GPU, with a
// dense fp16 KV cache in device memory — CpuForward's arithmetic (the
// reference) on the CUDA kernels of this folder.
//
// Paths:
//  - prefill(tokens): chunks of up to max_prefill_tokens; a chunk of more
//    than kGemvMaxTokens tokens multiplies through cuBLAS on fp16 weight
//    copies (gemm.h), smaller ones through the GEMV (the CPU's quantized
//    arithmetic); causal attention by prefill_attention. Leaves the last
//    token's logits (and their argmax) on the device.
//  - decode(token): one token through the GEMV path and decode_attention
//    with every cached token proximal (the dense special case of the
//    compressed layout's task: one "page" per KV head spanning the cache).
//  - decode_compressed(items): one step of a batch of sequences whose KV
//    caches are kvstore's block-gated PoD caches (compressed_cache.h) with
//    pages in device memory (a device page pool): K/V rows written into the
//    caches' ring rows, decode_attention over each (item, layer, KV head)'s
//    proximal and distant pages (records from compressed_step.h), the
//    window-context Attention-Gate of the new token on the device, logits
//    of every item. The batch goes through the GEMV (<= 8 items) or cuBLAS.
//  - capture_decode_graph() / decode_graph(): the same decode step captured
//    once into a CUDA graph and replayed. Every buffer is allocated at
//    construction for max_context_tokens / max_prefill_tokens, so a step
//    allocates nothing and launches the same kernels with the same
//    arguments every time; what changes per step (the token, its position,
//    the attention length) lives in device memory (DecodeStep and the
//    AttnTask records) and is read there by the kernels. Graph and plain
//    steps run identical kernels: their results are the same bits.
//
// Ownership and threading: owns its device memory (weights uploaded once;
// several GiB for an 8B model), stream, cuBLAS handle and graph. Driven by
// one thread. Calls enqueue on the forward's stream and return without
// waiting, except where a host output is asked for (logits_out,
// greedy_token(), logits(), synchronize()): those block until the stream
// is done. Errors of kernels already enqueued surface at that point.
//
// Errors: INVALID_ARGUMENT (empty prompt, token outside the vocabulary),
// OUT_OF_RANGE (the cache is full), FAILED_PRECONDITION (a graph call
// before capture_decode_graph, a greedy step with no logits yet, any call
// after a failed step until reset()), UNIMPLEMENTED (weight types or shapes
// the kernels lack, named), RESOURCE_EXHAUSTED (device memory), and CUDA /
// cuBLAS failures as cuda_status maps them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/cuda/compressed_step.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/host_weights.h"
#include "engine/gate.h"
#include "engine/gate_runtime.h"
#include "engine/model.h"
#include "kvstore/compressed_cache.h"

namespace kvgate::engine::cuda {

struct CudaForwardOptions {
  int64_t max_context_tokens = 4096;  // dense KV cache rows per (layer, KV head)
  int64_t max_prefill_tokens = 512;   // tokens per prefill chunk (scratch rows)
  // Items of one decode_compressed step (<= max_prefill_tokens: the step
  // uses the prefill's scratch rows).
  int64_t max_decode_batch = 64;
  // Tensor parallelism (weights from shard_host_weights): called after the
  // attention-output (wo) and MLP-down (w_down) products with their n
  // partial sums (rows x n_embd floats, device memory) enqueued on the
  // forward's stream; must leave the ranks' sum in place, enqueued on that
  // stream (NcclCollective::all_reduce_sum made on CudaForward::stream(),
  // not synchronous). Empty: a single rank, nothing to reduce.
  std::function<Status(float* data_dev, size_t n, cudaStream_t stream)> all_reduce;
};

// The Attention-Gate's weights in device memory, arranged by the layer at
// which each layout slot's gate runs, for decode_compressed over caches of
// one layout (one per policy plan, as engine::BatchDecoder keeps one
// GateDecoder per plan). UNIMPLEMENTED for gates the GPU step does not run
// (make_gate_schedule: linear kind, cache context); UNAVAILABLE without a
// device. Immutable once made; used by one forward's thread.
class CudaGateWeights {
 public:
  static Result<std::unique_ptr<CudaGateWeights>> create(const GateModel& gate,
                                                         const kvstore::KvLayout& layout);
  ~CudaGateWeights();
  CudaGateWeights(const CudaGateWeights&) = delete;
  CudaGateWeights& operator=(const CudaGateWeights&) = delete;

  const GateSchedule& schedule() const;
  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  explicit CudaGateWeights(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Called by decode_compressed after every cache's begin_append() and
// before any kernel reads the pages: enqueues on `stream` the page copies
// the caches recorded (a token leaving the window moved into a retained
// list) — a device page pool's flush. Must not synchronize the stream.
using PageFlush = std::function<Status(cudaStream_t stream)>;

// Prefill only: called for each layer of each prefill chunk right after
// the layer's attention RMSNorm, with the chunk's normalized input (n_rows
// x n_embd floats, device memory) at positions [first_pos, first_pos +
// n_rows) — what a CPU LayerInputObserver sees. Must only enqueue work on
// `stream` (the gate's projections, CudaGatePrefill::observe).
using PrefillObserver = std::function<Status(int64_t layer, const float* xn_dev, int64_t n_rows,
                                             int64_t first_pos, cudaStream_t stream)>;

class CudaForward {
 public:
  // Uploads the weights and allocates every buffer. Layer matrices must be
  // F16, Q4_1 or Q8_0 (GEMV), the embedding F32, F16, Q4_1 or Q8_0; head
  // shapes within decode and prefill attention's limits (launch_plan.h).
  // Blocks until the upload is done.
  static Result<std::unique_ptr<CudaForward>> create(const HostWeights& weights,
                                                     const CudaForwardOptions& options);
  ~CudaForward();
  CudaForward(const CudaForward&) = delete;
  CudaForward& operator=(const CudaForward&) = delete;

  // Appends tokens at n_tokens(). If logits_out is set, waits and copies
  // the last token's n_vocab logits there.
  Status prefill(std::span<const int32_t> tokens, float* logits_out = nullptr);

  // One decode step of `token` at position n_tokens() (no graph).
  Status decode(int32_t token, float* logits_out = nullptr);

  // One decode step of a batch of compressed caches (all of one layout: a
  // caller with several policies calls once per policy group), pages in
  // device memory. Each item's token is appended at cache->n_tokens() with
  // its flags (or, with `gate`, deferred: the gate computes them on the
  // device and they are set with set_flag_unchecked before this returns;
  // in budget mode, decision.retained_budget_tokens > 0, they are 0).
  // `flush` runs after the appends (see PageFlush). logits_out receives
  // n_vocab floats per item in item order (want_logits is ignored: every
  // row is computed); blocks until the step is done. Independent of the
  // forward's own dense cache (prefill/decode), which it leaves as is.
  // Errors: INVALID_ARGUMENT (no items or more than max_decode_batch, a
  // token outside the vocabulary, a cache that does not match the model or
  // the first item's layout, a gate whose schedule does not match), a
  // cache's begin_append error (earlier items may have appended: the
  // caller drops them, as after CpuForward::forward_compressed), the
  // flush's error; a failure after the appends poisons the forward.
  Status decode_compressed(std::span<const CompressedItem> items, float* logits_out,
                           const PageFlush& flush, const CudaGateWeights* gate = nullptr,
                           const GateDecision& decision = {});

  // Sets (or, empty, clears) the prefill observer.
  void set_prefill_observer(PrefillObserver observer);

  // The dense cache's K and V of positions [0, n_tokens()) as
  // [layer][K|V][kv_head][n_tokens()][head_dim] fp16 in `out` (resized);
  // waits for the stream. For building a compressed cache on the host.
  Status download_kv(std::vector<uint16_t>& out);

  // Captures one decode step into a CUDA graph (replaces an earlier one).
  // Enqueues nothing and leaves the cache and n_tokens() as they are.
  Status capture_decode_graph();
  bool has_decode_graph() const;

  // The captured step for `token` at n_tokens(): the token and position are
  // copied into device memory, then the graph is launched.
  Status decode_graph(int32_t token, float* logits_out = nullptr);

  // The captured step fed with the previous step's greedy token, which is
  // already in device memory: no host-to-device traffic at all, so steps
  // can be chained without waiting (greedy decoding at the GPU's pace).
  Status decode_graph_greedy(float* logits_out = nullptr);

  // The argmax (lowest id on ties, as engine::argmax) of the last step's
  // logits, computed on the device; waits for the stream.
  Result<int32_t> greedy_token();
  // The last step's n_vocab logits; waits for the stream.
  Status logits(float* out);
  // Waits for everything enqueued; the first error of the stream's work.
  Status synchronize();

  // Empties the cache (positions restart at 0) and clears a failed state.
  // The graph stays valid (it reads positions from device memory).
  void reset();

  int64_t n_tokens() const;
  // The stream every call enqueues on (for a collective that must join it).
  cudaStream_t stream() const;
  const LlamaConfig& config() const;
  const CudaForwardOptions& options() const;
  // Device bytes: weights as the GEMV reads them (a decode step reads all
  // of them once), their fp16 copies for the prefill GEMM, the KV cache.
  size_t gemv_weight_bytes() const;
  size_t gemm_weight_bytes() const;
  size_t kv_cache_bytes() const;

 private:
  struct Impl;
  explicit CudaForward(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvgate::engine::cuda
