// libFuzzer target for the frames a peer sends the nccl transport on its
// control link (transport/nccl/nccl_transport.cpp: Ident, core messages,
// Put frames naming receives into the region). One receiving transport over
// the fake NCCL fabric and in-process control links lives for the whole run;
// each input opens a fresh impostor channel to it, optionally sends a valid
// Ident first (input byte 0, bit 0: then Put frames are honoured), and sends
// the rest of the input as frames, each prefixed by its length (one byte).
// The receiver must never crash, never post a receive outside its region,
// and never write the region: no rank sends data, so any byte written is a
// receive matched against nothing, i.e. a bug. Build and run (clang):
//   cmake -S . -B build-fuzz -DKVGATE_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ ...
//   build-fuzz/tests/fuzz/nccl_frame_fuzz -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "transport/nccl/fake_nccl_link.h"
#include "transport/nccl/local_control_link.h"
#include "transport/nccl/nccl_transport.h"

namespace {

using namespace kvgate::transport;

struct Receiver {
  std::shared_ptr<FakeNcclFabric> fabric = FakeNcclFabric::create(4);
  std::vector<std::byte> region = std::vector<std::byte>(size_t{16} << 10, std::byte{0});
  std::unique_ptr<Transport> t;
  Bytes control;  // its control address
  std::vector<TransferEvent> events;

  Receiver() {
    TransportOptions o;
    o.cluster_token = "tok";
    o.region = region.data();
    o.region_bytes = region.size();
    auto data = fabric->link(1);
    if (!data.ok()) std::abort();
    auto made = NcclTransport::create(o, NcclLinks{std::move(*data), LocalControlLink::create()});
    if (!made.ok()) std::abort();
    t = std::move(*made);
    auto addr = t->address();
    if (!addr.ok()) std::abort();
    // "KVGN", version, rank, world, length, then the control link address.
    control.assign(addr->begin() + 17, addr->end());
  }
};

Bytes ident_frame() {
  Bytes f{std::byte{1}};
  const uint32_t fields[3] = {2, 4, 3};  // rank 2 of 4, token "tok"
  for (uint32_t v : fields) {
    for (int b = 0; b < 4; ++b) f.push_back(std::byte(static_cast<uint8_t>(v >> (8 * b))));
  }
  for (char ch : {'t', 'o', 'k'}) f.push_back(std::byte(static_cast<uint8_t>(ch)));
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Receiver* r = new Receiver();
  if (size == 0) return 0;
  auto impostor = LocalControlLink::create();
  auto ch = impostor->open(r->control);
  if (!ch.ok()) std::abort();
  if (data[0] & 1) (void)impostor->send(*ch, ident_frame());
  size_t at = 1;
  while (at < size) {
    const size_t n = std::min<size_t>(data[at], size - at - 1);
    ++at;
    Bytes f(reinterpret_cast<const std::byte*>(data + at), reinterpret_cast<const std::byte*>(data + at + n));
    (void)impostor->send(*ch, std::move(f));  // a channel the receiver cut off refuses more
    at += n;
  }
  for (int i = 0; i < 3; ++i) r->t->progress(r->events);
  impostor.reset();
  r->t->progress(r->events);
  for (std::byte b : r->region) {
    if (b != std::byte{0}) std::abort();  // written without any sender
  }
  if (!r->events.empty()) std::abort();  // no receive was posted by us
  return 0;
}
