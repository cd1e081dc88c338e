#include "transport/nccl/crc32c_chunks.h"

#include <vector>

namespace kvgate::transport::nccl_crc {

namespace {

using Matrix = std::array<uint32_t, 32>;  // column n: the image of bit n

uint32_t times(const Matrix& m, uint32_t v) {
  uint32_t sum = 0;
  for (int i = 0; v != 0; ++i, v >>= 1)
    if (v & 1u) sum ^= m[i];
  return sum;
}

Matrix square(const Matrix& m) {
  Matrix out{};
  for (int n = 0; n < 32; ++n) out[n] = times(m, m[n]);
  return out;
}

// The operator that advances a CRC over `len` zero bytes.
Matrix shift_operator(uint64_t len) {
  Matrix m{};
  for (int j = 0; j < 32; ++j) m[j] = combine(1u << j, 0, len);
  return m;
}

}  // namespace

std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) t[i] = table_entry(i);
  return t;
}

uint32_t combine(uint32_t crc1, uint32_t crc2, uint64_t len2) {
  if (len2 == 0) return crc1;
  Matrix odd{}, even{};
  odd[0] = kPoly;  // one zero bit
  for (int n = 1; n < 32; ++n) odd[n] = 1u << (n - 1);
  even = square(odd);  // two zero bits
  odd = square(even);  // four zero bits
  // Each round squares the operator (8, 16, ... zero bits = 1, 2, ... bytes).
  while (true) {
    even = square(odd);
    if (len2 & 1u) crc1 = times(even, crc1);
    len2 >>= 1;
    if (len2 == 0) break;
    odd = square(even);
    if (len2 & 1u) crc1 = times(odd, crc1);
    len2 >>= 1;
    if (len2 == 0) break;
  }
  return crc1 ^ crc2;
}

uint32_t fold_chunks(uint32_t seed, std::span<const uint32_t> chunk_crcs, uint64_t total) {
  static const Matrix whole = shift_operator(kCrcChunkBytes);
  uint32_t crc = seed;
  for (size_t i = 0; i < chunk_crcs.size(); ++i) {
    const uint64_t at = uint64_t{i} * kCrcChunkBytes;
    const uint64_t len = total - at < kCrcChunkBytes ? total - at : kCrcChunkBytes;
    crc = (len == kCrcChunkBytes ? times(whole, crc) ^ chunk_crcs[i] : combine(crc, chunk_crcs[i], len));
  }
  return crc;
}

uint32_t chunked_crc32c(const void* data, size_t bytes, uint32_t seed) {
  static const std::array<uint32_t, 256> table = make_table();
  const auto* p = static_cast<const uint8_t*>(data);
  std::vector<uint32_t> chunks((bytes + kCrcChunkBytes - 1) / kCrcChunkBytes);
  for (size_t i = 0; i < chunks.size(); ++i) {
    const size_t at = i * kCrcChunkBytes;
    chunks[i] = crc32c_chunk(table.data(), p + at, bytes - at < kCrcChunkBytes ? bytes - at : kCrcChunkBytes);
  }
  return fold_chunks(seed, chunks, bytes);
}

}  // namespace kvgate::transport::nccl_crc
