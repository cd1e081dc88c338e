// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of the
// control plane's frames and of every KV segment the transport ships.
//
// Pure functions, safe from any thread, never allocate. `crc32c` uses the
// SSE4.2 `crc32` instruction when the CPU has it (checked once, at first
// use) and a slicing-by-8 table otherwise; both give identical results.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvgate {

// CRC32C of `size` bytes at `data`. `seed` continues a running checksum:
// crc32c(ab) == crc32c(b, |b|, crc32c(a, |a|)). crc32c("123456789") ==
// 0xE3069283; the checksum of no bytes is `seed`.
uint32_t crc32c(const void* data, size_t size, uint32_t seed = 0);

// The table implementation, always available (tests compare the two).
uint32_t crc32c_portable(const void* data, size_t size, uint32_t seed = 0);

// True when crc32c() runs on the CPU's CRC32C instruction.
bool crc32c_hardware_available();

}  // namespace kvgate
