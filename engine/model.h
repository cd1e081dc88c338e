// Llama-family decoder on the CPU backend: weights read in place from the
// GGUF mapping, a dense per-sequence KV cache, and a forward pass that runs
// chunked prefill and batched decode of several sequences in one step.
//
// Threads: a LlamaModel is immutable after load and may be shared. A
// CpuForward owns its scratch buffers and thread pool and is driven by one
// thread (the engine loop); forward() blocks until the step is done.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/cpu/isa.h"
#include "engine/cpu/matmul.h"
#include "engine/cpu/thread_pool.h"
#include "engine/ggml_types.h"
#include "engine/gguf.h"
#include "kvstore/compressed_cache.h"

namespace kvgate::engine {

struct LlamaConfig {
  std::string architecture;
  int64_t n_layers = 0;
  int64_t n_embd = 0;
  int64_t n_ff = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t n_vocab = 0;
  int64_t n_ctx_train = 0;
  float rope_freq_base = 10000.0f;
  float rms_eps = 1e-5f;

  // Reads and checks the hyper-parameters; UNIMPLEMENTED for an
  // architecture other than llama, INVALID_ARGUMENT naming a bad key.
  static Result<LlamaConfig> from_gguf(const GgufFile& file);
  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
};

struct LayerWeights {
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  cpu::WeightView wq, wk, wv, wo;
  cpu::WeightView w_gate, w_up, w_down;
};

class LlamaModel {
 public:
  // Maps the file and binds every tensor; the error names a missing tensor,
  // a wrong shape or an unsupported type.
  static Result<std::unique_ptr<LlamaModel>> load(const std::string& path);
  static Result<std::unique_ptr<LlamaModel>> from_gguf(GgufFile file);

  const LlamaConfig& config() const { return config_; }
  const GgufFile& gguf() const { return file_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const cpu::WeightView& token_embd() const { return token_embd_; }
  const cpu::WeightView& output() const { return output_; }  // tied to token_embd when absent
  const float* output_norm() const { return output_norm_; }
  // Bytes of one token's K+V across all layers in the dense fp16 cache.
  int64_t kv_bytes_per_token() const { return 2 * config_.n_layers * config_.kv_dim() * 2; }

 private:
  explicit LlamaModel(GgufFile file) : file_(std::move(file)) {}
  Status bind();
  Result<cpu::WeightView> matrix(const std::string& name, int64_t cols, int64_t rows) const;
  Result<const float*> vector_f32(const std::string& name, int64_t n);

  GgufFile file_;
  LlamaConfig config_;
  std::vector<LayerWeights> layers_;
  cpu::WeightView token_embd_;
  cpu::WeightView output_;
  const float* output_norm_ = nullptr;
  std::vector<std::unique_ptr<float[]>> owned_;  // norms stored as F16/BF16 in the file, widened
};

// Dense KV cache of one sequence: per layer and KV head, `capacity` rows of
// head_dim fp16 keys (after RoPE) and values. Positions are token indices.
class KvCache {
 public:
  KvCache(const LlamaConfig& config, int64_t capacity_tokens);
  int64_t capacity() const { return capacity_; }
  int64_t n_tokens() const { return n_tokens_; }
  void set_n_tokens(int64_t n) { n_tokens_ = n; }
  int64_t bytes() const { return static_cast<int64_t>(data_.size() * sizeof(fp16_t)); }
  // Bytes holding n_tokens() tokens (what a dense cache of this length needs).
  int64_t used_bytes() const;
  fp16_t* k(int64_t layer, int64_t kv_head) { return base(layer, kv_head, 0); }
  fp16_t* v(int64_t layer, int64_t kv_head) { return base(layer, kv_head, 1); }
  const fp16_t* k(int64_t layer, int64_t kv_head) const;
  const fp16_t* v(int64_t layer, int64_t kv_head) const;

 private:
  fp16_t* base(int64_t layer, int64_t kv_head, int kind) {
    return data_.data() + (((layer * 2 + kind) * n_kv_heads_ + kv_head) * capacity_) * head_dim_;
  }
  int64_t n_layers_, n_kv_heads_, head_dim_, capacity_;
  int64_t n_tokens_ = 0;
  std::vector<fp16_t> data_;
};

// One sequence's share of a forward step: its new tokens are appended at
// cache->n_tokens(). If want_logits, the next-token logits of its last token
// are written to the next row of the logits output.
struct BatchItem {
  KvCache* cache = nullptr;
  std::span<const int32_t> tokens;
  bool want_logits = true;
};

// One sequence's decode step over a compressed cache: `token` is appended at
// cache->n_tokens() with its keep flags (one per (block, head) slot).
struct CompressedItem {
  kvstore::CompressedKvCache* cache = nullptr;
  int32_t token = 0;
  std::span<const uint8_t> flags;
  bool want_logits = true;
};

// Attention statistics gathered during a prefill, for eviction policies
// that rank prompt tokens by the attention they receive (H2O: from every
// query; SnapKV: from the queries of an observation window at the end of the
// prompt). Indexed [layer][kv_head][key token], summed over the query heads
// of each KV head's group.
struct AttentionStats {
  int64_t n_layers = 0;
  int64_t n_kv_heads = 0;
  int64_t n_tokens = 0;      // key tokens tracked (the prompt length)
  int64_t observe_from = 0;  // queries at positions >= this also add to `observed`
  std::vector<float> received;
  std::vector<float> observed;
  // Calibration extras (off unless enabled after reset()):
  //  - distant_window W > 0: `received_distant` sums only the attention of
  //    queries at least W positions after the key, i.e. the attention a
  //    token gets once it is distant (the gate's teacher signal);
  //  - capture_from >= 0: the raw attention scores (q·k / sqrt(d), before
  //    the softmax) of every query at positions >= capture_from are stored
  //    per (layer, query head) in `captured`,
  //    [layer][q_head][query - capture_from][key] (keys past the query: 0).
  int64_t distant_window = 0;
  std::vector<float> received_distant;
  // The largest attention any single such query (of the KV head's group)
  // gives the key: "was it ever needed sharply", where the sum says "how
  // much on average".
  std::vector<float> received_distant_max;
  int64_t capture_from = -1;
  int64_t n_q_heads = 0;
  std::vector<float> captured;

  void reset(int64_t layers, int64_t kv_heads, int64_t tokens, int64_t observe_from_pos);
  void enable_distant(int64_t window);
  void enable_capture(int64_t q_heads, int64_t from_pos);
  int64_t n_captured() const { return capture_from < 0 ? 0 : n_tokens - capture_from; }
  float* received_distant_row(int64_t layer, int64_t kv_head) {
    return received_distant.data() + (layer * n_kv_heads + kv_head) * n_tokens;
  }
  const float* received_distant_row(int64_t layer, int64_t kv_head) const {
    return received_distant.data() + (layer * n_kv_heads + kv_head) * n_tokens;
  }
  const float* captured_row(int64_t layer, int64_t q_head, int64_t query) const {
    return captured.data() + ((layer * n_q_heads + q_head) * n_captured() + query) * n_tokens;
  }
  float* received_row(int64_t layer, int64_t kv_head) {
    return received.data() + (layer * n_kv_heads + kv_head) * n_tokens;
  }
  float* observed_row(int64_t layer, int64_t kv_head) {
    return observed.data() + (layer * n_kv_heads + kv_head) * n_tokens;
  }
  const float* received_row(int64_t layer, int64_t kv_head) const {
    return received.data() + (layer * n_kv_heads + kv_head) * n_tokens;
  }
  const float* observed_row(int64_t layer, int64_t kv_head) const {
    return observed.data() + (layer * n_kv_heads + kv_head) * n_tokens;
  }
};

// Sees the normalized input (after attn_norm) of every layer during a
// forward step: rows of n_embd floats; row r belongs to batch item
// row_item[r] at position row_pos[r]. Called on the engine thread, in layer
// order, before the layer's attention; for a compressed step after the new
// token's cache row was claimed (so a gate may write its state and flags).
// The observer must not keep the pointers past the call.
class LayerInputObserver {
 public:
  virtual ~LayerInputObserver() = default;
  virtual void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                              std::span<const int64_t> row_pos,
                              std::span<const int32_t> row_item) = 0;
};

// One sequence of a layer-major prefill (CpuForward::prefill_layers): its
// tokens are appended at cache->n_tokens().
struct PrefillSequence {
  KvCache* cache = nullptr;
  std::span<const int32_t> tokens;
  // Sees this sequence's rows only (row_item 0, row_pos its positions), in
  // layer order: every row of layer l before any of layer l + 1. Not owned.
  LayerInputObserver* observer = nullptr;
  // Attention statistics as prefill() records them; only for a prefill of
  // one sequence. Not owned.
  AttentionStats* stats = nullptr;
  // n_vocab floats for the next-token logits of the last token, or null.
  float* logits = nullptr;
};

struct ForwardOptions {
  int n_threads = 0;               // 0 = all cores
  cpu::Isa isa = cpu::best_isa();  // kScalar is the reference mode
  int64_t max_batch_tokens = 512;  // tokens per forward step (prefill chunk)
};

class CpuForward {
 public:
  CpuForward(const LlamaModel& model, const ForwardOptions& options);

  // One step over several sequences of different lengths. Total tokens must
  // be <= max_batch_tokens; each cache must have room. logits_out receives
  // one row of n_vocab floats per item with want_logits, in item order.
  Status forward(std::span<const BatchItem> items, float* logits_out);

  // One decode step of several sequences whose caches are compressed
  // (DESIGN.md §4): attention over own-layer keys of sinks and window and
  // base-layer keys of retained distant tokens. RESOURCE_EXHAUSTED if a
  // cache's pool lacks pages (that cache is unchanged; earlier items of the
  // batch may have been advanced, so the caller fails the whole step).
  Status forward_compressed(std::span<const CompressedItem> items, float* logits_out);

  // Prefill of one sequence in chunks of max_batch_tokens; logits of the
  // last prompt token go to logits_out (n_vocab floats).
  // With `stats`, the attention every prompt token receives is recorded
  // (stats must have been reset() for this model and prompt length).
  Status prefill(KvCache& cache, std::span<const int32_t> tokens, float* logits_out,
                 AttentionStats* stats = nullptr);

  // Layer-major prefill of several sequences at once (the prefill node's
  // batch): every token of every sequence goes through layer 0, then layer
  // 1, ..., in steps of max_batch_tokens rows that may mix sequences (each
  // weight matrix is read once per step for all of them). After layer l is
  // complete for all tokens, layer_done(l) runs (K/V of layers <= l are
  // final in the caches; later layers not yet written): the caller ships a
  // finished block of layers while the rest computes. An error from
  // layer_done stops the prefill and is returned (the caches are then
  // partial and must be discarded).
  // Per-token arithmetic is the same as prefill()'s, so every sequence's
  // K/V and logits are bit-identical to prefilling it alone (tested).
  // Errors (before any work): no sequences, an empty prompt, a token outside
  // the vocabulary, a cache without room (OUT_OF_RANGE), stats with more
  // than one sequence or sized for another model/prompt (INVALID_ARGUMENT).
  // The forward's own layer observer, if set, also sees every step (all
  // rows, row_item = the sequence's index).
  Status prefill_layers(std::span<const PrefillSequence> seqs,
                        const std::function<Status(int64_t layer)>& layer_done = {});

  // Observer of layer inputs for the following calls (null: none). Not owned.
  void set_layer_observer(LayerInputObserver* observer) { observer_ = observer; }
  LayerInputObserver* layer_observer() const { return observer_; }
  const LlamaModel& model() const { return model_; }
  const ForwardOptions& options() const { return options_; }
  int n_threads() const { return pool_.size(); }

 private:
  void ensure_scratch(int64_t n_tokens, int64_t max_context);
  void attention(int64_t layer, std::span<const BatchItem> items, int64_t n_tokens);
  void attention_compressed(int64_t layer, std::span<const CompressedItem> items);
  // The layer stack over rows already embedded in x_; exactly one of the
  // item lists is non-empty. Then the logits of the rows that want them.
  void run_layers(int64_t n, std::span<const BatchItem> dense,
                  std::span<const CompressedItem> compressed);
  struct RowRange {
    int64_t begin = 0, end = 0;
  };
  std::vector<std::vector<RowRange>> plan_prefill_steps(std::span<const PrefillSequence> seqs) const;
  // One layer of the stack over the n rows in x_ (as run_layers).
  void run_layer(int64_t layer, int64_t n, std::span<const BatchItem> dense,
                 std::span<const CompressedItem> compressed);
  void compute_logits(const std::vector<int64_t>& rows, float* logits_out);

  const LlamaModel& model_;
  ForwardOptions options_;
  cpu::ThreadPool pool_;
  cpu::MatmulWorkspace ws_;
  // Scratch, sized for max_batch_tokens rows; grown once, reused every step.
  std::vector<float> x_, xn_, q_, k_, v_, attn_, gate_, up_, out_rows_;
  std::vector<float> scores_;                  // per thread: max_context
  std::vector<float> q_layers_;                // compressed decode: [row][layer][q_dim] queries
  AttentionStats* stats_ = nullptr;            // set during a prefill that records stats
  LayerInputObserver* observer_ = nullptr;
  // prefill_layers: each sequence's own observer, indexed by row_item.
  const std::vector<LayerInputObserver*>* item_observers_ = nullptr;
  std::vector<int32_t> zero_items_;
  std::vector<float> stats_scratch_;           // per share: 2 x kv_heads x stats tokens
  std::vector<int64_t> row_pos_;               // position of each row
  std::vector<int32_t> row_item_;              // item of each row
  int64_t scratch_context_ = 0;
};

// Sets a forward's layer observer for a scope and restores the previous one
// on exit: a CpuForward may be shared (the policies of a comparison, the
// sequences of a decode batch), so a gate observer must not outlive its call.
class LayerObserverScope {
 public:
  LayerObserverScope(CpuForward& forward, LayerInputObserver* observer)
      : forward_(forward), previous_(forward.layer_observer()) {
    forward_.set_layer_observer(observer);
  }
  ~LayerObserverScope() { forward_.set_layer_observer(previous_); }
  LayerObserverScope(const LayerObserverScope&) = delete;
  LayerObserverScope& operator=(const LayerObserverScope&) = delete;

 private:
  CpuForward& forward_;
  LayerInputObserver* previous_;
};

}  // namespace kvgate::engine
