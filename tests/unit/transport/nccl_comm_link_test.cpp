// The nccl transport on real GPUs (label gpu; built with -DKVGATE_NCCL=ON
// only): the device CRC32C kernel against common/crc32c (one GPU), and a
// whole transfer between two ranks of a real communicator, device buffer
// to device pages (two GPUs; skipped with fewer). Never run yet: no GPU was
// available when it was written (transport/README.md "nccl").
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <memory>
#include <thread>
#include <vector>

#include "common/crc32c.h"
#include "tests/unit/transport/transport_test_util.h"
#include "transport/nccl/crc32c_chunks.h"
#include "transport/nccl/crc32c_kernel.h"
#include "transport/nccl/local_control_link.h"
#include "transport/nccl/nccl_comm_link.h"
#include "transport/nccl/nccl_transport.h"

namespace kvgate::transport::testing {
namespace {

int gpus() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

struct DeviceMem {
  DeviceMem(int device, size_t n) {
    cudaSetDevice(device);
    ok = cudaMalloc(&p, n) == cudaSuccess;
  }
  ~DeviceMem() {
    if (p != nullptr) cudaFree(p);
  }
  std::byte* get() const { return static_cast<std::byte*>(p); }
  void* p = nullptr;
  bool ok = false;
};

// Two ranks of one communicator, joined from two threads (create blocks
// until every rank joined).
std::vector<std::unique_ptr<NcclDataLink>> two_links() {
  auto id = NcclCommLink::new_unique_id();
  EXPECT_TRUE(id.ok()) << id.status().to_string();
  std::vector<std::unique_ptr<NcclDataLink>> links(2);
  std::vector<std::thread> joins;
  for (int r = 0; r < 2; ++r)
    joins.emplace_back([&, r] {
      auto l = NcclCommLink::create(*id, r, 2, {.device = r});
      EXPECT_TRUE(l.ok()) << l.status().to_string();
      if (l.ok()) links[r] = std::move(*l);
    });
  for (auto& t : joins) t.join();
  return links;
}

// The kernel plus the host fold, as NcclCommLink::crc32c runs them (one GPU).
TEST(NcclGpu, DeviceCrc32cMatchesTheHost) {
  if (gpus() < 1) GTEST_SKIP() << "no CUDA device";
  const auto host = random_bytes((size_t{8} << 20) + 123, 1);
  DeviceMem dev(0, host.size());
  const size_t max_chunks = (host.size() + nccl_crc::kCrcChunkBytes - 1) / nccl_crc::kCrcChunkBytes;
  DeviceMem out(0, max_chunks * sizeof(uint32_t));
  ASSERT_TRUE(dev.ok && out.ok);
  ASSERT_EQ(cudaMemcpy(dev.get(), host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);
  for (size_t n : {size_t{1}, size_t{4095}, size_t{4096}, size_t{4097}, size_t{1} << 20, host.size()}) {
    const size_t chunks = (n + nccl_crc::kCrcChunkBytes - 1) / nccl_crc::kCrcChunkBytes;
    ASSERT_EQ(nccl_crc::launch_chunk_crc32c(dev.get(), n, static_cast<uint32_t*>(out.p), nullptr), cudaSuccess);
    std::vector<uint32_t> crcs(chunks);
    ASSERT_EQ(cudaMemcpy(crcs.data(), out.p, chunks * sizeof(uint32_t), cudaMemcpyDeviceToHost), cudaSuccess);
    for (uint32_t seed : {0u, 0x12345678u})
      EXPECT_EQ(nccl_crc::fold_chunks(seed, crcs, n), crc32c(host.data(), n, seed)) << n;
  }
}

// The link refuses host memory (two GPUs: a link is a 2-rank communicator).
TEST(NcclGpu, LinkRefusesHostMemoryAndChecksumsOnTheDevice) {
  if (gpus() < 2) GTEST_SKIP() << "needs two CUDA devices";
  auto links = two_links();
  ASSERT_TRUE(links[0] && links[1]);
  const auto host = random_bytes(100000, 3);
  EXPECT_EQ(links[0]->post_send(1, host.data(), 16).status().code(), StatusCode::kInvalidArgument);
  DeviceMem dev(0, host.size());
  ASSERT_TRUE(dev.ok);
  ASSERT_EQ(cudaMemcpy(dev.get(), host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(links[0]->crc32c(dev.get(), host.size(), 7), crc32c(host.data(), host.size(), 7));
}

TEST(NcclGpu, TransferDeviceToDevicePages) {
  if (gpus() < 2) GTEST_SKIP() << "needs two CUDA devices";
  auto links = two_links();
  ASSERT_TRUE(links[0] && links[1]);
  constexpr size_t kPage = 64 << 10;
  DeviceMem region(1, 32 * kPage), src(0, 5 * kPage);
  ASSERT_TRUE(region.ok && src.ok);
  const auto host = random_bytes(5 * kPage, 2);
  cudaSetDevice(0);
  ASSERT_EQ(cudaMemcpy(src.get(), host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);
  TransportOptions ro;
  ro.cluster_token = "t";
  ro.region = region.get();
  ro.region_bytes = 32 * kPage;
  TransportOptions so;
  so.cluster_token = "t";
  auto recv = NcclTransport::create(ro, NcclLinks{std::move(links[1]), LocalControlLink::create()});
  auto send = NcclTransport::create(so, NcclLinks{std::move(links[0]), LocalControlLink::create()});
  ASSERT_TRUE(recv.ok() && send.ok());
  auto peer = (*send)->connect(*(*recv)->address());
  ASSERT_TRUE(peer.ok()) << peer.status().to_string();
  const std::vector<DestRange> ranges = {{20 * kPage, kPage}, {2 * kPage, 3 * kPage}, {9 * kPage, kPage}};
  auto grant = (*recv)->post_receive({TransferId(1), ranges, Clock::now() + 30s});
  ASSERT_TRUE(grant.ok());
  ASSERT_TRUE((*send)->begin_send(*peer, TransferId(1), *grant, Clock::now() + 30s).ok());
  for (uint32_t i = 0; i < 3; ++i) {
    const size_t at = i * 100000, n = i < 2 ? 100000 : host.size() - 200000;
    ASSERT_TRUE((*send)->send_segment(*peer, TransferId(1), i, src.get() + at, n, at).ok());
  }
  ASSERT_TRUE((*send)->finish(*peer, TransferId(1)).ok());
  std::vector<TransferEvent> se, re;
  ASSERT_TRUE(pump({send->get(), recv->get()}, {&se, &re}, [&] { return !se.empty() && !re.empty(); }, 30000ms));
  EXPECT_TRUE(re[0].status.ok()) << re[0].status.to_string();
  EXPECT_TRUE(se[0].status.ok()) << se[0].status.to_string();
  std::vector<std::byte> back(host.size());
  cudaSetDevice(1);
  size_t at = 0;
  for (const auto& r : ranges) {
    ASSERT_EQ(cudaMemcpy(back.data() + at, region.get() + r.offset_bytes, r.length_bytes, cudaMemcpyDeviceToHost),
              cudaSuccess);
    at += r.length_bytes;
  }
  EXPECT_TRUE(back == host);
}

}  // namespace
}  // namespace kvgate::transport::testing
