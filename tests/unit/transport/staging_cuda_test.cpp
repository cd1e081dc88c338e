// transport/staging on a real GPU: the CUDA copier, and the staged sender
// and receiver moving device bytes (staging_cuda_test, label gpu; built in
// the CUDA leg only, skipped on a machine without a device).
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "tests/unit/transport/staging_doubles.h"
#include "transport/staging/cuda_copier.h"

namespace kvgate::transport::staging {
namespace {

using namespace doubles;

// The CUDA copier on a real device (label gpu; skipped without one). Built
// in the CUDA leg only; on a machine without a GPU it compiles and skips.
bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct DeviceMem {
  explicit DeviceMem(size_t n) { ok = cudaMalloc(&p, n) == cudaSuccess; }
  ~DeviceMem() {
    if (p != nullptr) cudaFree(p);
  }
  std::byte* get() const { return static_cast<std::byte*>(p); }
  void* p = nullptr;
  bool ok = false;
};

TEST(CudaStaging, CopierRoundTripThroughTheDevice) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto c = create_cuda_copier(2);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  DeviceCopier& copier = **c;
  EXPECT_EQ(copier.name(), "cuda");
  const size_t n = (size_t{8} << 20) + 3;
  const auto src = random_bytes(n, 1);
  auto a = PinnedBuffer::allocate(copier, n);
  auto b = PinnedBuffer::allocate(copier, n);
  ASSERT_TRUE(a.ok() && b.ok());
  std::memcpy(a->data(), src.data(), n);
  DeviceMem dev(n);
  ASSERT_TRUE(dev.ok);
  EXPECT_TRUE(copier.poll(0).ok());  // nothing issued yet
  ASSERT_TRUE(copier.copy_to_device_async(0, dev.get(), a->data(), n).ok());
  ASSERT_TRUE(copier.wait(0, Clock::now() + 10s).ok());
  ASSERT_TRUE(copier.copy_to_host_async(1, b->data(), dev.get(), n).ok());
  ASSERT_TRUE(copier.wait(1, Clock::now() + 10s).ok());
  EXPECT_EQ(std::memcmp(b->data(), src.data(), n), 0);
  EXPECT_EQ(copier.poll(2).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(copier.copy_to_host_async(0, nullptr, dev.get(), 1).code(),
            StatusCode::kInvalidArgument);
}

TEST(CudaStaging, SenderAndReceiverMoveDeviceBytes) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto send_copier = create_cuda_copier(4);
  auto recv_copier = create_cuda_copier(4);
  ASSERT_TRUE(send_copier.ok() && recv_copier.ok());
  const size_t n = (size_t{3} << 20) + 17;  // four staging buffers of 1 MiB, the last short
  const auto src = random_bytes(n, 2);
  DeviceMem dev_src(n), dev_dst(n);
  ASSERT_TRUE(dev_src.ok && dev_dst.ok);
  ASSERT_EQ(cudaMemcpy(dev_src.p, src.data(), n, cudaMemcpyHostToDevice), cudaSuccess);

  FakeSendTransport fake;
  fake.set_auto_release(true);
  auto sender = StagedSender::create(
      fake, **send_copier, {4, size_t{1} << 20},
      [&](PeerId p, TransferId id, uint32_t i) { return fake.released(p, id, i); });
  ASSERT_TRUE(sender.ok()) << sender.status().to_string();
  const TransferId id(1);
  ASSERT_TRUE((*sender)->begin(kPeer, id, {}, Clock::now() + 10s).ok());
  auto r = (*sender)->enqueue(kPeer, id, dev_src.get(), n, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->count, 4u);
  ASSERT_TRUE((*sender)->finish(kPeer, id).ok());
  std::vector<StagedSendEvent> events;
  const auto end = Clock::now() + 20s;
  while (events.empty() && Clock::now() < end) {
    (*sender)->progress();
    std::vector<TransferEvent> evs;
    fake.progress(evs);
    for (const auto& e : evs) events.push_back((*sender)->on_transfer_event(e));
  }
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].event.status.ok()) << events[0].event.status.to_string();
  const auto image = fake.image(id);
  ASSERT_EQ(image.size(), n);
  EXPECT_EQ(std::memcmp(image.data(), src.data(), n), 0);
  EXPECT_EQ(fake.crc_mismatches(), 0);

  // The receiver: the image in a pinned region → device pages.
  auto region = PinnedBuffer::allocate(**recv_copier, n);
  ASSERT_TRUE(region.ok());
  std::memcpy(region->data(), image.data(), n);
  auto receiver = StagedReceiver::create(fake, region->data(), n, **recv_copier, {256 * 1024});
  ASSERT_TRUE(receiver.ok());
  ASSERT_TRUE((*receiver)->expect({id, {{0, n}}, {{dev_dst.get(), n}}}).ok());
  TransferEvent ok_event;
  ok_event.side = TransferSide::kReceive;
  ok_event.id = id;
  (*receiver)->on_transfer_event(ok_event);
  std::vector<DeviceCopyEvent> copied;
  while (copied.empty() && Clock::now() < end) (*receiver)->progress(copied);
  ASSERT_EQ(copied.size(), 1u);
  EXPECT_TRUE(copied[0].status.ok()) << copied[0].status.to_string();
  std::vector<std::byte> back(n);
  ASSERT_EQ(cudaMemcpy(back.data(), dev_dst.p, n, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, src);
}

}  // namespace
}  // namespace kvgate::transport::staging
