// kvgate_transport_bench: bandwidth of the ucx transport (am, tag and put)
// for KV images of 1 MiB to 256 MiB over tcp on lo and over shared memory,
// next to ucx_perftest's best of tag_bw and put_bw run in the same
// invocation with the same UCX_TLS/UCX_NET_DEVICES, printed as ratios.
//
//   kvgate_transport_bench [--bytes-per-point N] [--no-perftest] [--quick]
//       [--tls tcp,shm] [--ops am,tag,put,auto] [--sizes-mib 1,4,16,64,256]
//       [--window N] [--segments N] [--rounds N] [--transport-crc]
//
// Each point: a receiver (this process) keeps `window` transfers posted in a
// registered region (default by size: 32 up to 64 KiB, 8 up to 1 MiB, else
// 2, as the decode node), a sender (a child process, as a prefill node is
// another process — UCX uses shared memory only between processes) ships
// each as `segments` segments (default 32, as the prefill node ships one
// per block of layers: 30 for SmolLM2) from a prepared buffer, handing over
// each segment's CRC32C as the prefill node does (--transport-crc: the
// transport computes it);
// bandwidth is payload bytes / wall time from the end of a warm-up of
// `window` transfers (connect and wire-up, as perftest's -w iterations) to
// the last verified completion (CRC32C on both sides included). Progress goes to
// stderr. Noise: on a shared 2-core machine any other busy process halves
// both figures unevenly; without the perftest runs first the machine is
// also measurably slower (use --no-perftest only for relative checks).
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/crc32c.h"
#include "transport/transport.h"
#include "transport/ucx/ucx_transport.h"

using namespace kvgate;
using namespace kvgate::transport;

namespace {

void progress_msg(const std::string& m) { std::fprintf(stderr, "[transport-bench] %s\n", m.c_str()); }

struct Tls {
  const char* name;
  std::vector<std::string> tls;  // kvgate's transport.ucx_tls
  // UCX_TLS values ucx_perftest runs with; its best over all of them counts.
  std::vector<const char*> perftest_envs;
};

struct Point {
  double gbps = 0;
  bool ok = false;
  std::string error;
};

struct Knobs {
  size_t window = 0;    // transfers posted at once; 0: by size (as kvgate's decode node)
  size_t segments = 32;  // segments per transfer, all in flight together
  // The sender hands each segment's CRC32C to the transport, computed once
  // when the source buffer was written (as the prefill node computes it
  // while staging its pages), instead of the transport reading the bytes
  // again per transfer. The receiver verifies every byte as always.
  bool producer_crc = true;
};

// The pipe between the receiver (this process) and the sender (a child):
// length-prefixed blobs, the receiver's address first, then one grant per
// transfer (u64 id, then the grant); end of file = no more transfers.
bool write_all(int fd, const void* p, size_t n) {
  const auto* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, n);
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool write_blob(int fd, uint64_t id, const Bytes& b) {
  const uint64_t len = b.size();
  return write_all(fd, &id, 8) && write_all(fd, &len, 8) && write_all(fd, b.data(), b.size());
}

// Takes complete blobs off the front of `buf`.
bool next_blob(std::vector<char>& buf, uint64_t& id, Bytes& out) {
  if (buf.size() < 16) return false;
  uint64_t len = 0;
  std::memcpy(&id, buf.data(), 8);
  std::memcpy(&len, buf.data() + 8, 8);
  if (buf.size() < 16 + len) return false;
  out.assign(reinterpret_cast<const std::byte*>(buf.data() + 16),
             reinterpret_cast<const std::byte*>(buf.data() + 16 + len));
  buf.erase(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(16 + len));
  return true;
}

// The sender process: connects to the address, ships every granted
// transfer as `nseg` segments from a prepared buffer, progresses until the
// pipe closes and its transfers ended. Exit 0, or 3 after a failure.
[[noreturn]] void sender_main(int fd, const TransportConfig& c, size_t size, size_t seg_bytes,
                              bool producer_crc) {
  std::vector<std::byte> src(size);
  for (size_t i = 0; i < size; ++i) src[i] = std::byte(static_cast<uint8_t>(i * 131 + 7));
  std::vector<uint32_t> crcs;
  for (size_t off = 0; producer_crc && off < size; off += seg_bytes) {
    crcs.push_back(crc32c(src.data() + off, std::min(seg_bytes, size - off)));
  }
  std::vector<char> buf;
  char chunk[65536];
  bool eof = false;
  auto pump_pipe = [&](bool block) {
    if (eof) return;
    const ssize_t r = ::read(fd, chunk, sizeof chunk);
    if (r > 0) buf.insert(buf.end(), chunk, chunk + r);
    else if (r == 0) eof = true;
    else if (block) std::this_thread::yield();
  };
  uint64_t id = 0;
  Bytes address;
  while (!next_blob(buf, id, address)) {
    pump_pipe(true);
    if (eof) _exit(3);
  }
  int flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  TransportOptions so;
  so.cluster_token = "bench";
  int code = 0;
  {
    auto s = create_transport(c, so);
    if (!s.ok()) _exit(3);
    auto peer = (*s)->connect(address);
    if (!peer.ok()) _exit(3);
    std::vector<TransferEvent> ev;
    size_t in_flight = 0;
    Bytes grant;
    while (!eof || in_flight > 0) {
      pump_pipe(false);
      while (next_blob(buf, id, grant)) {
        Status st = (*s)->begin_send(*peer, TransferId(id), grant, Clock::now() + std::chrono::seconds(60));
        for (size_t k = 0; st.ok() && k * seg_bytes < size; ++k) {
          const size_t off = k * seg_bytes;
          st = (*s)->send_segment(*peer, TransferId(id), static_cast<uint32_t>(k), src.data() + off,
                                  std::min(seg_bytes, size - off), off,
                                  producer_crc ? std::optional<uint32_t>(crcs[k]) : std::nullopt);
        }
        if (st.ok()) st = (*s)->finish(*peer, TransferId(id));
        if (!st.ok()) code = 3;
        ++in_flight;
      }
      ev.clear();
      (*s)->progress(ev);
      for (auto& e : ev) {
        if (!e.status.ok()) code = 3;
        if (in_flight > 0) --in_flight;
      }
    }
    // Destroyed here while the receiver still progresses (it waits for us).
  }
  _exit(code);
}

// The receiver on CPU 0, the sender on CPU 1, for kvgate and perftest
// alike: left to the scheduler, the two sometimes share a core for part of
// a point and halve its figure (a 2-core VM showed ratios of 0.4-1.3 for
// one configuration unpinned).
void pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  (void)::sched_setaffinity(0, sizeof set, &set);
}

// Receiver in this process, sender in a child (a real second process, as a
// prefill and a decode node are: UCX picks shared memory between
// processes, but not between two workers of one process).
Point run_point(const Tls& tls, UcxOp op, size_t size, size_t total_bytes, const Knobs& knobs) {
  const size_t window = knobs.window ? knobs.window : size <= (64 << 10) ? 32 : size <= (1 << 20) ? 8 : 2;
  const size_t nseg = std::max<size_t>(1, std::min(knobs.segments, size));
  const size_t seg_bytes = (size + nseg - 1) / nseg;
  // Timed transfers after a warm-up of `window` (see below).
  const size_t n = window + std::max<size_t>(window * 2, total_bytes / size);
  TransportConfig c;
  c.kind = TransportKind::kUcx;
  c.ucx_op = op;
  c.ucx_tls = tls.tls;
  c.ucx_net_devices = {"lo"};
  int fds[2];
  if (::pipe(fds) != 0) return {0, false, "pipe failed"};
  std::fflush(nullptr);
  const pid_t child = ::fork();
  if (child < 0) return {0, false, "fork failed"};
  if (child == 0) {
    pin_to_cpu(1);
    ::close(fds[1]);
    sender_main(fds[0], c, size, seg_bytes, knobs.producer_crc);
  }
  ::close(fds[0]);
  const int out = fds[1];
  pin_to_cpu(0);

  std::vector<std::byte> region(window * size);
  TransportOptions ro;
  ro.cluster_token = "bench";
  ro.region = region.data();
  ro.region_bytes = region.size();
  std::string error;
  double secs = 0;
  {
    auto recv = create_transport(c, ro);
    if (!recv.ok()) error = recv.status().to_string();
    if (error.empty()) {
      auto addr = (*recv)->address();
      if (!addr.ok() || !write_blob(out, 0, *addr)) error = "cannot hand the address to the sender";
    }
    uint64_t next_id = 1;
    auto post = [&](size_t slot) {
      const uint64_t id = next_id++;
      auto g = (*recv)->post_receive(
          {TransferId(id), {{slot * size, size}}, Clock::now() + std::chrono::seconds(60)});
      if (!g.ok() || !write_blob(out, id, *g)) error = "cannot post or hand over a grant";
    };
    // The first `warm` transfers are a warm-up, not timed (perftest's -w):
    // they include the sender's connect and UCX's wire-up, which a decode
    // node pays once per peer, not per transfer.
    const size_t warm = window;
    auto t0 = Clock::now();
    size_t done = 0, posted = 0;
    std::vector<TransferEvent> ev;
    if (error.empty()) {
      for (; posted < window; ++posted) post(posted);
    }
    while (error.empty() && done < n) {
      ev.clear();
      (*recv)->progress(ev);
      for (auto& e : ev) {
        if (!e.status.ok()) error = e.status.to_string();
        if (++done == warm) t0 = Clock::now();
        if (posted < n) {
          post((e.id.value() - 1) % window);
          ++posted;
        }
      }
      if (Clock::now() - t0 > std::chrono::seconds(120)) error = "timed out";
    }
    secs = std::chrono::duration<double>(Clock::now() - t0).count();
    ::close(out);  // no more transfers: the sender winds down
    // Keep progressing while the sender tears down (its endpoint flush
    // needs us), then collect its verdict.
    int status = 0;
    const auto give_up = Clock::now() + std::chrono::seconds(30);
    while (true) {
      if (recv.ok()) {
        ev.clear();
        (*recv)->progress(ev);
      }
      const pid_t w = ::waitpid(child, &status, WNOHANG);
      if (w == child) break;
      if (Clock::now() > give_up) {
        ::kill(child, SIGKILL);
        ::waitpid(child, &status, 0);
        if (error.empty()) error = "sender did not finish";
        break;
      }
    }
    if (error.empty() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) error = "the sender failed";
  }
  if (!error.empty()) return {0, false, error};
  return {static_cast<double>(n - window) * size / secs / 1e9, true, ""};
}

// ucx_perftest `test` (tag_bw, put_bw) between two processes on this
// machine; GB/s or < 0. The server is our child and is reaped before this
// returns: one left to tear down in the background would share a core with
// the next kvgate run (seen as kvgate points at half speed).
double perftest(const char* tls_env, const char* test, size_t size, size_t total_bytes, int port) {
  const size_t n = std::max<size_t>(8, total_bytes / size);
  const int warmup = size >= (16u << 20) ? 4 : 16;  // perftest's -w: untimed iterations
  const std::string env = std::string("UCX_TLS=") + tls_env + " UCX_NET_DEVICES=lo ";
  const std::string args = std::string(" -t ") + test + " -s " + std::to_string(size) + " -n " +
                           std::to_string(n) + " -w " + std::to_string(warmup) + " -p " +
                           std::to_string(port);
  const std::string server_cmd = env + "exec taskset -c 0 ucx_perftest" + args + " >/dev/null 2>&1";
  std::fflush(nullptr);
  const pid_t server = ::fork();
  if (server < 0) return -1;
  if (server == 0) {
    ::execl("/bin/sh", "sh", "-c", server_cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  double gbps = -1;
  // The server needs a moment to listen: retry the client until it connects.
  for (int attempt = 0; attempt < 100 && gbps < 0; ++attempt) {
    const std::string client = env + "taskset -c 1 ucx_perftest localhost" + args + " 2>/dev/null";
    FILE* p = popen(client.c_str(), "r");
    if (!p) break;
    char line[512];
    double mbps = -1;
    while (std::fgets(line, sizeof line, p)) {
      // "Final: iters lat50 lat_avg lat_overall bw_avg bw_overall rate_avg rate_overall"
      double v[8];
      if (std::strncmp(line, "Final:", 6) == 0 &&
          std::sscanf(line + 6, "%lf %lf %lf %lf %lf %lf %lf %lf", &v[0], &v[1], &v[2], &v[3], &v[4],
                      &v[5], &v[6], &v[7]) == 8)
        mbps = v[5];
    }
    const int rc = pclose(p);
    if (rc == 0 && mbps > 0) {
      gbps = mbps * 1048576.0 / 1e9;  // perftest's MB/s are MiB/s
    } else {
      usleep(20000);  // the server is not listening yet: back off, then retry
    }
  }
  // Reap the server (it exits after the test); kill it if it lingers.
  int status = 0;
  const auto give_up = Clock::now() + std::chrono::seconds(gbps < 0 ? 0 : 20);
  while (::waitpid(server, &status, WNOHANG) == 0) {
    if (Clock::now() >= give_up) {
      ::kill(server, SIGKILL);
      ::waitpid(server, &status, 0);
      break;
    }
    usleep(1000);
  }
  return gbps;
}

std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", v);
  return b;
}

}  // namespace

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t comma = s.find(',', at);
    out.push_back(s.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

const char* op_name(UcxOp op) {
  switch (op) {
    case UcxOp::kAm: return "am";
    case UcxOp::kPut: return "put";
    case UcxOp::kTag: return "tag";
    case UcxOp::kAuto: return "auto";
  }
  return "?";
}

double median(std::vector<double> v) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char** argv) {
  size_t total = size_t{2} << 30;  // ~0.5 s a point at 4 GB/s: shorter points scatter widely
  int rounds = 1;
  bool run_perftest = true;
  Knobs knobs;
  std::vector<std::string> tls_names = {"tcp", "shm"};
  std::vector<UcxOp> ops = {UcxOp::kAm, UcxOp::kTag, UcxOp::kPut};
  std::vector<size_t> sizes = {size_t{1} << 20, size_t{4} << 20, size_t{16} << 20, size_t{64} << 20,
                               size_t{256} << 20};
  auto usage = [&] {
    std::fprintf(stderr,
                 "usage: %s [--bytes-per-point N] [--no-perftest] [--quick] [--tls tcp,shm]\n"
                 "          [--ops am,tag,put,auto] [--sizes-mib 1,4,16,64,256] [--window N] [--segments N]\n"
                 "          [--rounds N] [--transport-crc]\n",
                 argv[0]);
    return 2;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has = i + 1 < argc;
    if (a == "--bytes-per-point" && has) total = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--no-perftest") run_perftest = false;
    else if (a == "--quick") total = size_t{64} << 20;
    else if (a == "--tls" && has) tls_names = split(argv[++i]);
    else if (a == "--window" && has) knobs.window = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--segments" && has) knobs.segments = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--rounds" && has) rounds = std::max(1, std::atoi(argv[++i]));
    else if (a == "--transport-crc") knobs.producer_crc = false;
    else if (a == "--sizes-mib" && has) {
      sizes.clear();
      for (const auto& v : split(argv[++i])) sizes.push_back(std::strtoull(v.c_str(), nullptr, 10) << 20);
    } else if (a == "--ops" && has) {
      ops.clear();
      for (const auto& v : split(argv[++i])) {
        if (v == "am") ops.push_back(UcxOp::kAm);
        else if (v == "tag") ops.push_back(UcxOp::kTag);
        else if (v == "put") ops.push_back(UcxOp::kPut);
        else if (v == "auto") ops.push_back(UcxOp::kAuto);
        else return usage();
      }
    } else {
      return usage();
    }
  }
  setenv("UCX_NET_DEVICES", "lo", 1);
  std::vector<Tls> tlss;
  for (const auto& n : tls_names) {
    if (n == "tcp") tlss.push_back({"tcp", {"tcp"}, {"tcp"}});
    // Shared memory: kvgate as a same-host deployment configures it (posix
    // and sysv: UCX's copy-in/copy-out transports, where the receiver
    // checksums while landing); perftest's best of that and of UCX's whole
    // shared-memory set (sm: sysv + cma zero-copy).
    else if (n == "shm") tlss.push_back({"shm", {"posix", "sysv", "tcp"}, {"sm,tcp", "posix,sysv,tcp"}});
    else return usage();
  }
  {
    // Both figures share the machine: a busy machine depresses both, unevenly.
    char load[128] = "?";
    if (FILE* f = std::fopen("/proc/loadavg", "r")) {
      if (!std::fgets(load, sizeof load, f)) std::strcpy(load, "?");
      std::fclose(f);
    }
    std::printf("# cores %ld, load average %s", sysconf(_SC_NPROCESSORS_ONLN), load);
    std::printf("# window %s, segments per transfer %zu, bytes per point %zu, sender CRC %s\n",
                knobs.window ? std::to_string(knobs.window).c_str() : "by size", knobs.segments, total,
                knobs.producer_crc ? "handed over by the producer" : "computed by the transport");
  }
  // With --rounds N, each point is N rounds of [ucx_perftest, then kvgate
  // per op], interleaved so a burst of load hits both; the line gives the
  // medians (ratio: median of the per-round ratios) and the ratios' range.
  std::printf("# rounds %d (medians; ratio range in brackets)\n", rounds);
  for (const auto& t : tlss)
    std::printf("# %s: ucx_tls %s (perftest best of UCX_TLS=%s%s%s), receiver lands %s\n", t.name,
                [&] {
                  std::string j;
                  for (const auto& x : t.tls) j += (j.empty() ? "" : ",") + x;
                  return j;
                }().c_str(),
                t.perftest_envs[0], t.perftest_envs.size() > 1 ? " and " : "",
                t.perftest_envs.size() > 1 ? t.perftest_envs[1] : "",
                UcxTransport::lands_by_copy(t.tls) ? "copy+crc (checksummed while landing)" : "direct, then a CRC pass");
  std::printf("%-4s %-8s %-4s %10s %14s %8s\n", "tls", "size", "op", "GB/s", "perftest best", "ratio");
  int port = 13400 + static_cast<int>(getpid() % 500);
  for (const auto& tls : tlss) {
    for (size_t size : sizes) {
      std::vector<double> pts;
      std::vector<std::vector<double>> gbps(ops.size()), ratios(ops.size());
      std::vector<std::string> errors(ops.size());
      for (int round = 0; round < rounds; ++round) {
        double pt = -1;
        if (run_perftest) {
          // The peer's best operation at this size (put over tcp collapses,
          // STACK.md, so its bytes are capped as for kvgate's put below).
          progress_msg("ucx_perftest tag_bw/put_bw " + std::string(tls.name) + " " +
                       std::to_string(size) + " B");
          const size_t put_bytes = tls.name == std::string("tcp") ? total / 8 : total;
          for (const char* env : tls.perftest_envs) {
            pt = std::max({pt, perftest(env, "tag_bw", size, total, port),
                           perftest(env, "put_bw", size, put_bytes, port + 1)});
            port += 2;
          }
          if (pt > 0) pts.push_back(pt);
        }
        for (size_t o = 0; o < ops.size(); ++o) {
          const UcxOp op = ops[o];
          progress_msg(std::string("kvgate ") + tls.name + " " + op_name(op) + " " + std::to_string(size) + " B");
          // Put over tcp collapses at large sizes (STACK.md): cap its bytes.
          const size_t bytes = (op == UcxOp::kPut && tls.name == std::string("tcp")) ? total / 8 : total;
          Point p = run_point(tls, op, size, bytes, knobs);
          if (!p.ok) {
            errors[o] = p.error;
            continue;
          }
          gbps[o].push_back(p.gbps);
          if (pt > 0) ratios[o].push_back(p.gbps / pt);
        }
      }
      const std::string size_s = size >= (1 << 20) ? std::to_string(size >> 20) + "MiB" : std::to_string(size >> 10) + "KiB";
      const double pt = median(pts);
      for (size_t o = 0; o < ops.size(); ++o) {
        const char* opn = op_name(ops[o]);
        if (gbps[o].empty()) {
          std::printf("%-4s %-8s %-4s %10s %14s %8s   (%s)\n", tls.name, size_s.c_str(), opn, "error",
                      pt > 0 ? fmt(pt).c_str() : "-", "-", errors[o].c_str());
          continue;
        }
        std::string range;
        if (ratios[o].size() > 1) {
          range = "  [" + fmt(*std::min_element(ratios[o].begin(), ratios[o].end())) + ", " +
                  fmt(*std::max_element(ratios[o].begin(), ratios[o].end())) + "]";
        }
        std::printf("%-4s %-8s %-4s %10s %14s %8s%s\n", tls.name, size_s.c_str(), opn,
                    fmt(median(gbps[o])).c_str(), pt > 0 ? fmt(pt).c_str() : "-",
                    ratios[o].empty() ? "-" : fmt(median(ratios[o])).c_str(), range.c_str());
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
