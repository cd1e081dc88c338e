// Scalar kernels: the portable fallback and the ISA-independent baseline the
// SIMD kernels are checked against. Plain loops; the integer block dots are
// exact, so every ISA's quantized matmul differs from these only by float
// summation order.
#include <cmath>
#include <cstring>

#include "engine/cpu/kernels.h"

namespace kvgate::engine::cpu::detail {
namespace {

void quantize_acts(const float* x, int64_t k, int8_t* qs, float* d, float* s, int32_t* corr,
                   int32_t offset) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32, qs += 32) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) {
      const float a = std::fabs(x[i]);
      amax = a > amax ? a : amax;
    }
    const float dd = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = static_cast<int>(std::nearbyint(x[i] * id));
      qs[i] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = fp16_to_fp32(fp32_to_fp16(dd));
    s[b] = fp16_to_fp32(fp32_to_fp16(dd * static_cast<float>(sum)));
    corr[b] = -offset * sum;
  }
}

size_t qmatmul_scratch_bytes(int64_t) {
  return 0;
}

// Exact integer dot of one weight block with one activation block.
template <GgmlType kType>
int32_t block_dot(const uint8_t* blk, const int8_t* x) {
  int32_t sum = 0;
  if constexpr (kType == GgmlType::kQ8_0) {
    const auto* q = reinterpret_cast<const BlockQ8_0*>(blk)->qs;
    for (int i = 0; i < 32; ++i) sum += static_cast<int32_t>(q[i]) * x[i];
  } else {
    // Q4_0 and Q4_1: unsigned nibbles; Q4_0's -8 comes in through corr.
    const uint8_t* q = kType == GgmlType::kQ4_0 ? reinterpret_cast<const BlockQ4_0*>(blk)->qs
                                                : reinterpret_cast<const BlockQ4_1*>(blk)->qs;
    for (int i = 0; i < 16; ++i) {
      sum += static_cast<int32_t>(q[i] & 0x0f) * x[i] + static_cast<int32_t>(q[i] >> 4) * x[i + 16];
    }
  }
  return sum;
}

template <GgmlType kType>
void qmatmul_typed(const QuantMatmulArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t kBlockBytes = kType == GgmlType::kQ4_0   ? sizeof(BlockQ4_0)
                                  : kType == GgmlType::kQ4_1 ? sizeof(BlockQ4_1)
                                                             : sizeof(BlockQ8_0);
  const int64_t nb = a.acts.k / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.w + r * a.row_bytes;
    for (int64_t t = 0; t < a.n_tokens; ++t) {
      const int8_t* xq = a.acts.qs + t * a.acts.k;
      const float* xd = a.acts.d + t * nb;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * kBlockBytes;
        fp16_t dh;
        std::memcpy(&dh, blk, sizeof dh);  // d is the first field of every block type
        int32_t isum = block_dot<kType>(blk, xq + b * 32);
        if constexpr (kType == GgmlType::kQ4_0) isum += a.acts.corr[t * nb + b];
        acc += fp16_to_fp32(dh) * xd[b] * static_cast<float>(isum);
        if constexpr (kType == GgmlType::kQ4_1) {
          fp16_t mh;
          std::memcpy(&mh, blk + 2, sizeof mh);
          acc += fp16_to_fp32(mh) * a.acts.s[t * nb + b];
        }
      }
      a.y[t * a.ldy + r] = acc;
    }
  }
}

void qmatmul(const QuantMatmulArgs& a, int64_t r0, int64_t r1, void*) {
  switch (a.type) {
    case GgmlType::kQ4_0:
      return qmatmul_typed<GgmlType::kQ4_0>(a, r0, r1);
    case GgmlType::kQ4_1:
      return qmatmul_typed<GgmlType::kQ4_1>(a, r0, r1);
    case GgmlType::kQ8_0:
      return qmatmul_typed<GgmlType::kQ8_0>(a, r0, r1);
    default:
      return;
  }
}

float load_weight(GgmlType type, const uint8_t* row, int64_t i) {
  switch (type) {
    case GgmlType::kF16: {
      fp16_t h;
      std::memcpy(&h, row + 2 * i, 2);
      return fp16_to_fp32(h);
    }
    case GgmlType::kBF16: {
      bf16_t h;
      std::memcpy(&h, row + 2 * i, 2);
      return bf16_to_fp32(h);
    }
    default: {
      float f;
      std::memcpy(&f, row + 4 * i, 4);
      return f;
    }
  }
}

void fmatmul(const FloatMatmulArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.w + r * a.row_bytes;
    for (int64_t t = 0; t < a.n_tokens; ++t) {
      const float* x = a.x + t * a.k;
      float acc = 0.0f;
      for (int64_t i = 0; i < a.k; ++i) acc += load_weight(a.type, row, i) * x[i];
      a.y[t * a.ldy + r] = acc;
    }
  }
}

void round_to_f16(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(fp32_to_fp16(x[i]));
}

void rms_norm(const float* x, const float* weight, float* out, int64_t n, float eps) {
  double sum = 0.0;  // llama.cpp sums the float squares in double too
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i] * x[i]);
  const float mean = static_cast<float>(sum / static_cast<double>(n));
  const float scale = 1.0f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] * scale) * weight[i];
}

void rope_apply(float* x, int64_t n_heads, int64_t head_dim, const float* c, const float* s,
                int64_t j0, int64_t j1) {
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t j = j0; j < j1; j += 2) {
      const float x0 = v[j], x1 = v[j + 1];
      v[j] = x0 * c[j - j0] + x1 * s[j - j0];
      v[j + 1] = x1 * c[j + 1 - j0] + x0 * s[j + 1 - j0];
    }
  }
}

void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void softmax_inplace(float* x, int64_t n) {
  if (n <= 0) return;
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

float dot_f32(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

float dot_f16_f32(const fp16_t* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += fp16_to_fp32(a[i]) * b[i];
  return acc;
}

void axpy_f16(float alpha, const fp16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * fp16_to_fp32(x[i]);
}

void convert_f32_to_f16(const float* src, fp16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp32_to_fp16(src[i]);
}

void add_inplace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace

constinit const KernelTable kScalarKernels = {
    .isa = Isa::kScalar,
    .quantize_acts = quantize_acts,
    .qmatmul_scratch_bytes = qmatmul_scratch_bytes,
    .qmatmul = qmatmul,
    .fmatmul = fmatmul,
    .round_to_f16 = round_to_f16,
    .rms_norm = rms_norm,
    .rope_apply = rope_apply,
    .swiglu = swiglu,
    .softmax_inplace = softmax_inplace,
    .dot_f32 = dot_f32,
    .dot_f16_f32 = dot_f16_f32,
    .axpy_f16 = axpy_f16,
    .convert_f32_to_f16 = convert_f32_to_f16,
    .add_inplace = add_inplace,
};

}  // namespace kvgate::engine::cpu::detail
