// Every CRC32C implementation the machine can run against the portable
// table (the oracle): all lengths 0..1024, random lengths up to 8 MiB, every
// alignment 0..63, random seeds, and chained splits. Implementations the
// CPU lacks are skipped with a message.
#include "common/crc32c.h"

#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <random>
#include <string>
#include <vector>

namespace kvgate {

// gtest names the implementation in failure messages.
void PrintTo(Crc32cImpl impl, std::ostream* os) {
  *os << crc32c_impl_name(impl);
}

namespace {

constexpr size_t kAlign = 64;

// A buffer of `size` random bytes starting `offset` bytes past a 64-byte
// boundary (the folding kernels read 16- and 64-byte lanes: alignment and
// the bytes around the buffer must not matter).
struct Buffer {
  std::vector<unsigned char> storage;
  unsigned char* data;
  Buffer(size_t size, size_t offset, std::mt19937_64& rng) : storage(size + offset + 2 * kAlign) {
    auto base = reinterpret_cast<uintptr_t>(storage.data());
    data = storage.data() + ((kAlign - base % kAlign) % kAlign) + offset;
    for (auto& b : storage) b = static_cast<unsigned char>(rng());
  }
};

class Crc32cImplTest : public ::testing::TestWithParam<Crc32cImpl> {
 protected:
  void SetUp() override {
    if (!crc32c_impl_available(GetParam()))
      GTEST_SKIP() << crc32c_impl_name(GetParam()) << " is not available on this CPU/OS";
  }
  uint32_t crc(const void* p, size_t n, uint32_t seed = 0) const {
    return crc32c_with(GetParam(), p, n, seed);
  }
};

TEST_P(Crc32cImplTest, KnownVectors) {
  const char* digits = "123456789";
  EXPECT_EQ(crc(digits, 9), 0xE3069283u);
  std::vector<unsigned char> zeros(32, 0x00), ones(32, 0xFF);
  EXPECT_EQ(crc(zeros.data(), zeros.size()), 0x8A9136AAu);
  EXPECT_EQ(crc(ones.data(), ones.size()), 0x62A8AB43u);
  // The checksum of no bytes is the seed, whatever the pointer.
  EXPECT_EQ(crc(nullptr, 0, 0x12345678u), 0x12345678u);
  EXPECT_EQ(crc(digits, 0), 0u);
}

// Large known vector, so a bug shared by every implementation (the oracle
// included) would still show: 1 MiB of zeros and of 0xFF, values from the
// portable table checked once against a bit-at-a-time CRC below.
uint32_t crc32c_bitwise(const unsigned char* p, size_t n, uint32_t seed) {
  uint32_t c = ~seed;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int b = 0; b < 8; ++b) c = (c >> 1) ^ ((c & 1u) ? 0x82F63B78u : 0u);
  }
  return ~c;
}

TEST_P(Crc32cImplTest, MatchesBitwiseReferenceOnLargeBuffers) {
  std::mt19937_64 rng(7);
  for (size_t n : {size_t{4096} + 13, size_t{1} << 20}) {
    Buffer b(n, 5, rng);
    const uint32_t seed = static_cast<uint32_t>(rng());
    EXPECT_EQ(crc(b.data, n, seed), crc32c_bitwise(b.data, n, seed)) << "size " << n;
  }
}

TEST_P(Crc32cImplTest, EveryLengthUpTo1024AtEveryAlignment) {
  std::mt19937_64 rng(1);
  for (size_t offset = 0; offset < kAlign; ++offset) {
    Buffer b(1024, offset, rng);
    for (size_t n = 0; n <= 1024; ++n) {
      const uint32_t seed = (n % 3 == 0) ? 0u : static_cast<uint32_t>(rng());
      ASSERT_EQ(crc(b.data, n, seed), crc32c_portable(b.data, n, seed))
          << "offset " << offset << " size " << n << " seed " << seed;
    }
  }
}

TEST_P(Crc32cImplTest, RandomLengthsUpTo8MiB) {
  std::mt19937_64 rng(2);
  Buffer b(8u << 20, 0, rng);
  const size_t sizes[] = {1023,  1024,         1025,     4096,         65535,          65536,
                          65537, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, (1u << 20) + 7, 8u << 20};
  for (size_t n : sizes) {
    const uint32_t seed = static_cast<uint32_t>(rng());
    ASSERT_EQ(crc(b.data, n, seed), crc32c_portable(b.data, n, seed)) << "size " << n;
  }
  for (int i = 0; i < 64; ++i) {
    // Log-uniform sizes, so small, medium and large all come up.
    const double log_n = std::uniform_real_distribution<double>(10.0, 23.0)(rng);
    const size_t offset = rng() % kAlign;
    const size_t n = std::min<size_t>(static_cast<size_t>(std::exp2(log_n)), (8u << 20) - offset);
    const uint32_t seed = static_cast<uint32_t>(rng());
    ASSERT_EQ(crc(b.data + offset, n, seed), crc32c_portable(b.data + offset, n, seed))
        << "offset " << offset << " size " << n;
  }
}

TEST_P(Crc32cImplTest, SeedsChainAcrossSplits) {
  std::mt19937_64 rng(3);
  Buffer b(3u << 20, 0, rng);
  for (int i = 0; i < 200; ++i) {
    const size_t offset = rng() % kAlign;
    const size_t n = (i < 100) ? rng() % 2048 : rng() % ((3u << 20) - kAlign);
    const size_t split = n ? rng() % (n + 1) : 0;
    const uint32_t whole = crc(b.data + offset, n);
    const uint32_t first = crc(b.data + offset, split);
    EXPECT_EQ(crc(b.data + offset + split, n - split, first), whole)
        << "offset " << offset << " size " << n << " split " << split;
    ASSERT_EQ(whole, crc32c_portable(b.data + offset, n));
  }
  // Many small pieces, as the transport's 512 KiB chunks and scatter pieces.
  uint32_t running = 0;
  size_t at = 0;
  while (at < b.storage.size() - 2 * kAlign) {
    const size_t piece = std::min<size_t>(1 + rng() % 70000, b.storage.size() - 2 * kAlign - at);
    running = crc(b.data + at, piece, running);
    at += piece;
  }
  EXPECT_EQ(running, crc32c_portable(b.data, at));
}

// Reading past the buffer's end (or before its start) would pick up these
// guard bytes' changes; the result must not move.
TEST_P(Crc32cImplTest, IgnoresBytesAroundTheBuffer) {
  std::mt19937_64 rng(4);
  for (size_t n : {size_t{17}, size_t{255}, size_t{256}, size_t{511}, size_t{512}, size_t{777},
                   size_t{4099}}) {
    Buffer b(n, 3, rng);
    const uint32_t before = crc(b.data, n, 0xDEADBEEFu);
    for (unsigned char* q = b.storage.data(); q < b.data; ++q) *q ^= 0x5A;
    for (unsigned char* q = b.data + n; q < b.storage.data() + b.storage.size(); ++q) *q ^= 0xA5;
    EXPECT_EQ(crc(b.data, n, 0xDEADBEEFu), before) << "size " << n;
  }
}

// A single flipped bit anywhere changes the checksum.
TEST_P(Crc32cImplTest, DetectsEveryFlippedBitOfABlock) {
  std::mt19937_64 rng(5);
  Buffer b(1000, 0, rng);
  const uint32_t good = crc(b.data, 1000);
  for (size_t bit = 0; bit < 8 * 1000; ++bit) {
    b.data[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
    ASSERT_NE(crc(b.data, 1000), good) << "bit " << bit;
    b.data[bit / 8] ^= static_cast<unsigned char>(1u << (bit % 8));
  }
}

INSTANTIATE_TEST_SUITE_P(AllImpls, Crc32cImplTest, ::testing::ValuesIn(kAllCrc32cImpls),
                         [](const ::testing::TestParamInfo<Crc32cImpl>& info) {
                           std::string name = crc32c_impl_name(info.param);
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

TEST(Crc32cTest, DefaultUsesTheFastestAvailableImplementation) {
  const Crc32cImpl active = crc32c_active_impl();
  ASSERT_TRUE(crc32c_impl_available(active));
  // Nothing listed after the active one in preference order is preferred.
  const Crc32cImpl order[] = {Crc32cImpl::kAvx512Vpclmul, Crc32cImpl::kPclmul, Crc32cImpl::kSse42,
                              Crc32cImpl::kPortable};
  for (Crc32cImpl impl : order) {
    if (impl == active) break;
    EXPECT_FALSE(crc32c_impl_available(impl)) << crc32c_impl_name(impl) << " is available but "
                                              << crc32c_impl_name(active) << " was chosen";
  }
  EXPECT_EQ(crc32c_hardware_available(), active != Crc32cImpl::kPortable);
  std::printf("crc32c uses %s\n", crc32c_impl_name(active));
  std::vector<unsigned char> data(100000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<unsigned char>(i * 131 + 7);
  EXPECT_EQ(crc32c(data.data(), data.size(), 9), crc32c_portable(data.data(), data.size(), 9));
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
}

TEST(Crc32cTest, UnavailableImplementationFallsBackToTheTable) {
  for (Crc32cImpl impl : kAllCrc32cImpls) {
    if (crc32c_impl_available(impl)) continue;
    EXPECT_EQ(crc32c_with(impl, "123456789", 9), 0xE3069283u) << crc32c_impl_name(impl);
  }
}

}  // namespace
}  // namespace kvgate
