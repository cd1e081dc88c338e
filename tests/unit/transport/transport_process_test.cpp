// Two real processes over UCX (tcp on lo): this process receives, the
// helper (transport_peer_helper) sends. Addresses travel through a pipe.
// No sleeps: every wait is a condition with a deadline.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "tests/unit/transport/transport_test_util.h"
#include "transport/wire.h"

extern char** environ;

namespace kvgate::transport::testing {
namespace {

std::string hex(const Bytes& b) {
  std::string s;
  char buf[3];
  for (auto x : b) {
    std::snprintf(buf, sizeof buf, "%02x", static_cast<unsigned>(x));
    s += buf;
  }
  return s;
}

struct Child {
  pid_t pid = -1;
  int stdin_fd = -1;
};

Child spawn_helper() {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[0], 0);
  posix_spawn_file_actions_addclose(&fa, fds[1]);
  char* argv[] = {const_cast<char*>(KVGATE_TRANSPORT_PEER), nullptr};
  Child c;
  EXPECT_EQ(posix_spawn(&c.pid, KVGATE_TRANSPORT_PEER, &fa, nullptr, argv, environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  close(fds[0]);
  c.stdin_fd = fds[1];
  return c;
}

void send_line(Child& c, const std::string& line) {
  ASSERT_EQ(write(c.stdin_fd, line.data(), line.size()), static_cast<ssize_t>(line.size()));
  close(c.stdin_fd);
}

// Waits for the child while progressing `t`; returns its exit status or -1.
int wait_child(Child& c, Transport& t, std::vector<TransferEvent>& events) {
  const auto end = Clock::now() + 30s;
  while (Clock::now() < end) {
    int status = 0;
    if (waitpid(c.pid, &status, WNOHANG) == c.pid) return status;
    t.progress(events);
  }
  kill(c.pid, SIGKILL);
  waitpid(c.pid, nullptr, 0);
  return -1;
}

class TransportProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    setenv("UCX_NET_DEVICES", "lo", 0);
    region_.assign(size_t{32} << 20, std::byte{0});
    TransportConfig c;
    c.kind = TransportKind::kUcx;
    c.ucx_op = UcxOp::kAm;
    c.ucx_tls = {"tcp"};
    c.ucx_net_devices = {"lo"};
    TransportOptions o;
    o.cluster_token = "secret";
    o.region = region_.data();
    o.region_bytes = region_.size();
    auto t = create_transport(c, o);
    ASSERT_TRUE(t.ok()) << t.status().to_string();
    receiver_ = std::move(*t);
  }
  // 64 KiB pages, every other one, in reverse order.
  std::vector<DestRange> pages(size_t n) {
    std::vector<DestRange> r;
    for (size_t i = 0; i < n; ++i) r.push_back({2 * (n - 1 - i) * 65536, 65536});
    return r;
  }
  std::vector<std::byte> region_;
  std::unique_ptr<Transport> receiver_;
  std::vector<TransferEvent> events_;
};

TEST_F(TransportProcessTest, TransferFromAnotherProcess) {
  const uint64_t id = 77, total = 6 * 1000 * 1000, seg = 700 * 1000;
  const auto ranges = pages(100);
  auto grant = receiver_->post_receive({TransferId(id), ranges, Clock::now() + 30s});
  ASSERT_TRUE(grant.ok());
  Child child = spawn_helper();
  send_line(child, hex(*receiver_->address()) + " " + hex(*grant) + " " + std::to_string(id) + " " +
                       std::to_string(total) + " " + std::to_string(seg) + " ok\n");
  ASSERT_TRUE(pump({receiver_.get()}, {&events_}, [&] { return !events_.empty(); }, 30000ms));
  ASSERT_TRUE(events_[0].status.ok()) << events_[0].status.to_string();
  EXPECT_EQ(events_[0].bytes, total);
  const int status = wait_child(child, *receiver_, events_);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  // Contents, through the scattered pages.
  const auto expect = random_bytes(total, id);
  wire::RangeMap map(ranges);
  std::vector<wire::Piece> pieces;
  ASSERT_TRUE(map.map(0, total, pieces).ok());
  for (const auto& p : pieces)
    ASSERT_EQ(std::memcmp(region_.data() + p.region_offset, expect.data() + p.source_offset, p.length_bytes), 0);
}

TEST_F(TransportProcessTest, KilledSenderIsUnavailable) {
  const uint64_t id = 78, total = 1 << 20, seg = 256 << 10;
  const auto ranges = pages(20);
  auto grant = receiver_->post_receive({TransferId(id), ranges, Clock::now() + 30s});
  ASSERT_TRUE(grant.ok());
  Child child = spawn_helper();
  send_line(child, hex(*receiver_->address()) + " " + hex(*grant) + " " + std::to_string(id) + " " +
                       std::to_string(total) + " " + std::to_string(seg) + " hang\n");
  // Wait until the first segment has landed (the peer is mid-transfer).
  const auto expect = random_bytes(total, id);
  const std::byte* first = region_.data() + ranges[0].offset_bytes;
  ASSERT_TRUE(pump({receiver_.get()}, {&events_}, [&] {
    return std::memcmp(first, expect.data(), 4096) == 0;
  }, 30000ms));
  kill(child.pid, SIGKILL);
  waitpid(child.pid, nullptr, 0);
  ASSERT_TRUE(pump({receiver_.get()}, {&events_}, [&] { return !events_.empty(); }, 30000ms));
  EXPECT_EQ(events_[0].status.code(), StatusCode::kUnavailable) << events_[0].status.to_string();
}

}  // namespace
}  // namespace kvgate::transport::testing
