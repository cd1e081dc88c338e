// LocalControlLink: NcclControlLink between endpoints of one process (a
// process-wide registry, like the loopback transport's): for tests, and for
// one process that drives several GPUs. An address names a registry entry;
// a frame is moved into the other endpoint's queue. Destroying an endpoint
// closes every channel it had, in both directions (the other side polls
// kClosed), as a dying process's sockets would.
//
// Threading: endpoints may live on different threads; the registry and the
// queues are behind one mutex.
#pragma once

#include <memory>

#include "transport/nccl/nccl_link.h"

namespace kvgate::transport {

class LocalControlLink final : public NcclControlLink {
 public:
  static std::unique_ptr<NcclControlLink> create();
  ~LocalControlLink() override;

  Bytes address() const override;
  Result<ChannelId> open(std::span<const std::byte> address) override;
  Status send(ChannelId channel, Bytes frame) override;
  void close(ChannelId channel) override;
  void poll(std::vector<Event>& out) override;

  struct State;  // the endpoint's queue and channels (local_control_link.cpp)

 private:
  LocalControlLink();
  uint64_t instance_ = 0;
  std::unique_ptr<State> state_;
};

}  // namespace kvgate::transport
