#include "engine/cpu/quant.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>

namespace kvgate::engine::cpu {
namespace {

// One Q8 block: returns d (unrounded) and writes q; sum(q) in *sum.
float quantize_block_q8(const float* x, int8_t* q, int* sum) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) {
    const float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;
  }
  const float d = amax / 127.0f;
  // 127/amax rather than 1/d: llama.cpp's SIMD quantizer does this, and the
  // engine's logits are compared with llama.cpp's.
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  int s = 0;
  for (int i = 0; i < 32; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * id));  // half-even, like cvtps2dq
    q[i] = static_cast<int8_t>(v);
    s += v;
  }
  *sum = s;
  return d;
}

void quantize_row_q4_0(const float* x, BlockQ4_0* y, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, x += 32) {
    float amax = 0.0f, vmax = 0.0f;
    for (int i = 0; i < 32; ++i) {
      if (std::fabs(x[i]) > amax) {
        amax = std::fabs(x[i]);
        vmax = x[i];
      }
    }
    const float d = vmax / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    for (int i = 0; i < 16; ++i) {
      const int lo = std::min(15, static_cast<int>(x[i] * id + 8.5f));
      const int hi = std::min(15, static_cast<int>(x[i + 16] * id + 8.5f));
      y[b].qs[i] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

void quantize_row_q4_1(const float* x, BlockQ4_1* y, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, x += 32) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < 32; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    const float d = (hi - lo) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    y[b].m = fp32_to_fp16(lo);
    for (int i = 0; i < 16; ++i) {
      const int q0 = std::min(15, static_cast<int>((x[i] - lo) * id + 0.5f));
      const int q1 = std::min(15, static_cast<int>((x[i + 16] - lo) * id + 0.5f));
      y[b].qs[i] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

}  // namespace

bool dequantize_supported(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ8_0:
    case GgmlType::kQ8_1:
      return true;
    default:
      return false;
  }
}

bool quantize_supported(GgmlType type) {
  return dequantize_supported(type);
}

void quantize_row_q8_0(const float* src, BlockQ8_0* dst, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b) {
    int sum;
    const float d = quantize_block_q8(src + b * 32, dst[b].qs, &sum);
    dst[b].d = fp32_to_fp16(d);
  }
}

void quantize_row_q8_1(const float* src, BlockQ8_1* dst, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b) {
    int sum;
    const float d = quantize_block_q8(src + b * 32, dst[b].qs, &sum);
    dst[b].d = fp32_to_fp16(d);
    dst[b].s = fp32_to_fp16(d * static_cast<float>(sum));
  }
}

void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n) {
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case GgmlType::kF16: {
      const auto* h = static_cast<const fp16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(h[i]);
      return;
    }
    case GgmlType::kBF16: {
      const auto* h = static_cast<const bf16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(h[i]);
      return;
    }
    case GgmlType::kQ4_0: {
      const auto* blk = static_cast<const BlockQ4_0*>(src);
      for (int64_t b = 0; b < n / 32; ++b, dst += 32) {
        const float d = fp16_to_fp32(blk[b].d);
        for (int i = 0; i < 16; ++i) {
          dst[i] = static_cast<float>((blk[b].qs[i] & 0x0f) - 8) * d;
          dst[i + 16] = static_cast<float>((blk[b].qs[i] >> 4) - 8) * d;
        }
      }
      return;
    }
    case GgmlType::kQ4_1: {
      const auto* blk = static_cast<const BlockQ4_1*>(src);
      for (int64_t b = 0; b < n / 32; ++b, dst += 32) {
        const float d = fp16_to_fp32(blk[b].d);
        const float m = fp16_to_fp32(blk[b].m);
        for (int i = 0; i < 16; ++i) {
          dst[i] = static_cast<float>(blk[b].qs[i] & 0x0f) * d + m;
          dst[i + 16] = static_cast<float>(blk[b].qs[i] >> 4) * d + m;
        }
      }
      return;
    }
    case GgmlType::kQ8_0: {
      const auto* blk = static_cast<const BlockQ8_0*>(src);
      for (int64_t b = 0; b < n / 32; ++b, dst += 32) {
        const float d = fp16_to_fp32(blk[b].d);
        for (int i = 0; i < 32; ++i) dst[i] = static_cast<float>(blk[b].qs[i]) * d;
      }
      return;
    }
    case GgmlType::kQ8_1: {
      const auto* blk = static_cast<const BlockQ8_1*>(src);
      for (int64_t b = 0; b < n / 32; ++b, dst += 32) {
        const float d = fp16_to_fp32(blk[b].d);
        for (int i = 0; i < 32; ++i) dst[i] = static_cast<float>(blk[b].qs[i]) * d;
      }
      return;
    }
    default:
      assert(false && "dequantize_row: unsupported type (check dequantize_supported first)");
      for (int64_t i = 0; i < n; ++i) dst[i] = NAN;
      return;
  }
}

void quantize_row(GgmlType type, const float* src, void* dst, int64_t n) {
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case GgmlType::kF16: {
      auto* h = static_cast<fp16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_fp16(src[i]);
      return;
    }
    case GgmlType::kBF16: {
      auto* h = static_cast<bf16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_bf16(src[i]);
      return;
    }
    case GgmlType::kQ4_0:
      quantize_row_q4_0(src, static_cast<BlockQ4_0*>(dst), n);
      return;
    case GgmlType::kQ4_1:
      quantize_row_q4_1(src, static_cast<BlockQ4_1*>(dst), n);
      return;
    case GgmlType::kQ8_0:
      quantize_row_q8_0(src, static_cast<BlockQ8_0*>(dst), n);
      return;
    case GgmlType::kQ8_1:
      quantize_row_q8_1(src, static_cast<BlockQ8_1*>(dst), n);
      return;
    default:
      assert(false && "quantize_row: unsupported type (check quantize_supported first)");
      return;
  }
}

}  // namespace kvgate::engine::cpu
