#include "transport/nccl/tcp_control_link.h"

#include <boost/asio.hpp>

#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <string>

namespace kvgate::transport {

namespace asio = boost::asio;
using asio::ip::tcp;

namespace {
constexpr uint32_t kAddressMagic = 0x4354474Bu;  // "KGTC"
constexpr uint8_t kAddressVersion = 1;
}  // namespace

struct TcpControlLink::Impl {
  struct Channel {
    ChannelId id = 0;
    tcp::socket socket;
    tcp::resolver resolver;
    bool connected = false, writing = false, closed = false;
    std::deque<Bytes> out;  // frames with their length prefix
    uint8_t head[4] = {};
    Bytes body;
    explicit Channel(asio::io_context& io) : socket(io), resolver(io) {}
  };

  TcpControlLinkOptions options;
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::string host;
  uint16_t port = 0;
  ChannelId next = 1;
  std::map<ChannelId, std::shared_ptr<Channel>> channels;
  std::vector<Event> events;

  void end(const std::shared_ptr<Channel>& c, Status why) {
    if (c->closed) return;
    c->closed = true;
    boost::system::error_code ignore;
    c->socket.close(ignore);
    c->resolver.cancel();
    channels.erase(c->id);
    Event e;
    e.kind = Event::kClosed;
    e.channel = c->id;
    e.status = std::move(why);
    events.push_back(std::move(e));
  }

  void accept() {
    auto c = std::make_shared<Channel>(io);
    acceptor.async_accept(c->socket, [this, c](const boost::system::error_code& ec) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        c->id = next++;
        c->connected = true;
        boost::system::error_code ignore;
        c->socket.set_option(tcp::no_delay(true), ignore);
        channels[c->id] = c;
        read_head(c);
      }
      accept();
    });
  }

  void read_head(const std::shared_ptr<Channel>& c) {
    asio::async_read(c->socket, asio::buffer(c->head, 4), [this, c](const boost::system::error_code& ec, size_t) {
      if (c->closed) return;
      if (ec) return end(c, unavailable("control link: " + (ec == asio::error::eof ? std::string("the peer closed")
                                                                                 : ec.message())));
      uint32_t n = 0;
      std::memcpy(&n, c->head, 4);
      if (n > options.max_frame_bytes)
        return end(c, invalid_argument("control link: frame of " + std::to_string(n) + " bytes exceeds " +
                                       std::to_string(options.max_frame_bytes)));
      c->body.resize(n);
      asio::async_read(c->socket, asio::buffer(c->body.data(), n), [this, c](const boost::system::error_code& ec, size_t) {
        if (c->closed) return;
        if (ec) return end(c, unavailable("control link: " + ec.message()));
        Event e;
        e.kind = Event::kFrame;
        e.channel = c->id;
        e.frame = std::move(c->body);
        events.push_back(std::move(e));
        read_head(c);
      });
    });
  }

  void write(const std::shared_ptr<Channel>& c) {
    if (c->writing || !c->connected || c->out.empty() || c->closed) return;
    c->writing = true;
    asio::async_write(c->socket, asio::buffer(c->out.front()), [this, c](const boost::system::error_code& ec, size_t) {
      c->writing = false;
      if (c->closed) return;
      if (ec) return end(c, unavailable("control link: " + ec.message()));
      c->out.pop_front();
      write(c);
    });
  }
};

TcpControlLink::TcpControlLink(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

TcpControlLink::~TcpControlLink() {
  boost::system::error_code ignore;
  impl_->acceptor.close(ignore);
  // Best effort, bounded: what is queued (the transport's Goodbye) goes out
  // before the sockets close, so peers learn why the channel ended.
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  auto pending = [&] {
    for (const auto& [id, c] : impl_->channels)
      if (!c->out.empty() && (c->connected || !c->closed)) return true;
    return false;
  };
  while (pending() && std::chrono::steady_clock::now() < end) {
    impl_->io.run_one_for(std::chrono::milliseconds(10));
    impl_->io.restart();
  }
  for (auto& [id, c] : impl_->channels) {
    c->closed = true;
    c->socket.close(ignore);
  }
  impl_->channels.clear();
  // Pending handlers are destroyed with the io_context, never run.
}

Result<std::unique_ptr<NcclControlLink>> TcpControlLink::create(const TcpControlLinkOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(options.listen_host, ec);
  if (ec) return invalid_argument("control link: listen_host must be an IP address, got '" + options.listen_host + "'");
  const tcp::endpoint at(ip, options.listen_port);
  impl->acceptor.open(at.protocol(), ec);
  if (!ec) impl->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(at, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec)
    return unavailable("control link: cannot listen on " + options.listen_host + ":" +
                       std::to_string(options.listen_port) + ": " + ec.message());
  impl->host = options.listen_host;
  impl->port = impl->acceptor.local_endpoint().port();
  impl->accept();
  return std::unique_ptr<NcclControlLink>(new TcpControlLink(std::move(impl)));
}

Bytes TcpControlLink::address() const {
  Bytes out(4 + 1 + 2 + 4);
  std::memcpy(out.data(), &kAddressMagic, 4);
  out[4] = std::byte{kAddressVersion};
  std::memcpy(out.data() + 5, &impl_->port, 2);
  const uint32_t n = static_cast<uint32_t>(impl_->host.size());
  std::memcpy(out.data() + 7, &n, 4);
  for (char ch : impl_->host) out.push_back(std::byte(static_cast<uint8_t>(ch)));
  return out;
}

Result<NcclControlLink::ChannelId> TcpControlLink::open(std::span<const std::byte> a) {
  uint32_t magic = 0, n = 0;
  uint16_t port = 0;
  if (a.size() < 11) return invalid_argument("control link: not a tcp control address");
  std::memcpy(&magic, a.data(), 4);
  std::memcpy(&port, a.data() + 5, 2);
  std::memcpy(&n, a.data() + 7, 4);
  if (magic != kAddressMagic || static_cast<uint8_t>(a[4]) != kAddressVersion)
    return invalid_argument("control link: not a tcp control address");
  if (n == 0 || n > 255 || a.size() != 11 + size_t{n} || port == 0)
    return invalid_argument("control link: malformed tcp control address");
  const std::string host(reinterpret_cast<const char*>(a.data() + 11), n);
  auto c = std::make_shared<Impl::Channel>(impl_->io);
  c->id = impl_->next++;
  impl_->channels[c->id] = c;
  Impl* impl = impl_.get();
  c->resolver.async_resolve(host, std::to_string(port),
                            [impl, c](const boost::system::error_code& ec, tcp::resolver::results_type results) {
    if (c->closed) return;
    if (ec) return impl->end(c, unavailable("control link: cannot resolve: " + ec.message()));
    asio::async_connect(c->socket, results, [impl, c](const boost::system::error_code& ec, const tcp::endpoint&) {
      if (c->closed) return;
      if (ec) return impl->end(c, unavailable("control link: cannot connect: " + ec.message()));
      c->connected = true;
      boost::system::error_code ignore;
      c->socket.set_option(tcp::no_delay(true), ignore);
      impl->read_head(c);  // the end of the stream tells that the peer went
      impl->write(c);
    });
  });
  return c->id;
}

Status TcpControlLink::send(ChannelId channel, Bytes frame) {
  auto it = impl_->channels.find(channel);
  if (it == impl_->channels.end()) return unavailable("control link: channel closed");
  if (frame.size() > impl_->options.max_frame_bytes)
    return invalid_argument("control link: frame of " + std::to_string(frame.size()) + " bytes exceeds " +
                            std::to_string(impl_->options.max_frame_bytes));
  const uint32_t n = static_cast<uint32_t>(frame.size());
  Bytes wire(4);
  std::memcpy(wire.data(), &n, 4);
  wire.insert(wire.end(), frame.begin(), frame.end());
  it->second->out.push_back(std::move(wire));
  impl_->write(it->second);
  return {};
}

void TcpControlLink::close(ChannelId channel) {
  auto it = impl_->channels.find(channel);
  if (it == impl_->channels.end()) return;
  auto c = it->second;
  c->closed = true;
  boost::system::error_code ignore;
  c->socket.close(ignore);
  c->resolver.cancel();
  impl_->channels.erase(it);
}

void TcpControlLink::poll(std::vector<Event>& out) {
  impl_->io.poll();
  impl_->io.restart();
  for (auto& e : impl_->events) out.push_back(std::move(e));
  impl_->events.clear();
}

}  // namespace kvgate::transport
