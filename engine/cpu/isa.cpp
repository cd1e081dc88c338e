#include "engine/cpu/isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <cstdlib>
#include <cstring>

namespace kvgate::engine::cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)
// CPUID and XGETBV directly rather than __builtin_cpu_supports: clang before
// 16 rejects some feature names ("f16c", "avx512bf16"), and the OS must
// also save the wider registers (XCR0), which CPUID alone does not say.
struct CpuFeatures {
  bool avx2 = false;    // AVX2 + FMA + F16C, YMM state enabled
  bool avx512 = false;  // F, BW, VL, DQ, VNNI, BF16, ZMM state enabled
};

CpuFeatures cpu_features() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0) return f;
  const bool fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
  if (!osxsave || !avx) return f;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6) == 0x6;
  const bool zmm_state = (xcr0_lo & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1;
  const bool avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
             avx512vl = (b >> 31) & 1, avx512vnni = (c >> 11) & 1;
  const unsigned max_sub = a;
  bool avx512bf16 = false;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    avx512bf16 = (a >> 5) & 1;
  }
  f.avx2 = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni &&
             avx512bf16;
  return f;
}
#endif

bool detect(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  static const CpuFeatures f = cpu_features();
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return f.avx2;
    case Isa::kAvx512:
      return f.avx512;
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

struct Detected {
  bool supported[3];
  Isa best;
};

Detected detect_all() {
  Detected d{};
  for (int i = 0; i < 3; ++i) d.supported[i] = detect(static_cast<Isa>(i));
  d.best = Isa::kScalar;
  for (int i = 0; i < 3; ++i) {
    if (d.supported[i]) d.best = static_cast<Isa>(i);
  }
  if (const char* env = std::getenv("KVGATE_ISA")) {
    Isa wanted = d.best;
    if (std::strcmp(env, "scalar") == 0) wanted = Isa::kScalar;
    if (std::strcmp(env, "avx2") == 0) wanted = Isa::kAvx2;
    if (std::strcmp(env, "avx512") == 0) wanted = Isa::kAvx512;
    if (static_cast<int>(wanted) < static_cast<int>(d.best)) d.best = wanted;
  }
  return d;
}

const Detected& detected() {
  static const Detected d = detect_all();
  return d;
}

}  // namespace

Isa best_isa() {
  return detected().best;
}

bool isa_supported(Isa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < 3 && detected().supported[i];
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

Isa clamp_isa(Isa isa) {
  for (int i = static_cast<int>(isa); i > 0; --i) {
    if (detected().supported[i]) return static_cast<Isa>(i);
  }
  return Isa::kScalar;
}

}  // namespace kvgate::engine::cpu
