// transport_peer_helper: the sending side of the two-process transport test.
//
// Reads one line from stdin:
//   <receiver address hex> <grant hex> <transfer id> <total bytes> <segment bytes> <mode>
// connects with a ucx Transport (am, tcp on lo, token "secret"), sends
// total bytes of deterministic content (random_bytes(total, transfer id)) in
// segments, and
//   mode "ok":   finishes, waits for the receiver's verdict, exits 0 if it
//                was OK (1 otherwise);
//   mode "hang": never finishes, keeps progressing until killed (the test
//                kills it with SIGKILL to make a peer vanish).
// Gives up after 30 s (exit 2). Prints what it does on stderr.
#include <cstdio>
#include <iostream>
#include <string>

#include "tests/unit/transport/transport_test_util.h"

using namespace kvgate;
using namespace kvgate::transport;

namespace {

Bytes from_hex(const std::string& s) {
  Bytes b(s.size() / 2);
  for (size_t i = 0; i < b.size(); ++i) b[i] = std::byte(std::stoi(s.substr(2 * i, 2), nullptr, 16));
  return b;
}

int fail(const std::string& what) {
  std::fprintf(stderr, "[peer] %s\n", what.c_str());
  return 1;
}

}  // namespace

int main() {
  std::string addr_hex, grant_hex, mode;
  uint64_t id = 0, total = 0, seg = 0;
  if (!(std::cin >> addr_hex >> grant_hex >> id >> total >> seg >> mode) || seg == 0)
    return fail("bad input line");
  TransportConfig c;
  c.kind = TransportKind::kUcx;
  c.ucx_op = UcxOp::kAm;
  c.ucx_tls = {"tcp"};
  c.ucx_net_devices = {"lo"};
  TransportOptions o;
  o.cluster_token = "secret";
  auto t = create_transport(c, o);
  if (!t.ok()) return fail(t.status().to_string());
  auto peer = (*t)->connect(from_hex(addr_hex));
  if (!peer.ok()) return fail(peer.status().to_string());
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  Status s = (*t)->begin_send(*peer, TransferId(id), from_hex(grant_hex), deadline);
  if (!s.ok()) return fail(s.to_string());
  const auto src = kvgate::transport::testing::random_bytes(total, id);
  uint32_t index = 0;
  for (uint64_t at = 0; at < total; at += seg, ++index) {
    s = (*t)->send_segment(*peer, TransferId(id), index, src.data() + at, std::min(seg, total - at), at);
    if (!s.ok()) return fail(s.to_string());
  }
  if (mode == "ok") {
    s = (*t)->finish(*peer, TransferId(id));
    if (!s.ok()) return fail(s.to_string());
  }
  std::fprintf(stderr, "[peer] sent %u segments (%s)\n", index, mode.c_str());
  std::vector<TransferEvent> events;
  while (events.empty()) {
    if (Clock::now() > deadline) return 2;
    (*t)->progress(events);
  }
  std::fprintf(stderr, "[peer] verdict: %s\n", events[0].status.to_string().c_str());
  return events[0].status.ok() ? 0 : 1;
}
