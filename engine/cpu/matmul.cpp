#include "engine/cpu/matmul.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdlib>
#include <new>

#include "engine/cpu/kernels.h"
#include "engine/cpu/quant.h"

namespace kvgate::engine::cpu {
namespace {

using detail::FloatMatmulArgs;
using detail::KernelTable;
using detail::QuantMatmulArgs;

constexpr size_t kAlign = 64;

size_t round_up(size_t n, size_t a) {
  return (n + a - 1) / a * a;
}

bool is_quantized(GgmlType t) {
  return t == GgmlType::kQ4_0 || t == GgmlType::kQ4_1 || t == GgmlType::kQ8_0;
}

// Layout of the activation planes in ws.acts for n_tokens x k.
struct ActsLayout {
  size_t qs, d, s, corr, total;
};
ActsLayout quant_layout(int64_t n_tokens, int64_t k) {
  const size_t nt = static_cast<size_t>(n_tokens);
  const size_t nb = static_cast<size_t>(k / 32);
  ActsLayout l;
  l.qs = 0;
  l.d = round_up(nt * static_cast<size_t>(k), kAlign);
  l.s = l.d + round_up(nt * nb * sizeof(float), kAlign);
  l.corr = l.s + round_up(nt * nb * sizeof(float), kAlign);
  l.total = l.corr + round_up(nt * nb * sizeof(int32_t), kAlign);
  return l;
}

// Below this many activation elements, quantizing on the caller is cheaper
// than waking the pool for it.
constexpr int64_t kParallelQuantizeElems = 8192;

// Chunks per thread when compute-bound: more than one, so a thread delayed by
// the OS does not hold up the region, few enough that claiming stays cheap.
// Memory-bound decode takes one contiguous range per thread instead, so rows
// stream sequentially.
constexpr int64_t kChunksPerThread = 4;
constexpr int64_t kDecodeTokens = 4;

// Runs body(r0, r1, thread) over [0, rows) in chunks of whole `unit`s, one
// pool share per chunk; `thread` picks per-thread scratch.
template <typename Body>
void parallel_rows(int64_t rows, int64_t unit, int64_t chunks_per_thread, ThreadPool& pool,
                   Body body) {
  const int n_threads = pool.size();
  const int64_t units = (rows + unit - 1) / unit;
  if (n_threads == 1 || units == 1) {
    body(0, rows, 0);
    return;
  }
  const int64_t per_chunk = std::max<int64_t>(
      1, (units + n_threads * chunks_per_thread - 1) / (n_threads * chunks_per_thread));
  const int64_t n_chunks = (units + per_chunk - 1) / per_chunk;
  pool.run_shares(n_chunks, [&](int64_t c, int thread) {
    const int64_t r0 = c * per_chunk * unit;
    body(r0, std::min(rows, r0 + per_chunk * unit), thread);
  });
}

void quantized_matmul(const KernelTable& kt, const WeightView& w, int64_t row_bytes, const float* x,
                      int64_t n_tokens, float* y, ThreadPool& pool, MatmulWorkspace& ws) {
  const int64_t k = w.cols;
  const int64_t nb = k / 32;
  const ActsLayout l = quant_layout(n_tokens, k);
  auto* base = static_cast<uint8_t*>(ws.acts.get(l.total));
  auto* qs = reinterpret_cast<int8_t*>(base + l.qs);
  auto* d = reinterpret_cast<float*>(base + l.d);
  auto* s = reinterpret_cast<float*>(base + l.s);
  auto* corr = reinterpret_cast<int32_t*>(base + l.corr);
  // Unsigned-weight kernels add -offset*sum(x) to undo the weight offset.
  const int32_t offset = w.type == GgmlType::kQ4_0 ? 8 : w.type == GgmlType::kQ8_0 ? 128 : 0;
  auto quantize = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      kt.quantize_acts(x + t * k, k, qs + t * k, d + t * nb, s + t * nb, corr + t * nb, offset);
    }
  };
  if (n_tokens * k < kParallelQuantizeElems || pool.size() == 1 || n_tokens == 1) {
    quantize(0, n_tokens);
  } else {
    pool.run([&](int ti, int nt) { quantize(n_tokens * ti / nt, n_tokens * (ti + 1) / nt); });
  }

  const size_t scratch_bytes = kt.qmatmul_scratch_bytes(k);
  if (ws.scratch.size() < static_cast<size_t>(pool.size())) ws.scratch.resize(pool.size());
  for (int i = 0; i < pool.size(); ++i) ws.scratch[i].get(scratch_bytes);

  const QuantMatmulArgs args{w.type,
                             static_cast<const uint8_t*>(w.data),
                             row_bytes,
                             w.rows,
                             detail::QuantizedActs{qs, d, s, corr, k},
                             n_tokens,
                             y,
                             w.rows};
  const int64_t chunks = n_tokens <= kDecodeTokens ? 1 : kChunksPerThread;
  parallel_rows(w.rows, detail::kPanelRows, chunks, pool, [&](int64_t r0, int64_t r1, int thread) {
    kt.qmatmul(args, r0, r1, ws.scratch[thread].data);
  });
}

void float_matmul(const KernelTable& kt, const WeightView& w, int64_t row_bytes, const float* x,
                  int64_t n_tokens, float* y, ThreadPool& pool, MatmulWorkspace& ws) {
  const int64_t k = w.cols;
  const float* xr = x;
  if (w.type != GgmlType::kF32) {
    // Round activations to the weight's precision (llama.cpp converts them
    // to F16/BF16 before the dot); kept as float so kernels stay simple.
    auto* buf = static_cast<float*>(ws.acts.get(static_cast<size_t>(n_tokens * k) * sizeof(float)));
    if (w.type == GgmlType::kF16) {
      kt.round_to_f16(x, buf, n_tokens * k);
    } else {
      for (int64_t i = 0; i < n_tokens * k; ++i) buf[i] = bf16_to_fp32(fp32_to_bf16(x[i]));
    }
    xr = buf;
  }
  const FloatMatmulArgs args{
      w.type, static_cast<const uint8_t*>(w.data), row_bytes, w.rows, k, xr, n_tokens, y, w.rows};
  parallel_rows(w.rows, 4, n_tokens <= kDecodeTokens ? 1 : kChunksPerThread, pool,
                [&](int64_t r0, int64_t r1, int) { kt.fmatmul(args, r0, r1); });
}

}  // namespace

void* MatmulWorkspace::Buffer::get(size_t want) {
  if (want <= bytes && data != nullptr) return data;
  ::operator delete(data, std::align_val_t(kAlign));
  bytes = round_up(std::max<size_t>(want, kAlign), kAlign);
  data = ::operator new(bytes, std::align_val_t(kAlign));
  return data;
}

MatmulWorkspace::Buffer::Buffer(Buffer&& other) noexcept : data(other.data), bytes(other.bytes) {
  other.data = nullptr;
  other.bytes = 0;
}

MatmulWorkspace::Buffer& MatmulWorkspace::Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    ::operator delete(data, std::align_val_t(kAlign));
    data = other.data;
    bytes = other.bytes;
    other.data = nullptr;
    other.bytes = 0;
  }
  return *this;
}

MatmulWorkspace::Buffer::~Buffer() {
  ::operator delete(data, std::align_val_t(kAlign));
}

MatmulWorkspace::MatmulWorkspace() = default;
MatmulWorkspace::~MatmulWorkspace() = default;

void MatmulWorkspace::reserve(int64_t max_tokens, int64_t max_cols, int n_threads) {
  const int64_t k = (max_cols + 31) / 32 * 32;
  const size_t quant = quant_layout(max_tokens, k).total;
  const size_t flt = static_cast<size_t>(max_tokens * max_cols) * sizeof(float);
  acts.get(std::max(quant, flt));
  if (scratch.size() < static_cast<size_t>(n_threads)) scratch.resize(n_threads);
  size_t sb = 0;
  for (int i = 0; i < 3; ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (isa_supported(isa)) sb = std::max(sb, detail::kernels_for(isa).qmatmul_scratch_bytes(k));
  }
  for (int i = 0; i < n_threads; ++i) scratch[i].get(sb);
}

size_t MatmulWorkspace::allocated_bytes() const {
  size_t n = acts.bytes;
  for (const auto& b : scratch) n += b.bytes;
  return n;
}

bool matmul_supports(GgmlType type) {
  return is_quantized(type) || type == GgmlType::kF32 || type == GgmlType::kF16 ||
         type == GgmlType::kBF16;
}

Status check_weight(const WeightView& w) {
  if (!matmul_supports(w.type)) {
    const auto t = ggml_type_traits(static_cast<uint32_t>(w.type));
    return unimplemented("matmul: weight type " + std::string(t ? t->name : "unknown") +
                         " is not supported by the CPU backend");
  }
  if (w.rows < 1 || w.cols < 1) return invalid_argument("matmul: empty weight");
  if (w.data == nullptr) return invalid_argument("matmul: weight has no data");
  if (!ggml_row_bytes(w.type, static_cast<uint64_t>(w.cols))) {
    return invalid_argument("matmul: row length " + std::to_string(w.cols) +
                            " is not a multiple of the block size");
  }
  if (is_quantized(w.type) && w.cols > (int64_t{1} << 30)) {
    return invalid_argument("matmul: row too long");
  }
  return Status();
}

void matmul(const WeightView& w, const float* x, int64_t n_tokens, float* y, ThreadPool& pool,
            MatmulWorkspace& ws, Isa isa) {
  if (n_tokens <= 0 || w.rows <= 0) return;
  assert(check_weight(w).ok());
  const auto row_bytes = ggml_row_bytes(w.type, static_cast<uint64_t>(w.cols));
  if (!matmul_supports(w.type) || !row_bytes) {
    std::fill(y, y + n_tokens * w.rows, NAN);
    return;
  }
  const KernelTable& kt = detail::kernels_for(isa);
  if (is_quantized(w.type)) {
    quantized_matmul(kt, w, static_cast<int64_t>(*row_bytes), x, n_tokens, y, pool, ws);
  } else {
    float_matmul(kt, w, static_cast<int64_t>(*row_bytes), x, n_tokens, y, pool, ws);
  }
}

void matmul_reference(const WeightView& w, const float* x, int64_t n_tokens, float* y) {
  const auto row_bytes = ggml_row_bytes(w.type, static_cast<uint64_t>(w.cols));
  if (!dequantize_supported(w.type) || !row_bytes) {
    std::fill(y, y + n_tokens * w.rows, NAN);
    return;
  }
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    dequantize_row(w.type, static_cast<const uint8_t*>(w.data) + r * *row_bytes, row.data(),
                   w.cols);
    for (int64_t t = 0; t < n_tokens; ++t) {
      double acc = 0.0;
      const float* xt = x + t * w.cols;
      for (int64_t i = 0; i < w.cols; ++i) acc += static_cast<double>(row[i]) * xt[i];
      y[t * w.rows + r] = static_cast<float>(acc);
    }
  }
}

int64_t matmul_small_batch_tokens(Isa isa) {
  return clamp_isa(isa) == Isa::kAvx512 ? detail::avx512::decode_max_tokens() : 0;
}

namespace detail {

const KernelTable& kernels_for(Isa isa) {
  switch (clamp_isa(isa)) {
    case Isa::kAvx512:
      return kAvx512Kernels;
    case Isa::kAvx2:
      return kAvx2Kernels;
    default:
      return kScalarKernels;
  }
}

}  // namespace detail
}  // namespace kvgate::engine::cpu
