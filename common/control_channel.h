// Control-plane connections over TCP (Boost.Asio): the framing of
// common/control_protocol.h on a socket, the Hello handshake with the
// cluster token, and a write queue (DESIGN.md §1, §7).
//
// Who uses it: the coordinator listens (nodes register with it), decode
// nodes listen (the coordinator and prefill nodes connect to them), prefill
// nodes listen (the coordinator sends them jobs), and each of them connects
// to the others with connect_control().
//
// Handshake: the connecting side sends its Hello first; nothing else is
// accepted before it. The listener checks the cluster token (constant-time
// compare; refused peers are counted and get HelloReject
// kPermissionDenied), the protocol version, then asks its
// ListenerOptions::accept_hello callback (which may reject with a Status:
// another model, a duplicate node id, ...) and answers HelloAck. Until the
// Hello is verified a listener accepts only small frames
// (kHandshakeMaxFrameBytes) and gives the peer handshake_timeout to send it.
//
// Threads: every callback of a connection runs on the io_context that
// created it, one at a time per connection (a strand). send() and close()
// may be called from any thread: they post to the connection's strand and
// never block. A connection whose peer sends a malformed or oversized frame
// is answered with an Error (request id none, naming what is wrong) and
// closed; the process is unaffected. Nothing here throws.
//
// Error contract of on_closed / connect failures:
//   the peer closed or the socket failed        kUnavailable
//   connect or handshake did not finish in time kDeadlineExceeded
//   HelloReject from the peer                   its code and reason
//   malformed or oversized frame from the peer  the decoder's code
//   close() by the owner                        the status given
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/config.h"
#include "common/control_protocol.h"
#include "common/status.h"

namespace boost::asio {
class io_context;
}

namespace kvgate::control {

// Frames accepted before the peer's Hello is verified (a Hello is small).
inline constexpr size_t kHandshakeMaxFrameBytes = 64 * 1024;

class Connection;
using ConnectionPtr = std::shared_ptr<Connection>;

// What happens on a connection after its handshake.
struct ConnectionHandlers {
  // Every message after the handshake, in arrival order.
  std::function<void(const ConnectionPtr&, Message)> on_message;
  // Exactly once, when the connection ends for any reason (never before
  // on_open / the connect callback reported the connection).
  std::function<void(const ConnectionPtr&, const Status&)> on_closed;
};

struct ChannelOptions {
  std::string cluster_token;  // compared in constant time
  bool auth_required = true;  // false only when the config says cluster.auth: disabled
  size_t max_frame_bytes = kDefaultMaxFrameBytes;
  std::chrono::milliseconds connect_timeout{2000};    // TCP connect + handshake
  std::chrono::milliseconds handshake_timeout{2000};  // listener: Hello must arrive by then
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  virtual ~Connection() = default;
  // Queues `message` (encoded now, on the caller's thread). Dropped silently
  // once the connection is closed. Thread-safe, non-blocking.
  virtual void send(const Message& message) = 0;
  // Closes after the queued messages were written (or at once if the
  // socket failed); on_closed gets `reason`. Thread-safe, idempotent.
  virtual void close(const Status& reason) = 0;
  virtual bool is_open() const = 0;
  // The peer's Hello (listener side) — on the connecting side a Hello with
  // the role and node id taken from the HelloAck (other fields empty).
  virtual const Hello& peer() const = 0;
  // "127.0.0.1:53412", for logs.
  virtual std::string remote_address() const = 0;
};

struct ListenerCounters {
  uint64_t accepted = 0;        // TCP connections accepted
  uint64_t refused_peers = 0;   // bad cluster token (or no Hello in time)
  uint64_t rejected_hello = 0;  // accept_hello said no
  uint64_t malformed = 0;       // connections closed for a bad frame
};

struct ListenerOptions {
  ChannelOptions channel;
  // This side's answer to a verified Hello: HelloAck fields, or a non-OK
  // Status sent as HelloReject (never kOk). Runs on the io_context.
  std::function<Result<HelloAck>(const Hello&)> accept_hello;
  // After HelloAck was queued: the connection is live.
  std::function<void(const ConnectionPtr&)> on_open;
  ConnectionHandlers handlers;
};

class Listener {
 public:
  virtual ~Listener() = default;
  // The bound address (port filled in when 0 was asked).
  virtual HostPort local_address() const = 0;
  // Stops accepting; live connections stay open. Thread-safe, idempotent.
  virtual void stop() = 0;
  virtual ListenerCounters counters() const = 0;
};

// Binds and starts accepting on `address` (port 0 = any free port).
// UNAVAILABLE naming the address when it cannot bind. Call on any thread;
// the work runs on `io`.
Result<std::shared_ptr<Listener>> listen_control(boost::asio::io_context& io,
                                                 const HostPort& address,
                                                 ListenerOptions options);

// Connects to `address`, sends `hello` (its cluster_token is set from
// options.cluster_token), waits for HelloAck. `done` runs once on `io` with
// the live connection and the peer's HelloAck, or the error (see the table
// above). Non-blocking.
using ConnectDone = std::function<void(Result<ConnectionPtr>, const HelloAck&)>;
void connect_control(boost::asio::io_context& io, const HostPort& address, Hello hello,
                     const ChannelOptions& options, ConnectionHandlers handlers, ConnectDone done);

// ChannelOptions from the `cluster` section (token from token or token_file:
// the caller reads the file; see read_cluster_token).
ChannelOptions channel_options(const PeerConfig& cluster, const std::string& token);
// The cluster token: cluster.token, or the first line of cluster.token_file;
// "" when auth is disabled. INVALID_ARGUMENT / NOT_FOUND naming the key.
Result<std::string> read_cluster_token(const PeerConfig& cluster);

}  // namespace kvgate::control
