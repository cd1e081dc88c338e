// Matrix x activations for the CPU backend: y = W x for a batch of tokens.
//
// W is a weight tensor in ggml's layout (dims {K, N}: N rows of K elements,
// each row ggml_row_bytes(type, K) bytes). For Q4_0 and Q8_0 weights the
// activations are quantized to Q8_0 blocks and each block contributes
// d_w*d_x*(exact integer dot); for Q4_1 they are quantized to Q8_1 and each
// block adds d_w*d_x*dot + m_w*s_x; F16 weights see activations rounded to
// fp16, BF16 weights activations rounded to bf16, and all float products are
// summed in fp32. This is llama.cpp's arithmetic, so logits agree with it.
//
// Threading: matmul() runs on the calling thread plus `pool`'s workers and
// returns when y is complete. A MatmulWorkspace belongs to one caller thread.
// Error contract: shapes and types are validated once, when a model is
// loaded, with check_weight(); matmul() then has no failure path (it asserts
// its preconditions in debug builds and writes NaN for an unsupported type).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "engine/cpu/isa.h"
#include "engine/cpu/thread_pool.h"
#include "engine/ggml_types.h"

namespace kvgate::engine::cpu {

struct WeightView {
  GgmlType type;
  const void* data;  // rows * ggml_row_bytes(type, cols) bytes, not owned
  int64_t rows;      // N outputs
  int64_t cols;      // K inputs
};

// F32, F16, BF16, Q4_0, Q4_1, Q8_0.
bool matmul_supports(GgmlType type);

// Ok if matmul() can take `w`: supported type, rows >= 1, cols >= 1 and a
// multiple of the type's block size, data non-null. kUnimplemented for other
// types, kInvalidArgument for bad shapes.
Status check_weight(const WeightView& w);

// Reusable scratch for matmul(): quantized or rounded activations and one
// packing buffer per thread. Grows on demand (64-byte aligned); once it has
// seen the largest call, matmul() does not allocate. Not thread-safe: one
// owner thread.
class MatmulWorkspace {
 public:
  MatmulWorkspace();
  ~MatmulWorkspace();
  MatmulWorkspace(const MatmulWorkspace&) = delete;
  MatmulWorkspace& operator=(const MatmulWorkspace&) = delete;

  // Sizes everything for calls up to max_tokens x max_cols on n_threads, so
  // the first real call does not allocate either.
  void reserve(int64_t max_tokens, int64_t max_cols, int n_threads);
  size_t allocated_bytes() const;

  // Internal to the implementation.
  struct Buffer {
    void* data = nullptr;
    size_t bytes = 0;
    void* get(size_t want);  // grows (contents are not kept)
    Buffer() = default;
    Buffer(Buffer&& other) noexcept;  // move-only: owns `data`
    Buffer& operator=(Buffer&& other) noexcept;
    ~Buffer();
  };
  Buffer acts;                  // quantized or rounded activations
  std::vector<Buffer> scratch;  // per pool thread
};

// y[t*w.rows + r] = sum_k W[r][k] * x[t*w.cols + k] for t in [0, n_tokens).
// x and y are float32, row-major by token, and must not overlap. `isa` is
// lowered to what the CPU supports. Blocks until done.
void matmul(const WeightView& w, const float* x, int64_t n_tokens, float* y, ThreadPool& pool,
            MatmulWorkspace& ws, Isa isa);

// Batch invariance: for n_tokens above this, every token's output is
// independent of n_tokens and of the other tokens (same kernel, same
// summation order per token); at or below it (AVX-512: the row-streaming
// decode kernel) the sums run in another order, so a token's last bits can
// differ from a larger call's. 0 where no kernel switches. Used to batch
// prompts without changing a single bit of any of them.
int64_t matmul_small_batch_tokens(Isa isa);

// Reference: W rows dequantized to float, dotted with unquantized x in
// double. Slow; the oracle for tests. Allocates.
void matmul_reference(const WeightView& w, const float* x, int64_t n_tokens, float* y);

}  // namespace kvgate::engine::cpu
