// kvgate_coordinator_bench: the coordinator's own overhead, request in to
// prefill job out (issue 4: under 1 ms at p99 at 500 requests/s against
// stub nodes).
//
//   kvgate_coordinator_bench [--rate R] [--seconds S] [--warmup S] [--http]
//       [--http-text] [--json] [--model GGUF] [--decode-nodes N]
//       [--prefill-nodes N] [--prompt-tokens N] [--max-tokens N]
//       [--connections N] [--http-threads N] [--log-file PATH] [--seed N]
//
// One process: a ClusterBackend (the real one: control listener on
// 127.0.0.1 port 0, scheduler, footprint predictor for the model's shapes
// under the dense policy, Prometheus metrics, log lines formatted as in
// production and written to --log-file) and stub nodes that register over
// the real control channel (TCP). Stub decode nodes answer Reserve with
// ReserveGrant at once and heartbeat 1 TiB free; stub prefill nodes, on
// PrefillJob, record its arrival time and have the decode stub of the job
// send Commit and one final TokenChunk (kLength, 4 tokens), so every request
// completes and frees its state. All stubs run on one io thread.
//
// Load is open-loop: Poisson arrivals at --rate for --warmup + --seconds;
// requests scheduled in the warm-up are not counted. Latencies are from the
// scheduled time, so a late driver or a busy coordinator shows up in them
// (no coordinated omission); the rows "from submit()" / "from write" take
// the driver's own lateness out. "PrefillJob" includes two loopback TCP
// hops of the stubs (Reserve out, ReserveGrant back) and the job's own hop.
//   direct phase: a driver thread calls Backend::submit at each scheduled
//     time with a GenerationRequest (the prompt as token ids).
//   --http phase (after the direct one): keep-alive HTTP/1.1 clients
//     (--connections, one io thread) POST /v1/completions to the real
//     HttpServer (auth disabled), the prompt as token ids or, --http-text,
//     as text, so parsing, validation and tokenization are included; a
//     response's id carries the request id, which matches it to its job.
// Progress goes to stderr; the table to stdout (--json: a JSON object on
// stdout, the table on stderr).
#include <prometheus/registry.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/buffers_iterator.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/control_channel.h"
#include "common/log.h"
#include "coordinator/cluster_backend.h"
#include "coordinator/http_server.h"
#include "engine/kv_policy_spec.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "engine/tokenizer.h"

using namespace kvgate;
using namespace kvgate::coordinator;
namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using control::NodeRole;

namespace {

constexpr const char* kToken = "bench-cluster-token";
constexpr const char* kModelName = "bench-model";

int64_t now_ns() {
  return Clock::now().time_since_epoch() / std::chrono::nanoseconds(1);
}
void progress(const std::string& m) {
  std::fprintf(stderr, "[coordinator-bench] %s\n", m.c_str());
}
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

struct Options {
  bool http = false, http_text = false, json = false;
  std::string model = "models/SmolLM2-135M-Instruct.Q4_1.gguf", log_file = "/dev/null";
  double rate = 500, seconds = 10, warmup = 1, decode_nodes = 1, prefill_nodes = 2,
         prompt_tokens = 512, max_tokens = 64, connections = 16, http_threads = 2, seed = 1;
};

// One request of a phase; times in steady-clock ns, 0 = not reached.
struct Slot {
  int64_t sched = 0;                 // set before the phase starts
  std::atomic<int64_t> start{0};     // submit() called / request written
  std::atomic<int64_t> done{0};      // on_done / response received
  std::atomic<uint64_t> request{0};  // the RequestId (HTTP: from the response)
  std::atomic<bool> ok{false};       // on_done / HTTP 200
};

// What one phase records. The stubs write job arrivals by request id
// (id - id_base); the driver and sinks write the slots.
struct Phase {
  Phase(size_t n, uint64_t base)
      : slots(n), job_at(n + 1024), reserve_at(n + 1024), id_base(base) {}
  std::vector<Slot> slots;
  std::vector<std::atomic<int64_t>> job_at, reserve_at;  // by request id - id_base
  const uint64_t id_base;
  std::atomic<int64_t> completed{0}, failed{0};
  std::mutex mu;
  std::map<std::string, int64_t> errors;  // first words of each failure, counted

  static void record(std::vector<std::atomic<int64_t>>& at, uint64_t id, uint64_t base, int64_t t) {
    if (id >= base && id - base < at.size()) at[id - base].store(t);
  }
  void record_job(uint64_t id, int64_t t) { record(job_at, id, id_base, t); }
  void record_reserve(uint64_t id, int64_t t) { record(reserve_at, id, id_base, t); }
  void finish(size_t i, bool ok, const std::string& error) {
    slots[i].ok.store(ok);
    slots[i].done.store(now_ns());
    (ok ? completed : failed).fetch_add(1);
    if (!ok) {
      std::lock_guard<std::mutex> lock(mu);
      ++errors[error.substr(0, 120)];
    }
  }
  int64_t time(const std::vector<std::atomic<int64_t>>& at, const Slot& s) const {
    uint64_t id = s.request.load();
    return id >= id_base && id - id_base < at.size() ? at[id - id_base].load() : 0;
  }
};

// Records the terminal call only: runs under the backend's lock.
class BenchSink final : public GenerationSink {
 public:
  BenchSink(Phase& p, size_t i) : phase_(p), i_(i) {}
  void on_started() override {}
  void on_tokens(std::string_view, int32_t) override {}
  void on_done(const GenerationResult&) override { phase_.finish(i_, true, ""); }
  void on_error(const Status& s) override { phase_.finish(i_, false, s.to_string()); }

 private:
  Phase& phase_;
  const size_t i_;
};

// Stub decode and prefill nodes on one io thread over the real control
// channel. Nodes are created before any connects (the io thread reads the
// list); each node's state is touched on the io thread only after connect.
class Stubs {
 public:
  Stubs(int decode, int prefill) : work_(asio::make_work_guard(io_)) {
    for (int i = 0; i < decode + prefill; ++i) {
      nodes_.push_back(std::make_unique<Node>(
          io_, i < decode ? NodeRole::kDecode : NodeRole::kPrefill, uint64_t(101 + i)));
    }
    thread_ = std::thread([this] { io_.run(); });
  }
  ~Stubs() {
    asio::post(io_, [this] {
      stopping_ = true;
      for (auto& n : nodes_) {
        n->timer.cancel();
        if (n->conn) n->conn->close(Status(StatusCode::kCancelled, "bench ends"));
      }
    });
    work_.reset();
    thread_.join();  // returns once the connections have closed
  }
  void set_phase(Phase* p) { phase_.store(p); }

  Status connect(const HostPort& at) {
    for (auto& n : nodes_) {
      control::Hello h;
      h.role = n->role;
      h.node_id = NodeId(n->id);
      h.node_name = std::string(n->role == NodeRole::kDecode ? "stub-decode-" : "stub-prefill-") +
                    std::to_string(n->id);
      h.model_name = kModelName;
      h.control_address = "127.0.0.1:" + std::to_string(9000 + n->id);
      h.transport_name = "loopback";
      h.transport_address = {std::byte(n->id)};
      control::ChannelOptions co;
      co.cluster_token = kToken;
      co.close_timeout = std::chrono::milliseconds(500);
      control::ConnectionHandlers hs;
      Node* node = n.get();
      hs.on_message = [this, node](const control::ConnectionPtr&, control::Message m) {
        on_message(*node, m);
      };
      hs.on_closed = [](const control::ConnectionPtr&, const Status&) {};
      // Shared: the callback may outlive this call if connecting hangs.
      auto result = std::make_shared<std::promise<Status>>();
      auto future = result->get_future();
      control::connect_control(
          io_, at, h, co, hs,
          [this, node, result](Result<control::ConnectionPtr> c, const control::HelloAck& ack) {
            if (c.ok()) {
              node->conn = *c;
              node->interval = ack.heartbeat_interval;
              heartbeat(*node);
            }
            result->set_value(c.status());
          });
      if (future.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
        return Status(StatusCode::kDeadlineExceeded, "stub node did not connect in 10 s");
      }
      if (Status s = future.get(); !s.ok()) return s;
    }
    return Status();
  }

 private:
  struct Node {
    Node(asio::io_context& io, NodeRole r, uint64_t i) : role(r), id(i), timer(io) {}
    const NodeRole role;
    const uint64_t id;
    control::ConnectionPtr conn;
    asio::steady_timer timer;
    std::chrono::milliseconds interval{1000};
    uint64_t sequence = 0, next_lease = 1;
  };

  void heartbeat(Node& n) {
    if (stopping_) return;  // a tick already queued when the timer was cancelled
    control::Heartbeat hb;
    hb.node_id = NodeId(n.id);
    hb.sequence = ++n.sequence;
    if (n.role == NodeRole::kDecode) hb.pool_free_bytes = uint64_t(1) << 40;
    n.conn->send(hb);
    n.timer.expires_after(n.interval);
    n.timer.async_wait([this, &n](const boost::system::error_code& ec) {
      if (!ec) heartbeat(n);
    });
  }

  void on_message(Node& n, const control::Message& m) {
    if (const auto* r = std::get_if<control::Reserve>(&m)) {
      if (Phase* p = phase_.load()) p->record_reserve(r->request_id.value(), now_ns());
      n.conn->send(control::ReserveGrant{r->request_id,
                                         LeaseId(n.next_lease++),
                                         r->size_bytes,
                                         r->lease_ttl,
                                         {std::byte{1}, std::byte{2}}});
    } else if (const auto* job = std::get_if<control::PrefillJob>(&m)) {
      if (Phase* p = phase_.load()) p->record_job(job->request_id.value(), now_ns());
      for (auto& d : nodes_) {
        if (NodeId(d->id) != job->decode_node || !d->conn) continue;
        d->conn->send(control::Commit{job->request_id, job->lease_id, job->granted_bytes, 1.0});
        const uint32_t prompt = uint32_t(job->prompt_token_ids.size());
        d->conn->send(control::TokenChunk{job->request_id,
                                          0,
                                          {1000, 1001, 1002, 1003},
                                          " one two three four",
                                          control::FinishReason::kLength,
                                          {prompt, 4}});
      }
    }
  }

  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::vector<std::unique_ptr<Node>> nodes_;
  std::atomic<Phase*> phase_{nullptr};
  bool stopping_ = false;  // io thread
  std::thread thread_;
};

// Poisson arrival offsets (ns from the start) over `seconds`.
std::vector<int64_t> poisson_schedule(double rate, double seconds, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::exponential_distribution<double> gap(rate);
  std::vector<int64_t> out;
  for (double t = gap(rng); t < seconds; t += gap(rng)) out.push_back(int64_t(t * 1e9));
  return out;
}

// Waits for every request to end (or `deadline`), printing progress.
void wait_phase(const char* name, Phase& p, const std::atomic<size_t>& started, int64_t t0,
                int64_t last_sched) {
  const int64_t deadline = last_sched + int64_t(30e9);
  int64_t next_print = t0 + int64_t(1e9);
  while (size_t(p.completed + p.failed) < p.slots.size() && now_ns() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (now_ns() >= next_print) {
      next_print += int64_t(1e9);
      progress(std::string(name) + ": " +
               std::to_string(std::max<int64_t>(0, now_ns() - t0) / 1000000000) + " s, " +
               std::to_string(started.load()) + "/" + std::to_string(p.slots.size()) + " sent, " +
               std::to_string(p.completed.load()) + " completed, " +
               std::to_string(p.failed.load()) + " failed");
    }
  }
}

// Direct phase: a driver thread calls Backend::submit at the scheduled times.
void run_direct(Backend& backend, Phase& p, const std::vector<int32_t>& prompt, int max_tokens) {
  std::atomic<size_t> started{0};
  std::thread driver([&] {
    prctl(PR_SET_TIMERSLACK, 1000UL);  // wake within ~1 us of the schedule, not the default 50 us
    for (size_t i = 0; i < p.slots.size(); ++i) {
      GenerationRequest r;  // built before the wait: not part of the coordinator's time
      r.id = RequestId(p.id_base + i);
      r.model = kModelName;
      r.prompt_tokens = prompt;
      r.max_tokens = max_tokens;
      auto sink = std::make_shared<BenchSink>(p, i);
      std::this_thread::sleep_until(Clock::time_point(std::chrono::nanoseconds(p.slots[i].sched)));
      p.slots[i].request.store(r.id.value());
      p.slots[i].start.store(now_ns());
      if (Status s = backend.submit(std::move(r), sink); !s.ok())
        p.finish(i, false, "submit: " + s.to_string());
      started.fetch_add(1);
    }
  });
  wait_phase("direct", p, started, p.slots.front().sched, p.slots.back().sched);
  driver.join();
}

// HTTP phase: keep-alive clients on one io thread; a timer dispatches each
// request at its scheduled time to an idle connection (none idle: it waits
// for the next free one, counted in `waited`).
class HttpLoad {
 public:
  HttpLoad(Phase& p, std::string request) : p_(p), request_(std::move(request)), timer_(io_) {}

  Status run(uint16_t port, int connections) {
    asio::ip::tcp::endpoint at(asio::ip::make_address("127.0.0.1"), port);
    for (int i = 0; i < connections; ++i) {
      conns_.push_back(std::make_unique<Conn>(io_));
      boost::system::error_code ec;
      conns_.back()->sock.connect(at, ec);
      if (ec) return Status(StatusCode::kUnavailable, "http connect: " + ec.message());
      conns_.back()->sock.set_option(asio::ip::tcp::no_delay(true));
      idle_.push_back(conns_.back().get());
    }
    asio::post(io_, [this] { tick(); });
    std::thread io_thread([this] { io_.run(); });
    wait_phase("http", p_, started_, p_.slots.front().sched, p_.slots.back().sched);
    io_.stop();
    io_thread.join();
    return Status();
  }
  size_t waited() const { return waited_; }

 private:
  struct Conn {
    explicit Conn(asio::io_context& io) : sock(io) {}
    asio::ip::tcp::socket sock;
    asio::streambuf buf;
    size_t slot = 0;
  };

  void tick() {
    const int64_t now = now_ns();
    while (next_ < p_.slots.size() && p_.slots[next_].sched <= now) dispatch(next_++);
    if (next_ == p_.slots.size()) return;
    timer_.expires_at(Clock::time_point(std::chrono::nanoseconds(p_.slots[next_].sched)));
    timer_.async_wait([this](const boost::system::error_code& ec) {
      if (!ec) tick();
    });
  }
  void dispatch(size_t i) {
    if (idle_.empty()) {
      backlog_.push_back(i);
      ++waited_;
      return;
    }
    Conn* c = idle_.back();
    idle_.pop_back();
    send(*c, i);
  }
  void send(Conn& c, size_t i) {
    c.slot = i;
    p_.slots[i].start.store(now_ns());
    started_.fetch_add(1);
    asio::async_write(
        c.sock, asio::buffer(request_), [this, &c](boost::system::error_code ec, size_t) {
          if (ec) return p_.finish(c.slot, false, "http write: " + ec.message());
          asio::async_read_until(
              c.sock, c.buf, "\r\n\r\n", [this, &c](boost::system::error_code ec, size_t n) {
                if (ec) return p_.finish(c.slot, false, "http read: " + ec.message());
                std::string head(asio::buffers_begin(c.buf.data()),
                                 asio::buffers_begin(c.buf.data()) + n);
                c.buf.consume(n);
                std::transform(head.begin(), head.end(), head.begin(), ::tolower);
                const int status = head.size() > 12 ? std::atoi(head.c_str() + 9) : 0;
                const size_t at = head.find("content-length:");
                if (at == std::string::npos)
                  return p_.finish(c.slot, false, "http: no content-length");
                const size_t len = std::strtoull(head.c_str() + at + 15, nullptr, 10);
                const size_t need = len > c.buf.size() ? len - c.buf.size() : 0;
                asio::async_read(c.sock, c.buf, asio::transfer_exactly(need),
                                 [this, &c, status, len](boost::system::error_code ec, size_t) {
                                   if (ec)
                                     return p_.finish(c.slot, false, "http read: " + ec.message());
                                   std::string body(asio::buffers_begin(c.buf.data()),
                                                    asio::buffers_begin(c.buf.data()) + len);
                                   c.buf.consume(len);
                                   answered(c, status, body);
                                 });
              });
        });
  }
  void answered(Conn& c, int status, const std::string& body) {
    // "id":"cmpl-<16 hex salt><8 hex request id>" (openai_format.cpp).
    const size_t at = body.find("\"id\":\"cmpl-");
    if (status == 200 && at != std::string::npos && body.size() >= at + 11 + 24) {
      p_.slots[c.slot].request.store(
          std::strtoull(body.substr(at + 11 + 16, 8).c_str(), nullptr, 16));
      p_.finish(c.slot, true, "");
    } else {
      p_.finish(c.slot, false, "HTTP " + std::to_string(status) + ": " + body.substr(0, 100));
    }
    if (backlog_.empty()) {
      idle_.push_back(&c);
    } else {
      const size_t next = backlog_.front();
      backlog_.pop_front();
      send(c, next);
    }
  }

  Phase& p_;
  const std::string request_;
  asio::io_context io_;
  asio::steady_timer timer_;
  std::vector<std::unique_ptr<Conn>> conns_;
  std::vector<Conn*> idle_;     // io thread
  std::deque<size_t> backlog_;  // io thread
  size_t next_ = 0, waited_ = 0;
  std::atomic<size_t> started_{0};
};

struct Row {
  std::string name;
  std::vector<double> us;
};

nlohmann::json summarize(const char* mode, Phase& p, const Options& o, int64_t warm_from,
                         double cpu_s, double wall_s, size_t waited, FILE* table) {
  std::vector<Row> rows;
  const bool http = std::string(mode) == "http";
  rows.push_back({"scheduled -> PrefillJob at stub", {}});
  rows.push_back({http ? "request written -> PrefillJob" : "submit() -> PrefillJob", {}});
  rows.push_back(
      {http ? "  written -> Reserve at decode stub" : "  submit() -> Reserve at decode stub", {}});
  rows.push_back({"  Reserve at stub -> PrefillJob", {}});
  rows.push_back({http ? "scheduled -> HTTP response" : "scheduled -> on_done", {}});
  rows.push_back(
      {http ? "client lag (scheduled -> written)" : "driver lag (scheduled -> submit())", {}});
  int64_t measured = 0, completed = 0, failed = 0, unmatched = 0, first_start = INT64_MAX,
          last_done = 0;
  for (const Slot& s : p.slots) {
    if (s.sched < warm_from) continue;
    ++measured;
    const int64_t start = s.start.load(), done = s.done.load();
    const int64_t job = p.time(p.job_at, s), reserve = p.time(p.reserve_at, s);
    if (done == 0) continue;  // pending at the deadline
    if (!s.ok.load()) {
      ++failed;
      continue;
    }
    ++completed;
    if (job == 0 || reserve == 0) {  // completed, but its messages were not matched to it
      ++unmatched;
      continue;
    }
    first_start = std::min(first_start, start);
    last_done = std::max(last_done, done);
    const int64_t d[6] = {job - s.sched, job - start,    reserve - start,
                          job - reserve, done - s.sched, start - s.sched};
    for (int row = 0; row < 6; ++row) rows[row].us.push_back(d[row] / 1e3);
  }
  const double achieved = completed > 1 ? completed / ((last_done - first_start) / 1e9) : 0;
  const int64_t pending = measured - completed - failed;
  nlohmann::json j = {{"mode", mode},
                      {"offered_rate", o.rate},
                      {"seconds", o.seconds},
                      {"measured", measured},
                      {"completed", completed},
                      {"failed", failed},
                      {"pending", pending},
                      {"unmatched", unmatched},
                      {"achieved_rate", achieved},
                      {"process_cpu_cores", cpu_s / wall_s}};
  if (http) j["waited_for_connection"] = waited;
  std::fprintf(
      table,
      "\n%s: %lld measured (after %.1f s warm-up): %lld completed, %lld failed, %lld pending, "
      "%lld unmatched; offered %.0f/s (Poisson draw %.1f/s), achieved %.1f/s; process CPU %.2f "
      "cores%s\n",
      mode, (long long)measured, o.warmup, (long long)completed, (long long)failed,
      (long long)pending, (long long)unmatched, o.rate, measured / o.seconds, achieved,
      cpu_s / wall_s,
      http ? (", " + std::to_string(waited) + " waited for a free connection").c_str() : "");
  std::fprintf(table, "  %-36s %9s %9s %9s %9s %9s  (microseconds)\n", "", "p50", "p90", "p99",
               "p99.9", "max");
  for (Row& r : rows) {
    std::sort(r.us.begin(), r.us.end());
    auto q = [&](double f) {
      return r.us.empty() ? 0.0 : r.us[std::min(r.us.size() - 1, size_t(f * r.us.size()))];
    };
    std::fprintf(table, "  %-36s %9.1f %9.1f %9.1f %9.1f %9.1f\n", r.name.c_str(), q(0.5), q(0.9),
                 q(0.99), q(0.999), r.us.empty() ? 0.0 : r.us.back());
    j["latency_us"][r.name] = {{"p50", q(0.5)},
                               {"p90", q(0.9)},
                               {"p99", q(0.99)},
                               {"p99.9", q(0.999)},
                               {"max", r.us.empty() ? 0.0 : r.us.back()}};
  }
  std::lock_guard<std::mutex> lock(p.mu);
  for (const auto& [e, n] : p.errors)
    std::fprintf(table, "  error x%lld: %s\n", (long long)n, e.c_str());
  j["errors"] = p.errors;
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  const std::map<std::string, std::pair<double*, double>> numbers = {
      // option: value, minimum
      {"--rate", {&o.rate, 1}},
      {"--seconds", {&o.seconds, 0.1}},
      {"--warmup", {&o.warmup, 0}},
      {"--decode-nodes", {&o.decode_nodes, 1}},
      {"--prefill-nodes", {&o.prefill_nodes, 1}},
      {"--prompt-tokens", {&o.prompt_tokens, 1}},
      {"--max-tokens", {&o.max_tokens, 4}},
      {"--connections", {&o.connections, 1}},
      {"--http-threads", {&o.http_threads, 1}},
      {"--seed", {&o.seed, 0}}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (auto n = numbers.find(a);
        n != numbers.end() && has_value && std::strtod(argv[i + 1], nullptr) >= n->second.second) {
      *n->second.first = std::strtod(argv[++i], nullptr);
    } else if (a == "--http" || a == "--http-text" || a == "--json") {
      (a == "--json" ? o.json : o.http) = true;
      o.http_text = o.http_text || a == "--http-text";
    } else if ((a == "--model" || a == "--log-file") && has_value) {
      (a == "--model" ? o.model : o.log_file) = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--http | --http-text] [--json] [--model GGUF] [--log-file F]",
                   argv[0]);
      for (const auto& [name, v] : numbers)
        std::fprintf(stderr, " [%s X>=%g]", name.c_str(), v.second);
      std::fprintf(stderr, "\n");
      return 2;
    }
  }
  FILE* table = o.json ? stderr : stdout;

  // Model shapes (and tokenizer for --http-text) from the GGUF; without it,
  // SmolLM2-135M's shapes by hand (the direct phase needs nothing else).
  engine::LlamaConfig shapes{"llama", 30, 576, 1536, 9, 3, 64, 49152, 8192};
  std::shared_ptr<const engine::Tokenizer> tokenizer;
  std::unique_ptr<engine::LlamaModel> model;
  if (std::filesystem::exists(o.model)) {
    auto m = engine::LlamaModel::load(o.model);
    if (!m.ok())
      return std::fprintf(stderr, "%s: %s\n", o.model.c_str(), m.status().to_string().c_str()), 1;
    model = std::move(*m);
    shapes = model->config();
    auto spec = engine::tokenizer_spec_from_gguf(model->gguf());
    auto tok = spec.ok() ? engine::Tokenizer::create(std::move(*spec))
                         : Result<engine::Tokenizer>(spec.status());
    if (tok.ok()) tokenizer = std::make_shared<const engine::Tokenizer>(std::move(*tok));
  }
  if (o.http && !tokenizer) {
    std::fprintf(stderr, "--http needs the model's tokenizer: %s not found or unreadable\n",
                 o.model.c_str());
    return 1;
  }
  // The prompt: English text (its real token ids when the tokenizer is here).
  std::string text;
  std::vector<int32_t> prompt;
  while (int(prompt.size()) < o.prompt_tokens) {
    text +=
        "The coordinator places each request on a decode node by its predicted KV bytes, then "
        "sends the prefill job to the prefill node with the shortest queue. ";
    prompt = tokenizer ? tokenizer->encode(text, true, false)
                       : std::vector<int32_t>(prompt.size() + 25, 1234);
  }
  prompt.resize(size_t(o.prompt_tokens));
  if (tokenizer) text = tokenizer->decode(prompt);

  engine::KvPolicyConfig dense;
  auto plan = engine::plan_kv_policy(shapes, dense);
  auto predictor = plan.ok() ? FootprintPredictor::create(**plan, 16)
                             : Result<FootprintPredictor>(plan.status());
  if (!predictor.ok())
    return std::fprintf(stderr, "predictor: %s\n", predictor.status().to_string().c_str()), 1;
  ClusterBackendOptions bo;
  bo.scheduler.model_name = kModelName;
  bo.scheduler.context_tokens = shapes.n_ctx_train;
  bo.scheduler.kv_policy = engine::kv_policy_spec(dense);
  bo.scheduler.request_timeout = std::chrono::milliseconds(60000);
  bo.control_listen = HostPort{"127.0.0.1", 0};
  bo.channel.cluster_token = kToken;
  bo.channel.close_timeout = std::chrono::milliseconds(500);
  FILE* log_out = std::fopen(o.log_file.c_str(), "a");
  if (!log_out) return std::fprintf(stderr, "cannot open --log-file %s\n", o.log_file.c_str()), 1;
  log::set_sink([log_out](std::string_view line) {
    std::fprintf(log_out, "%.*s\n", int(line.size()), line.data());
  });
  auto registry = std::make_shared<prometheus::Registry>();
  // Outlive the backend and the stubs: late sinks and messages still find them.
  std::vector<std::unique_ptr<Phase>> phases;
  auto backend = ClusterBackend::start(bo, std::move(*predictor), registry);  // log: log::info
  if (!backend.ok())
    return std::fprintf(stderr, "backend: %s\n", backend.status().to_string().c_str()), 1;
  Stubs stubs(int(o.decode_nodes), int(o.prefill_nodes));
  if (Status s = stubs.connect((*backend)->control_address()); !s.ok()) {
    return std::fprintf(stderr, "stubs: %s\n", s.to_string().c_str()), 1;
  }
  for (int i = 0; i < 500 && !(*backend)->health().ready; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (!(*backend)->health().ready) return std::fprintf(stderr, "cluster not ready\n"), 1;
  progress("model " + (model ? o.model : std::string("absent: SmolLM2-135M shapes by hand")) +
           "; " + std::to_string(int(o.decode_nodes)) + " decode + " +
           std::to_string(int(o.prefill_nodes)) + " prefill stubs on " +
           (*backend)->control_address().to_string() + "; prompt " + std::to_string(prompt.size()) +
           " tokens, max_tokens " + std::to_string(int(o.max_tokens)));
  const unsigned cores = std::thread::hardware_concurrency();
  std::fprintf(
      table,
      "NOTE: coordinator (io thread%s), stub nodes (1 io thread) and the load driver share this "
      "machine's %u cores; the figures include their contention.\n",
      o.http ? ", HTTP threads" : "", cores);

  const auto offsets = poisson_schedule(o.rate, o.warmup + o.seconds, uint64_t(o.seed));
  nlohmann::json out = {{"cores", cores},
                        {"prompt_tokens", prompt.size()},
                        {"max_tokens", int(o.max_tokens)},
                        {"decode_nodes", int(o.decode_nodes)},
                        {"prefill_nodes", int(o.prefill_nodes)},
                        {"phases", nlohmann::json::array()}};
  for (const char* mode : {"direct", "http"}) {
    const bool http = std::string(mode) == "http";
    if (http && !o.http) break;
    phases.push_back(std::make_unique<Phase>(offsets.size(), http ? 1 : (uint64_t(1) << 40)));
    Phase& p = *phases.back();
    const int64_t t0 = now_ns() + int64_t(200e6);
    for (size_t i = 0; i < offsets.size(); ++i) p.slots[i].sched = t0 + offsets[i];
    stubs.set_phase(&p);
    progress(std::string(mode) + ": " + std::to_string(offsets.size()) + " requests over " +
             std::to_string(o.warmup + o.seconds) + " s");
    const double cpu0 = cpu_seconds();
    const int64_t wall0 = now_ns();
    size_t waited = 0;
    if (!http) {
      run_direct(**backend, p, prompt, int(o.max_tokens));
    } else {
      HttpServerOptions so;
      so.config.listen = HostPort{"127.0.0.1", 0};
      so.config.auth = AuthMode::kDisabled;
      so.config.http_threads = int64_t(o.http_threads);
      so.models.push_back(ServedModel{kModelName, shapes.n_ctx_train, tokenizer, nullptr, 0});
      auto server = HttpServer::start(std::move(so), **backend, registry);
      if (!server.ok())
        return std::fprintf(stderr, "http: %s\n", server.status().to_string().c_str()), 1;
      nlohmann::json body = {
          {"model", kModelName}, {"max_tokens", int(o.max_tokens)}, {"stream", false}};
      if (o.http_text)
        body["prompt"] = text;
      else
        body["prompt"] = prompt;
      const std::string b = body.dump();
      HttpLoad load(
          p,
          "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
          "Content-Length: " +
              std::to_string(b.size()) + "\r\n\r\n" + b);
      if (Status s = load.run((*server)->port(), int(o.connections)); !s.ok()) {
        return std::fprintf(stderr, "%s\n", s.to_string().c_str()), 1;
      }
      waited = load.waited();
      (*server)->stop();
    }
    stubs.set_phase(nullptr);
    auto j = summarize(mode, p, o, t0 + int64_t(o.warmup * 1e9), cpu_seconds() - cpu0,
                       (now_ns() - wall0) / 1e9, waited, table);
    if (http) j["prompt_as"] = o.http_text ? "text" : "token ids";
    out["phases"].push_back(j);
  }
  if (o.json) std::printf("%s\n", out.dump(2).c_str());
  (*backend)->shutdown();
  log::set_sink({});
  std::fclose(log_out);
  return 0;
}
