// Internal to common/crc32c*.cpp: the x86 kernels behind crc32c().
//
// Each works on the raw CRC register (no pre- or post-inversion: crc32c()
// does those), takes any `n` including 0, and must only be called when the
// CPU has its instructions (crc32c.cpp checks CPUID once). Pure functions.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)
#define KVGATE_CRC32C_X86_64 1
#else
#define KVGATE_CRC32C_X86_64 0
#endif

namespace kvgate::crc32c_detail {

#if KVGATE_CRC32C_X86_64
// SSE4.2 `crc32` instruction, three interleaved streams on large buffers.
uint32_t crc32c_sse42(const unsigned char* p, size_t n, uint32_t crc);

// Carry-less-multiply folding (crc32c_clmul.cpp): PCLMULQDQ over 128-bit
// registers, and VPCLMULQDQ over 512-bit ones (AVX-512F). Both also need
// SSE4.2: short buffers and the last bytes go through crc32c_sse42.
uint32_t crc32c_pclmul(const unsigned char* p, size_t n, uint32_t crc);
uint32_t crc32c_avx512_vpclmul(const unsigned char* p, size_t n, uint32_t crc);
#endif

}  // namespace kvgate::crc32c_detail
