#include "common/crc32c.h"

#include <array>
#include <cstring>

#include "common/crc32c_kernels.h"

#if KVGATE_CRC32C_X86_64
#include <cpuid.h>
#include <nmmintrin.h>
#endif

namespace kvgate {
namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;  // Castagnoli, bit-reversed

// kTables[0] is the classic byte-at-a-time table; kTables[k][b] is the CRC
// of byte b followed by k zero bytes, which lets the loop fold 8 bytes per
// step (slicing-by-8).
constexpr std::array<std::array<uint32_t, 256>, 8> make_tables() {
  std::array<std::array<uint32_t, 256>, 8> t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t crc = b;
    for (int i = 0; i < 8; ++i) crc = (crc >> 1) ^ ((crc & 1u) ? kPolynomial : 0u);
    t[0][b] = crc;
  }
  for (size_t k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFFu];
  }
  return t;
}

constexpr auto kTables = make_tables();

inline uint64_t load_le64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];  // compiles to one load on little-endian
  return v;
}

uint32_t crc32c_table(const unsigned char* p, size_t n, uint32_t crc) {
  while (n >= 8) {
    const uint64_t v = load_le64(p) ^ crc;
    crc = kTables[7][v & 0xFF] ^ kTables[6][(v >> 8) & 0xFF] ^ kTables[5][(v >> 16) & 0xFF] ^
          kTables[4][(v >> 24) & 0xFF] ^ kTables[3][(v >> 32) & 0xFF] ^
          kTables[2][(v >> 40) & 0xFF] ^ kTables[1][(v >> 48) & 0xFF] ^ kTables[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ kTables[0][(crc ^ *p++) & 0xFFu];
  return crc;
}

#if KVGATE_CRC32C_X86_64
// The raw register (no pre/post inversion) after `n_zeros` zero bytes, as a
// linear operator: t[k][b] is the register reached from b << 8k. Four
// lookups then shift any register by n_zeros bytes.
struct ShiftTable {
  std::array<std::array<uint32_t, 256>, 4> t{};
  explicit ShiftTable(size_t n_zeros) {
    for (int k = 0; k < 4; ++k) {
      for (uint32_t b = 0; b < 256; ++b) {
        uint32_t crc = b << (8 * k);
        for (size_t i = 0; i < n_zeros; ++i) crc = (crc >> 8) ^ kTables[0][crc & 0xFFu];
        t[k][b] = crc;
      }
    }
  }
  uint32_t shift(uint32_t crc) const {
    return t[0][crc & 0xFF] ^ t[1][(crc >> 8) & 0xFF] ^ t[2][(crc >> 16) & 0xFF] ^ t[3][crc >> 24];
  }
};

// Bytes per stream of the three-way interleaved loop.
constexpr size_t kStreamBytes = 8192;

// What the CPU and the OS support, from CPUID and XGETBV.
struct CpuFeatures {
  bool sse42 = false;
  bool pclmul = false;
  bool avx512_vpclmul = false;  // AVX-512F + VPCLMULQDQ, ZMM state enabled by the OS
};

CpuFeatures detect_cpu() {
  CpuFeatures f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  f.sse42 = (ecx & bit_SSE4_2) != 0;
  f.pclmul = f.sse42 && (ecx & bit_PCLMUL) != 0;
  // AVX-512 instructions fault unless the OS saves their registers: XCR0
  // must enable SSE (bit 1), AVX (2), opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7).
  if (!f.pclmul || (ecx & bit_OSXSAVE) == 0) return f;
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool zmm_state = (xcr0_lo & 0xE6u) == 0xE6u;
  if (!zmm_state || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return f;
  f.avx512_vpclmul = (ebx & bit_AVX512F) != 0 && (ecx & bit_VPCLMULQDQ) != 0;
  return f;
}

const CpuFeatures& cpu() {
  static const CpuFeatures f = detect_cpu();  // once, thread-safe
  return f;
}
#endif

using Kernel = uint32_t (*)(const unsigned char*, size_t, uint32_t);

bool available(Crc32cImpl impl) {
  switch (impl) {
    case Crc32cImpl::kPortable:
      return true;
#if KVGATE_CRC32C_X86_64
    case Crc32cImpl::kSse42:
      return cpu().sse42;
    case Crc32cImpl::kPclmul:
      return cpu().pclmul;
    case Crc32cImpl::kAvx512Vpclmul:
      return cpu().avx512_vpclmul;
#else
    default:
      return false;
#endif
  }
  return false;
}

// The kernel of `impl`, or the table when `impl` cannot run here.
Kernel kernel_of(Crc32cImpl impl) {
  if (!available(impl)) return crc32c_table;
  switch (impl) {
#if KVGATE_CRC32C_X86_64
    case Crc32cImpl::kSse42:
      return crc32c_detail::crc32c_sse42;
    case Crc32cImpl::kPclmul:
      return crc32c_detail::crc32c_pclmul;
    case Crc32cImpl::kAvx512Vpclmul:
      return crc32c_detail::crc32c_avx512_vpclmul;
#endif
    default:
      return crc32c_table;
  }
}

Crc32cImpl choose_impl() {
  for (Crc32cImpl impl : {Crc32cImpl::kAvx512Vpclmul, Crc32cImpl::kPclmul, Crc32cImpl::kSse42})
    if (available(impl)) return impl;
  return Crc32cImpl::kPortable;
}

uint32_t run(Kernel k, const void* data, size_t size, uint32_t seed) {
  if (size == 0) return seed;
  return ~k(static_cast<const unsigned char*>(data), size, ~seed);
}

}  // namespace

#if KVGATE_CRC32C_X86_64
namespace crc32c_detail {

// One instruction per 8 bytes has a latency of 3 cycles and a throughput of
// one per cycle, so one dependency chain uses a third of the unit: large
// buffers run three independent chains over consecutive kStreamBytes
// stretches and fold them together with a precomputed shift (the register
// after kStreamBytes zero bytes). The folding kernels are faster still;
// this one serves CPUs without PCLMULQDQ and their short buffers and tails.
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(const unsigned char* p, size_t n,
                                                        uint32_t crc) {
  uint64_t c = crc;
  if (n >= 3 * kStreamBytes) {
    static const ShiftTable shift(kStreamBytes);  // built once, thread-safe
    while (n >= 3 * kStreamBytes) {
      uint64_t c1 = 0, c2 = 0;
      const unsigned char* end = p + kStreamBytes;
      while (p < end) {
        uint64_t v0, v1, v2;
        std::memcpy(&v0, p, 8);
        std::memcpy(&v1, p + kStreamBytes, 8);
        std::memcpy(&v2, p + 2 * kStreamBytes, 8);
        c = _mm_crc32_u64(c, v0);
        c1 = _mm_crc32_u64(c1, v1);
        c2 = _mm_crc32_u64(c2, v2);
        p += 8;
      }
      c = shift.shift(static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c1);
      c = shift.shift(static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c2);
      p += 2 * kStreamBytes;
      n -= 3 * kStreamBytes;
    }
  }
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(c);
  if (n >= 4) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    crc = _mm_crc32_u32(crc, v);
    p += 4;
    n -= 4;
  }
  while (n-- > 0) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}

}  // namespace crc32c_detail
#endif

uint32_t crc32c(const void* data, size_t size, uint32_t seed) {
  static const Kernel kernel = kernel_of(choose_impl());
  return run(kernel, data, size, seed);
}

uint32_t crc32c_portable(const void* data, size_t size, uint32_t seed) {
  return run(crc32c_table, data, size, seed);
}

bool crc32c_hardware_available() {
  return crc32c_active_impl() != Crc32cImpl::kPortable;
}

bool crc32c_impl_available(Crc32cImpl impl) {
  return available(impl);
}

const char* crc32c_impl_name(Crc32cImpl impl) {
  switch (impl) {
    case Crc32cImpl::kPortable:
      return "portable";
    case Crc32cImpl::kSse42:
      return "sse4.2";
    case Crc32cImpl::kPclmul:
      return "pclmul";
    case Crc32cImpl::kAvx512Vpclmul:
      return "avx512-vpclmul";
  }
  return "unknown";
}

Crc32cImpl crc32c_active_impl() {
  static const Crc32cImpl impl = choose_impl();
  return impl;
}

uint32_t crc32c_with(Crc32cImpl impl, const void* data, size_t size, uint32_t seed) {
  return run(kernel_of(impl), data, size, seed);
}

}  // namespace kvgate
