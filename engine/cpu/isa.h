// Instruction-set levels of the CPU backend and run-time detection.
//
// The library is compiled for baseline x86-64; the AVX2 and AVX-512 kernels
// live in their own translation units (kernels_avx2*.cpp, kernels_avx512*.cpp)
// and are reached only through the kernel table chosen here, so the same
// binary runs on any x86-64 CPU.
#pragma once

namespace kvgate::engine::cpu {

// Ordered: a higher level implies the lower ones are usable too.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best level this CPU supports. KVGATE_ISA=scalar|avx2|avx512 in the
// environment lowers it (never raises it past what the CPU has; an unknown
// value is ignored). Read once; thread-safe.
Isa best_isa();

// Whether this CPU can run kernels of `isa` (ignores KVGATE_ISA, so tests can
// run every level the hardware has).
//   kAvx2:   AVX2 + FMA + F16C
//   kAvx512: the above + AVX-512 F/BW/VL/DQ + VNNI + BF16
bool isa_supported(Isa isa);

// "scalar", "avx2", "avx512".
const char* isa_name(Isa isa);

// `isa` if supported, else the best supported level below it.
Isa clamp_isa(Isa isa);

}  // namespace kvgate::engine::cpu
