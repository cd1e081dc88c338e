// CRC32C of device memory, split the way a GPU computes it: the bytes are
// cut into chunks of kCrcChunkBytes, each chunk's CRC32C (seed 0) is taken
// independently (one GPU thread each, crc32c_chunk below, shared by the
// kernel and the host), and the host folds the chunk CRCs into the running
// checksum with CRC combination (a GF(2) operator that advances a CRC over
// `n` bytes without reading them). The result equals common/crc32c's
// crc32c(data, n, seed) bit for bit (tests/unit/transport/
// nccl_transport_test.cpp checks the host side against it; the fake NCCL
// link checksums through these functions, so every nccl test uses them).
//
// Pure functions; the combiner is immutable after construction. Thread-safe.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#if !defined(__CUDACC__)
#include <span>
#endif

#if defined(__CUDACC__)
#define KVGATE_HD __host__ __device__
#else
#define KVGATE_HD
#endif

namespace kvgate::transport::nccl_crc {

inline constexpr uint32_t kPoly = 0x82F63B78u;  // CRC32C, reflected
inline constexpr size_t kCrcChunkBytes = 4096;

// Entry `i` of the byte-at-a-time table.
KVGATE_HD constexpr uint32_t table_entry(uint32_t i) {
  for (int k = 0; k < 8; ++k) i = (i & 1u) ? (i >> 1) ^ kPoly : i >> 1;
  return i;
}

// CRC32C (seed 0: register starts at ~0, result inverted) of `n` bytes at
// `p`, with `table` holding table_entry(0..255).
KVGATE_HD inline uint32_t crc32c_chunk(const uint32_t* table, const uint8_t* p, size_t n) {
  uint32_t reg = ~0u;
  for (size_t i = 0; i < n; ++i) reg = table[(reg ^ p[i]) & 0xFFu] ^ (reg >> 8);
  return ~reg;
}

#if !defined(__CUDACC__)  // host only (nvcc builds the kernel as C++17)
std::array<uint32_t, 256> make_table();

// crc32c(A ++ B) from crc1 = crc32c(A) (or any running seed), crc2 =
// crc32c(B) and |B| (zlib's crc32_combine with the Castagnoli polynomial).
uint32_t combine(uint32_t crc1, uint32_t crc2, uint64_t len2);

// Folds chunk CRCs (each of kCrcChunkBytes bytes, the last one of what is
// left of `total`) into `seed`: crc32c(data, total, seed) given the
// chunks' crc32c_chunk values. The operator for a whole chunk is built
// once per process.
uint32_t fold_chunks(uint32_t seed, std::span<const uint32_t> chunk_crcs, uint64_t total);

// The host reference of the device path: chunks checksummed with
// crc32c_chunk, folded with fold_chunks (for the fake link and tests).
uint32_t chunked_crc32c(const void* data, size_t bytes, uint32_t seed);
#endif

}  // namespace kvgate::transport::nccl_crc
