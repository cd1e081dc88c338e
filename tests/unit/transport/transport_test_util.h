// Helpers shared by the transport tests: the transports under test, a
// sender/receiver pair, and waiting on conditions with a deadline (never
// sleeping for a fixed time).
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <atomic>
#include <functional>
#include <thread>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "transport/transport.h"

namespace kvgate::transport::testing {

using namespace std::chrono_literals;

struct TransportParam {
  std::string name;  // test name suffix
  TransportConfig config;
  // The receiver checksums every received segment while it lands (ucx
  // am/tag over tcp: the copy+crc datatype; eager payloads).
  bool checksums_while_landing = false;
};

// gtest prints a parameter by its name (not as a byte dump).
inline void PrintTo(const TransportParam& p, std::ostream* os) { *os << p.name; }

inline std::vector<TransportParam> all_transports() {
  std::vector<TransportParam> v;
  TransportConfig loop;
  loop.kind = TransportKind::kLoopback;
  v.push_back({"loopback", loop});
#if KVGATE_HAVE_UCX
  for (auto op : {UcxOp::kAm, UcxOp::kTag, UcxOp::kPut}) {
    TransportConfig c;
    c.kind = TransportKind::kUcx;
    c.ucx_op = op;
    c.ucx_tls = {"tcp"};
    c.ucx_net_devices = {"lo"};
    v.push_back({op == UcxOp::kAm ? "ucx_am_tcp" : op == UcxOp::kTag ? "ucx_tag_tcp" : "ucx_put_tcp", c,
                 op != UcxOp::kPut});
  }
  for (auto op : {UcxOp::kAm, UcxOp::kTag}) {
    TransportConfig shm;
    shm.kind = TransportKind::kUcx;
    shm.ucx_op = op;
    shm.ucx_tls = {"sm", "tcp"};
    shm.ucx_net_devices = {"lo"};
    v.push_back({op == UcxOp::kAm ? "ucx_am_shm" : "ucx_tag_shm", shm});
  }
#endif
  return v;
}

inline std::vector<std::byte> random_bytes(size_t n, uint64_t seed) {
  std::vector<std::byte> v(n);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t x = rng();
    std::memcpy(v.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return v;
}

// Progresses every transport in `ts` (null entries skipped) and collects
// their events, until `done()` or `limit` passes. Returns done().
inline bool pump(std::vector<Transport*> ts, std::vector<std::vector<TransferEvent>*> sinks,
                 const std::function<bool()>& done, std::chrono::milliseconds limit = 20000ms) {
  const auto end = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() > end) return false;
    for (size_t i = 0; i < ts.size(); ++i)
      if (ts[i]) ts[i]->progress(*sinks[i]);
  }
  return true;
}

// Destroys `victim` on a helper thread while this thread keeps `other`
// progressing, as a live peer process would: a UCX endpoint's teardown
// (flush, wireup) may need the other side to answer.
inline void destroy_while_progressing(std::unique_ptr<Transport>& victim, Transport* other,
                                      std::vector<TransferEvent>* sink) {
  std::atomic<bool> gone{false};
  std::thread t([&] {
    victim.reset();
    gone = true;
  });
  while (!gone) other->progress(*sink);
  t.join();
}

}  // namespace kvgate::transport::testing
