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
// created it, one at a time per connection (a strand); with the io_context
// run by several threads, callbacks of different connections (and the
// listener's accept_hello / on_open) may run concurrently. send() and
// close() may be called from any thread: they post to the connection's
// strand and never block. A connection whose peer sends a malformed or
// oversized frame is answered with an Error (request id none, naming what
// is wrong) and closed; the process is unaffected. Nothing here throws.
// Sockets have TCP_NODELAY (small messages, latency matters).
//
// Error contract of on_closed / connect failures:
//   the peer closed or the socket failed        kUnavailable
//   connect or handshake did not finish in time kDeadlineExceeded
//   HelloReject from the peer                   its code and reason
//   malformed or oversized frame from the peer  the decoder's code
//   a first message other than Hello / HelloAck kInvalidArgument
//   a message too large to send                 kOutOfRange
//   close() by the owner                        the status given
// Listener side, before on_open (counted in ListenerCounters, logged, no
// callback): wrong token → HelloReject kPermissionDenied; other
// Hello.protocol_version → HelloReject kUnimplemented; accept_hello's
// Status → HelloReject; no Hello in handshake_timeout → Error
// kDeadlineExceeded; bad frame → Error with the decoder's code.
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

// What happens on a connection after its handshake. The connection keeps
// its handlers until it closes, then drops them: state they capture may
// hold the ConnectionPtr (that cycle ends at close).
struct ConnectionHandlers {
  // Every message after the handshake, in arrival order (a connection-level
  // Error from the peer included: it comes just before the peer closes).
  std::function<void(const ConnectionPtr&, Message)> on_message;
  // Exactly once, when the connection ends for any reason (never before
  // on_open / the connect callback reported the connection, and never for
  // a connection that was not reported).
  std::function<void(const ConnectionPtr&, const Status&)> on_closed;
};

struct ChannelOptions {
  std::string cluster_token;  // compared in constant time
  bool auth_required = true;  // false only when the config says cluster.auth: disabled
  size_t max_frame_bytes = kDefaultMaxFrameBytes;
  std::chrono::milliseconds connect_timeout{2000};    // TCP connect + handshake
  std::chrono::milliseconds handshake_timeout{2000};  // listener: Hello must arrive by then
  // close() and error closes: how long queued messages may take to drain
  // and the peer to see the end of the stream before the socket is dropped.
  std::chrono::milliseconds close_timeout{2000};
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  virtual ~Connection() = default;
  // Queues `message` (encoded now, on the caller's thread). Dropped silently
  // once the connection is closed. A message whose frame exceeds
  // max_frame_bytes is not sent: the connection closes with kOutOfRange
  // naming it (the peer would have closed it anyway). The queue is not
  // bounded: senders pace themselves (leases, queues). Thread-safe,
  // non-blocking.
  virtual void send(const Message& message) = 0;
  // Stops delivering messages, writes what is queued, ends the stream and
  // waits for the peer to end its side (or the socket fails, or
  // close_timeout passes), then closes; on_closed gets `reason` (the first
  // reason given). Thread-safe, idempotent.
  virtual void close(const Status& reason) = 0;
  virtual bool is_open() const = 0;
  // The peer's Hello on the listener side, cluster_token cleared (the
  // secret is not kept). On the connecting side: node_id and
  // protocol_version from the HelloAck and control_address the address
  // dialed; the rest is default (a HelloAck carries no role: the caller
  // knows whom it dialed). Fixed once the connection is reported.
  virtual const Hello& peer() const = 0;
  // "127.0.0.1:53412", for logs.
  virtual std::string remote_address() const = 0;
};

struct ListenerCounters {
  uint64_t accepted = 0;        // TCP connections accepted
  uint64_t refused_peers = 0;   // bad cluster token (or no Hello in time)
  uint64_t rejected_hello = 0;  // accept_hello said no, or another protocol_version in the Hello
  uint64_t malformed = 0;       // connections closed for a bad frame (or no Hello first)
};

struct ListenerOptions {
  ChannelOptions channel;
  // This side's answer to a verified Hello (token checked, then cleared):
  // HelloAck fields, or a non-OK Status sent as HelloReject. Runs on the
  // io_context. Unset: every verified Hello gets HelloAck{}.
  std::function<Result<HelloAck>(const Hello&)> accept_hello;
  // After HelloAck was queued: the connection is live.
  std::function<void(const ConnectionPtr&)> on_open;
  ConnectionHandlers handlers;
};

// Dropping the last reference stops accepting (as stop() does); live
// connections stay open.
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
// the work runs on `io`. A host name (not an IP literal) is resolved here,
// blocking. The listener and the connections must not outlive `io`.
Result<std::shared_ptr<Listener>> listen_control(boost::asio::io_context& io,
                                                 const HostPort& address, ListenerOptions options);

// Connects to `address` (an IP literal or a host name, resolved
// asynchronously; each address tried in turn), sends `hello` (its
// cluster_token is set from options.cluster_token), waits for HelloAck, all
// within options.connect_timeout. `done` runs once on `io` with the live
// connection and the peer's HelloAck, or the error (see the table above;
// an Error answered instead of HelloAck gives its code). Messages and
// on_closed come only after `done` returned. Non-blocking.
using ConnectDone = std::function<void(Result<ConnectionPtr>, const HelloAck&)>;
void connect_control(boost::asio::io_context& io, const HostPort& address, Hello hello,
                     const ChannelOptions& options, ConnectionHandlers handlers, ConnectDone done);

// ChannelOptions from the `cluster` section (token from token or token_file:
// the caller reads the file; see read_cluster_token). handshake_timeout is
// cluster.connect_timeout too.
ChannelOptions channel_options(const PeerConfig& cluster, const std::string& token);
// The cluster token: cluster.token, or the first line of cluster.token_file
// (surrounding whitespace trimmed); "" when auth is disabled.
// NOT_FOUND naming cluster.token_file when the file cannot be read;
// INVALID_ARGUMENT naming the key when the token is empty or neither key is
// set while cluster.auth is required.
Result<std::string> read_cluster_token(const PeerConfig& cluster);

}  // namespace kvgate::control
