// kvgate_crc32c_bench: CRC32C throughput of each implementation the CPU
// supports (common/crc32c.h), at 4 KiB, 64 KiB, 1 MiB and 64 MiB.
//
//   kvgate_crc32c_bench [--seconds S] [--sizes BYTES,BYTES,...]
//
// "cached": the same buffer again and again (it stays in L1/L2/L3; 64 MiB
// exceeds any L3, so that row is DRAM too). "DRAM": successive calls walk a
// 1 GiB pool, so every call reads lines no cache holds. Each figure is the
// best of 3 runs of about S/3 seconds (default 0.6 s). "read" is a plain
// 64-bit XOR over the same bytes: the memory system's own read rate, the
// bound for any checksum. One thread; on a shared machine, run it quiet.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/crc32c.h"

using namespace kvgate;

namespace {

using Clock = std::chrono::steady_clock;

// Reads every 8-byte word; the compiler vectorizes the XOR.
__attribute__((noinline)) uint64_t read_all(const unsigned char* p, size_t n) {
  uint64_t acc = 0;
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    acc ^= v;
  }
  return acc;
}

// GB/s of `fn` over `size`-byte buffers taken from `pool` (advancing by
// `stride` per call, wrapping; stride 0 = the same buffer each time).
template <typename Fn>
double measure(Fn fn, const unsigned char* pool, size_t pool_bytes, size_t size, size_t stride,
               double seconds) {
  double best = 0;
  volatile uint64_t sink = 0;
  for (int run = 0; run < 3; ++run) {
    size_t at = 0, bytes = 0;
    uint64_t acc = 0;
    const auto start = Clock::now();
    const auto deadline = start + std::chrono::duration<double>(seconds / 3);
    Clock::time_point now;
    do {
      for (int i = 0; i < 8; ++i) {
        acc += fn(pool + at, size);
        bytes += size;
        at += stride;
        if (at + size > pool_bytes) at = 0;
      }
    } while ((now = Clock::now()) < deadline);
    sink = sink + acc;
    best = std::max(best, static_cast<double>(bytes) /
                              std::chrono::duration<double>(now - start).count() / 1e9);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 0.6;
  std::vector<size_t> sizes = {size_t{4} << 10, size_t{64} << 10, size_t{1} << 20,
                               size_t{64} << 20};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else if (a == "--sizes" && i + 1 < argc) {
      sizes.clear();
      for (const char* s = argv[++i]; *s;) {
        char* end = nullptr;
        const unsigned long long v = std::strtoull(s, &end, 10);
        if (end == s || v == 0 || v > (256ull << 20)) {
          std::fprintf(stderr, "--sizes: expected sizes in bytes, 1 to 256 MiB, comma-separated\n");
          return 2;
        }
        sizes.push_back(v);
        s = (*end == ',') ? end + 1 : end;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--seconds S] [--sizes BYTES,BYTES,...]\n", argv[0]);
      return a == "--help" ? 0 : 2;
    }
  }
  constexpr size_t kPoolBytes = size_t{1} << 30;
  std::vector<unsigned char> pool(kPoolBytes);
  for (size_t i = 0; i < pool.size(); i += 8) {
    const uint64_t v = (i / 8) * 0x9E3779B97F4A7C15ull;
    std::memcpy(&pool[i], &v, 8);
  }
  std::printf("crc32c() uses %s\n\n", crc32c_impl_name(crc32c_active_impl()));
  std::printf("%-16s %10s %12s %12s\n", "impl", "size", "cached GB/s", "DRAM GB/s");
  auto row = [&](const char* name, auto fn) {
    for (size_t size : sizes) {
      const double cached = measure(fn, pool.data(), kPoolBytes, size, 0, seconds);
      // Stride a little past the size so successive buffers start at
      // different offsets modulo a page and a cache line.
      const double dram = measure(fn, pool.data(), kPoolBytes, size, size + 4096 + 8, seconds);
      const std::string label = size % (1u << 20) == 0   ? std::to_string(size >> 20) + " MiB"
                                : size % (1u << 10) == 0 ? std::to_string(size >> 10) + " KiB"
                                                         : std::to_string(size) + " B";
      std::printf("%-16s %10s %12.1f %12.1f\n", name, label.c_str(), cached, dram);
      std::fflush(stdout);
    }
  };
  row("read", [](const unsigned char* p, size_t n) { return read_all(p, n); });
  for (Crc32cImpl impl : kAllCrc32cImpls) {
    if (!crc32c_impl_available(impl)) {
      std::printf("%-16s (not available on this CPU/OS)\n", crc32c_impl_name(impl));
      continue;
    }
    row(crc32c_impl_name(impl),
        [impl](const unsigned char* p, size_t n) { return uint64_t{crc32c_with(impl, p, n)}; });
  }
  return 0;
}
