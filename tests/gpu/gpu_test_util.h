// Helpers of the CUDA conformance tests: skip without a device, move
// vectors to and from device memory (synchronously; tests only).
#pragma once

#include <gtest/gtest.h>

#include <vector>

#include "engine/cuda/device_buffer.h"

namespace kvgate::engine::cuda::testing {

// Each test starts with this: the suite passes by skipping on machines
// without a GPU (CI, development machines).
#define KVGATE_REQUIRE_GPU()                                              \
  do {                                                                    \
    if (::kvgate::engine::cuda::device_count() == 0) {                    \
      GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount reports none)"; \
    }                                                                     \
  } while (0)

template <typename T>
DeviceBuffer to_device(const std::vector<T>& v) {
  auto b = DeviceBuffer::allocate(v.size() * sizeof(T));
  EXPECT_TRUE(b.ok()) << b.status().to_string();
  if (!b.ok()) return DeviceBuffer();
  const Status s = b->upload(v.data(), v.size() * sizeof(T));
  EXPECT_TRUE(s.ok()) << s.to_string();
  return std::move(b).value();
}

template <typename T>
DeviceBuffer device_zeros(size_t n) {
  auto b = DeviceBuffer::allocate(n * sizeof(T));
  EXPECT_TRUE(b.ok()) << b.status().to_string();
  if (!b.ok()) return DeviceBuffer();
  EXPECT_TRUE(b->zero().ok());
  return std::move(b).value();
}

template <typename T>
std::vector<T> to_host(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  const Status s = b.download(v.data(), n * sizeof(T));
  EXPECT_TRUE(s.ok()) << s.to_string();
  return v;
}

}  // namespace kvgate::engine::cuda::testing
