#include "engine/cpu/isa.h"

#include <cstdlib>
#include <cstring>

namespace kvgate::engine::cpu {
namespace {

bool detect(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return avx2;
    case Isa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
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
