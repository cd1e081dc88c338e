// TcpControlLink: NcclControlLink over TCP (Boost.Asio), for ranks in
// different processes or on different nodes. One listening socket per
// endpoint (bound at create(), port 0 = any); a channel is one TCP
// connection carrying frames as u32 length (little-endian) + bytes.
//
// No hidden threads: the endpoint owns an io_context that only poll()
// drives (io_context::poll, non-blocking), so every socket callback runs on
// the owner thread inside NcclTransport::progress(). open() resolves and
// connects asynchronously; frames sent before the connection completes
// are queued. A frame longer than max_frame_bytes, a failed connect, a
// reset or an orderly end of the stream closes the channel (kClosed with
// the reason). Authentication is the transport's (Ident frame with the
// cluster token, then the core's Hello); the link itself trusts nobody's
// frames more than the transport does.
//
// Address blob: "KGTC", version u8, port u16, host (u32 length + bytes;
// an IP literal or a name, resolved on open()).
//
// The destructor flushes queued frames for at most 200 ms (the transport's
// Goodbye), then closes every socket.
//
// Threading: one owner thread (the transport's).
#pragma once

#include <memory>
#include <string>

#include "transport/nccl/nccl_link.h"

namespace kvgate::transport {

struct TcpControlLinkOptions {
  std::string listen_host = "127.0.0.1";  // where peers reach this endpoint
  uint16_t listen_port = 0;               // 0: any free port
  size_t max_frame_bytes = size_t{8} << 20;  // a manifest of kMaxSegments is ~1 MiB
};

class TcpControlLink final : public NcclControlLink {
 public:
  // UNAVAILABLE when the address cannot be bound.
  static Result<std::unique_ptr<NcclControlLink>> create(const TcpControlLinkOptions& options = {});
  ~TcpControlLink() override;

  Bytes address() const override;
  Result<ChannelId> open(std::span<const std::byte> address) override;
  Status send(ChannelId channel, Bytes frame) override;
  void close(ChannelId channel) override;
  void poll(std::vector<Event>& out) override;

  struct Impl;  // asio state (tcp_control_link.cpp)

 private:
  explicit TcpControlLink(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvgate::transport
