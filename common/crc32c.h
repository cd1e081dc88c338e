// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of the
// control plane's frames and of every KV segment the transport ships.
//
// Pure functions, safe from any thread, never allocate. `crc32c` picks the
// fastest implementation the CPU and OS support, once, at first use:
//   kAvx512Vpclmul  carry-less-multiply folding over 512-bit registers
//                   (AVX-512F + VPCLMULQDQ, AVX-512 state enabled by the OS)
//   kPclmul         the same folding over 128-bit registers (PCLMULQDQ)
//   kSse42          the SSE4.2 `crc32` instruction, three interleaved streams
//   kPortable       a slicing-by-8 table
// The folding paths use the `crc32` instruction for buffers too short to
// fold and for the last bytes, so they also need SSE4.2. All give identical
// results (tests/unit/common/crc32c_test.cpp compares each with kPortable).
// KV segments are checksummed on both sides of every transfer, so the
// checksum's speed bounds the transport's goodput (transport/README.md).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvgate {

// CRC32C of `size` bytes at `data`. `seed` continues a running checksum:
// crc32c(ab) == crc32c(b, |b|, crc32c(a, |a|)). crc32c("123456789") ==
// 0xE3069283; the checksum of no bytes is `seed`.
uint32_t crc32c(const void* data, size_t size, uint32_t seed = 0);

// The table implementation, always available (tests compare the others with it).
uint32_t crc32c_portable(const void* data, size_t size, uint32_t seed = 0);

// True when crc32c() runs on a hardware path (the CRC32C instruction, alone
// or with carry-less multiplication).
bool crc32c_hardware_available();

// The implementations, for tests and the benchmark (bench/crc32c_bench.cpp).
enum class Crc32cImpl { kPortable, kSse42, kPclmul, kAvx512Vpclmul };
inline constexpr Crc32cImpl kAllCrc32cImpls[] = {Crc32cImpl::kPortable, Crc32cImpl::kSse42,
                                                 Crc32cImpl::kPclmul, Crc32cImpl::kAvx512Vpclmul};

// Whether `impl` can run here (CPUID, and XGETBV for the OS's AVX-512 state).
bool crc32c_impl_available(Crc32cImpl impl);

// "portable", "sse4.2", "pclmul", "avx512-vpclmul".
const char* crc32c_impl_name(Crc32cImpl impl);

// The implementation crc32c() uses on this machine.
Crc32cImpl crc32c_active_impl();

// crc32c() computed by `impl`. An implementation that is not available here
// is never run (it would fault on a missing instruction): the portable table
// answers instead, so check crc32c_impl_available() first.
uint32_t crc32c_with(Crc32cImpl impl, const void* data, size_t size, uint32_t seed = 0);

}  // namespace kvgate
