// kvgate bench prefill: what the prefill node's batch and its per-block
// shipping buy, measured against a peer run in the same invocation.
//
//   kvgate bench prefill [--prompts 8] [--prompt-tokens 256] [--batch 1,2,4,8]
//       [--overlap-tokens 1024] [--repeat 2] [--policy NAME] [--transport ucx|loopback]
//       [--tls tcp|shm] [--threads N] [--json]
//
// 1. Batching. --prompts prompts of --prompt-tokens tokens each (each a
//    different slice of the real English text in eval-data/eval, the text
//    `kvgate bench capacity` uses) go through engine::prefill_compressed_batch
//    — the prefill node's one layer-major pass — in groups of each --batch
//    size (the last group smaller when the size does not divide --prompts),
//    each job with a fresh page pool sized by compressed_pool_bytes, as the
//    node does. Best of --repeat runs; prompt tokens/s and the ratio to batch
//    size 1 (the peer). Every job's result — the wire image (descriptor and
//    the bytes of its pages, CRC32C), the cache's bytes() and the first
//    token (argmax of the last logits) — must be identical for every batch
//    size and repeat: batching must not change results, and the command
//    fails naming the prompt if it does.
// 2. Overlap. One prompt of --overlap-tokens shipped over a real transport
//    (transport::create_transport: ucx over lo with --tls, or loopback) to a
//    receiver in this process, whose region is a PagePool arena and which
//    progresses on its own thread (polling every --receiver-poll-us, so it
//    does not take a core from the prefill). Two modes, --repeat runs
//    each (the best of each figure on its own):
//      overlapped: each wire segment staged into its own buffer and sent in
//        on_segment, as soon as its block's last layer is computed (the
//        prefill node today, prefill/prefill_engine.cpp), the sender
//        progressed between layers;
//      after: the whole image built first, then staged and sent (the
//        behaviour before the batch).
//    For each: the prefill seconds (prefill_compressed_batch's wall time)
//    and the "exposed transfer": from prefill_compressed_batch returning to
//    the receiver's OK event (CRC32C of every segment verified) — the part
//    of the transfer a request waits for after its prefill. The landed
//    bytes are compared with the sender's image pages.
//
// Page pools are zeroed before each prefill (outside the timing): a page
// the cache fills only in part keeps whatever the arena held, and the
// identity check compares whole pages.
//
// Prompts are slices of the text's tokens without BOS (the same for every
// batch size and mode, which is all the comparison needs).
//
// Output: a table, or with --json one object: the settings; "batching":
// {prompts, prompt_tokens, identical, rows: [{batch, seconds, tokens_per_s,
// vs_batch_1}]}; "overlap": {prompt_tokens, transport, tls, ucx_op,
// image_bytes, segments, identical, overlapped and after: {prefill_seconds,
// exposed_transfer_seconds, total_seconds}, exposed_vs_after,
// total_vs_after}. Progress goes to stderr. Numbers depend on the
// machine's load (the output carries the load average at the start):
// ratios, not absolute figures, are what compare between runs.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli/args.h"
#include "cli/bench_common.h"
#include "cli/commands.h"
#include "cli/model_loading.h"
#include "common/crc32c.h"
#include "engine/kv_policy_spec.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "kvstore/page_pool.h"
#include "kvstore/wire_image.h"
#include "transport/transport.h"

#ifndef KVGATE_SOURCE_DIR
#define KVGATE_SOURCE_DIR "."
#endif

namespace kvgate::cli {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using Plan = std::shared_ptr<const engine::PolicyPlan>;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

void progress(const std::string& msg) {
  std::fprintf(stderr, "[kvgate] bench prefill: %s\n", msg.c_str());
}

std::string load_average() {
  char load[128] = "?";
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (!std::fgets(load, sizeof load, f)) std::strcpy(load, "?");
    std::fclose(f);
  }
  std::string s(load);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

Result<KvPolicyChoice> policy_choice(const std::string& name) {
  auto c = policy_choice_by_name(name);
  if (!c.ok()) return invalid_argument("--policy: " + c.status().message());
  return c;
}

Result<std::vector<int64_t>> parse_sizes(const std::string& list) {
  std::vector<int64_t> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || end == nullptr || *end != '\0' || v < 1 || v > 1024) {
      return invalid_argument("--batch: '" + item + "' is not a batch size (1..1024)");
    }
    out.push_back(v);
  }
  if (out.empty()) return invalid_argument("--batch: no batch sizes");
  return out;
}

// A fresh pool for one job of `n` tokens, zeroed (see the top of the file).
Result<std::unique_ptr<kvstore::PagePool>> fresh_pool(const engine::PolicyPlan& plan, int64_t n,
                                                      int64_t page_bytes) {
  KVGATE_ASSIGN_OR_RETURN(int64_t bytes, engine::compressed_pool_bytes(plan.layout, n, page_bytes));
  KVGATE_ASSIGN_OR_RETURN(auto pool, kvstore::PagePool::create(page_bytes, bytes));
  std::memset(pool->arena(), 0, static_cast<size_t>(pool->capacity_bytes()));
  return pool;
}

// What must not change with the batch: one job's result.
struct Fingerprint {
  int64_t kv_bytes = 0;
  int64_t image_bytes = 0;
  uint32_t image_crc = 0;  // descriptor, then every page in wire order
  int32_t first_token = -1;
  bool operator==(const Fingerprint&) const = default;
};

Result<Fingerprint> fingerprint(const kvstore::CompressedKvCache& cache,
                                const kvstore::PagePool& pool, std::span<const float> logits) {
  KVGATE_ASSIGN_OR_RETURN(kvstore::WireImage image, kvstore::export_wire_image(cache));
  Fingerprint f;
  f.kv_bytes = cache.bytes();
  f.image_bytes = image.total_bytes();
  f.image_crc = crc32c(image.descriptor.data(), image.descriptor.size());
  for (kvstore::PageId p : image.pages) {
    f.image_crc = crc32c(pool.data(p), static_cast<size_t>(image.page_bytes), f.image_crc);
  }
  f.first_token = engine::argmax(logits);
  return f;
}

std::string describe(const Fingerprint& f) {
  return "kv " + std::to_string(f.kv_bytes) + " bytes, image " + std::to_string(f.image_bytes) +
         " bytes crc " + std::to_string(f.image_crc) + ", first token " +
         std::to_string(f.first_token);
}

// ---- 1. batching

struct BatchRow {
  int64_t batch = 0;
  double seconds = 0;  // best run: every prompt once
  double tokens_per_s = 0;
};

// Runs every prompt once in groups of `batch`; the prefill seconds summed.
// Each job's fingerprint is checked against `expected` (filled on the first
// call).
Result<double> batch_run(engine::CpuForward& forward, const Plan& plan,
                         const std::vector<std::vector<int32_t>>& prompts, int64_t batch,
                         int64_t page_bytes, std::vector<Fingerprint>& expected,
                         const std::string& what) {
  const size_t n_vocab = static_cast<size_t>(forward.model().config().n_vocab);
  double total = 0;
  for (size_t first = 0; first < prompts.size(); first += static_cast<size_t>(batch)) {
    const size_t end = std::min(prompts.size(), first + static_cast<size_t>(batch));
    std::vector<std::unique_ptr<kvstore::PagePool>> pools;
    std::vector<std::vector<float>> logits(end - first, std::vector<float>(n_vocab));
    std::vector<engine::CompressedPrefillJob> jobs;
    for (size_t i = first; i < end; ++i) {
      KVGATE_ASSIGN_OR_RETURN(
          auto pool, fresh_pool(*plan, static_cast<int64_t>(prompts[i].size()), page_bytes));
      pools.push_back(std::move(pool));
      jobs.push_back(engine::CompressedPrefillJob{
          plan, prompts[i], pools.back().get(), logits[i - first], {}});
    }
    const auto t0 = Clock::now();
    KVGATE_ASSIGN_OR_RETURN(auto results, engine::prefill_compressed_batch(forward, jobs));
    total += seconds_between(t0, Clock::now());
    for (size_t i = first; i < end; ++i) {
      auto& r = results[i - first];
      if (!r.ok())
        return Status(r.status().code(),
                      "prompt " + std::to_string(i) + ": " + r.status().message());
      KVGATE_ASSIGN_OR_RETURN(Fingerprint f,
                              fingerprint(r->cache, *pools[i - first], logits[i - first]));
      if (expected.size() <= i) {
        expected.resize(i + 1);
        expected[i] = f;
      } else if (!(expected[i] == f)) {
        return internal_error("batching changed the result of prompt " + std::to_string(i) + " (" +
                              what + "): " + describe(f) +
                              ", at batch size 1: " + describe(expected[i]));
      }
    }
    // Caches go before their pools.
    results.clear();
  }
  return total;
}

// ---- 2. overlap: the receiver, on its own thread

// Owns the receiving Transport on its thread; the main thread posts
// receives through it and waits for their outcome. Every member but the
// thread is guarded by mu_.
class Receiver {
 public:
  Receiver(const TransportConfig& config, kvstore::PagePool& region, std::chrono::microseconds poll)
      : config_(config), region_(region), poll_(poll) {
    thread_ = std::thread([this] { run(); });
  }
  ~Receiver() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    thread_.join();
  }

  // The receiver's address once its transport exists (blocks up to 30 s).
  Result<transport::Bytes> address() {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, std::chrono::seconds(30), [&] { return started_; })) {
      return Status(StatusCode::kDeadlineExceeded, "receiver: transport did not start in 30 s");
    }
    if (!init_.ok()) return init_;
    return address_;
  }

  // Posts a receive of transfer `id` over the whole region; returns the grant.
  Result<transport::Bytes> post(uint64_t id) {
    std::unique_lock lock(mu_);
    post_id_ = id;
    grant_.reset();
    if (!cv_.wait_for(lock, std::chrono::seconds(30), [&] { return grant_.has_value(); })) {
      return Status(StatusCode::kDeadlineExceeded, "receiver: no grant in 30 s");
    }
    return std::move(*grant_);
  }

  // The outcome of transfer `id` and when the receiver saw it, once there
  // is one (non-blocking).
  std::optional<std::pair<Status, Clock::time_point>> outcome(uint64_t id) {
    std::lock_guard lock(mu_);
    auto it = done_.find(id);
    if (it == done_.end()) return std::nullopt;
    return it->second;
  }

 private:
  void run() {
    transport::TransportOptions o;
    o.cluster_token = "bench";
    o.region = region_.arena();
    o.region_bytes = static_cast<size_t>(region_.capacity_bytes());
    auto t = transport::create_transport(config_, o);
    {
      std::lock_guard lock(mu_);
      started_ = true;
      if (!t.ok()) {
        init_ = Status(t.status().code(), "receiver: " + t.status().message());
      } else if (auto a = (*t)->address(); !a.ok()) {
        init_ = a.status();
      } else {
        address_ = std::move(*a);
      }
    }
    cv_.notify_all();
    if (!t.ok()) return;
    std::vector<transport::TransferEvent> events;
    while (true) {
      std::optional<uint64_t> to_post;
      {
        std::lock_guard lock(mu_);
        if (stop_) break;
        to_post.swap(post_id_);
      }
      if (to_post) {
        transport::ReceiveSpec spec{transport::TransferId(*to_post),
                                    {{0, static_cast<uint64_t>(region_.capacity_bytes())}},
                                    Clock::now() + std::chrono::seconds(600)};
        auto g = (*t)->post_receive(spec);
        {
          std::lock_guard lock(mu_);
          grant_ = g.ok() ? std::move(*g) : transport::Bytes{};
          if (!g.ok()) done_[*to_post] = {g.status(), Clock::now()};
        }
        cv_.notify_all();
      }
      events.clear();
      (*t)->progress(events);
      if (!events.empty()) {
        const auto now = Clock::now();
        std::lock_guard lock(mu_);
        for (const auto& e : events) {
          if (e.side == transport::TransferSide::kReceive) done_[e.id.value()] = {e.status, now};
        }
      }
      if (poll_.count() > 0) std::this_thread::sleep_for(poll_);
    }
    // The transport goes here, on its owner thread; the sender is gone by then.
  }

  const TransportConfig config_;
  kvstore::PagePool& region_;
  const std::chrono::microseconds poll_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool started_ = false;
  bool stop_ = false;
  Status init_;
  transport::Bytes address_;
  std::optional<uint64_t> post_id_;
  std::optional<transport::Bytes> grant_;
  std::map<uint64_t, std::pair<Status, Clock::time_point>> done_;
  std::thread thread_;  // last: starts after every member exists
};

// The sending side of one transfer: segments staged into buffers of their
// own and shipped in order (as PrefillEngine::stage_segment/ship_ready).
struct Shipment {
  transport::Transport* sender = nullptr;
  transport::PeerId peer;
  transport::TransferId id;
  transport::Bytes grant;
  std::vector<std::vector<std::byte>> staging;  // read by the transport until its event
  uint64_t staged_bytes = 0;
  bool begun = false;

  Status stage(std::span<const kvstore::PageId> pages, const kvstore::PagePool& pool) {
    if (pages.empty()) return Status();
    const auto page_bytes = static_cast<size_t>(pool.page_bytes());
    std::vector<std::byte> buf(pages.size() * page_bytes);
    for (size_t i = 0; i < pages.size(); ++i)
      std::memcpy(buf.data() + i * page_bytes, pool.data(pages[i]), page_bytes);
    if (!begun) {
      KVGATE_RETURN_IF_ERROR(
          sender->begin_send(peer, id, grant, Clock::now() + std::chrono::seconds(600)));
      begun = true;
    }
    KVGATE_RETURN_IF_ERROR(sender->send_segment(peer, id, static_cast<uint32_t>(staging.size()),
                                                buf.data(), buf.size(), staged_bytes));
    staged_bytes += buf.size();
    staging.push_back(std::move(buf));
    return Status();
  }
};

struct OverlapRun {
  double prefill_seconds = 0;
  double exposed_seconds = 0;
  // One run: prefill + exposed. Best of several: the best run's (each of
  // the other two figures is its own best, possibly from another run).
  double total_seconds = 0;
  int64_t image_bytes = 0;
  int64_t segments = 0;
  Fingerprint fp;
};

struct OverlapPair {
  std::unique_ptr<kvstore::PagePool> region;
  std::unique_ptr<Receiver> receiver;
  std::unique_ptr<transport::Transport> sender;
  transport::PeerId peer;
  uint64_t next_id = 1;
  // Staging of transfers that failed: kept until the sender is gone, since
  // the transport may still read them.
  std::vector<std::vector<std::vector<std::byte>>> abandoned;
};

// Progresses the sender until transfer `id` has both sides' events (the
// sender's: its buffers are free then); returns when the receiver saw its
// OK event.
Result<Clock::time_point> await_transfer(OverlapPair& pair, uint64_t id) {
  std::vector<transport::TransferEvent> events;
  std::optional<std::pair<Status, Clock::time_point>> received;
  bool sent = false;
  Status send_status;
  const auto give_up = Clock::now() + std::chrono::seconds(120);
  while (!received || !sent) {
    events.clear();
    pair.sender->progress(events);
    for (const auto& e : events) {
      if (e.side == transport::TransferSide::kSend && e.id == transport::TransferId(id)) {
        sent = true;
        send_status = e.status;
      }
    }
    if (!received) received = pair.receiver->outcome(id);
    if (Clock::now() > give_up) {
      return Status(StatusCode::kDeadlineExceeded, "transfer: no event in 120 s");
    }
  }
  if (!received->first.ok()) {
    return Status(received->first.code(), "transfer (receiver): " + received->first.message());
  }
  if (!send_status.ok())
    return Status(send_status.code(), "transfer (sender): " + send_status.message());
  return received->second;
}

// One small transfer, so that the connection's handshake and the
// transports' first-use costs fall outside the measured runs.
Status warm_up(OverlapPair& pair, int64_t page_bytes) {
  const uint64_t id = pair.next_id++;
  KVGATE_ASSIGN_OR_RETURN(transport::Bytes grant, pair.receiver->post(id));
  if (grant.empty()) return pair.receiver->outcome(id)->first;
  const transport::TransferId tid(id);
  std::vector<std::byte> page(static_cast<size_t>(page_bytes));
  KVGATE_RETURN_IF_ERROR(
      pair.sender->begin_send(pair.peer, tid, grant, Clock::now() + std::chrono::seconds(60)));
  Status s = pair.sender->send_segment(pair.peer, tid, 0, page.data(), page.size(), 0);
  if (s.ok()) s = pair.sender->finish(pair.peer, tid);
  if (!s.ok()) {
    (void)pair.sender->cancel_send(pair.peer, tid);
    pair.abandoned.push_back({std::move(page)});
    return s;
  }
  auto done = await_transfer(pair, id);
  if (!done.ok()) pair.abandoned.push_back({std::move(page)});
  return done.status();
}

// One prefill of `prompt` shipped to the receiver, overlapped or after.
Result<OverlapRun> overlap_run(engine::CpuForward& forward, const Plan& plan,
                               std::span<const int32_t> prompt, int64_t page_bytes,
                               OverlapPair& pair, bool overlapped) {
  std::vector<float> logits(static_cast<size_t>(forward.model().config().n_vocab));
  KVGATE_ASSIGN_OR_RETURN(auto pool,
                          fresh_pool(*plan, static_cast<int64_t>(prompt.size()), page_bytes));
  const uint64_t id = pair.next_id++;
  KVGATE_ASSIGN_OR_RETURN(transport::Bytes grant, pair.receiver->post(id));
  if (grant.empty()) return pair.receiver->outcome(id)->first;
  Shipment ship;
  ship.sender = pair.sender.get();
  ship.peer = pair.peer;
  ship.id = transport::TransferId(id);
  ship.grant = std::move(grant);
  std::vector<transport::TransferEvent> events;
  engine::CompressedPrefillJob job{plan, prompt, pool.get(), logits, {}};
  if (overlapped) {
    job.on_segment = [&](int64_t, const kvstore::WireSlotGroup&,
                         std::span<const kvstore::PageId> pages) {
      return ship.stage(pages, *pool);
    };
  }
  auto on_layer = [&](int64_t) {
    // As the prefill node between layers: move the transfer on. No event
    // can come before finish().
    events.clear();
    pair.sender->progress(events);
    return Status();
  };
  const auto t0 = Clock::now();
  auto results = engine::prefill_compressed_batch(forward, std::span(&job, 1), on_layer);
  const auto t_end = Clock::now();
  auto keep = [&](const Status& s) {
    if (ship.begun) {
      (void)pair.sender->cancel_send(pair.peer, ship.id);
      pair.abandoned.push_back(std::move(ship.staging));
    }
    return s;
  };
  if (!results.ok()) return keep(results.status());
  if (!(*results)[0].ok()) return keep((*results)[0].status());
  kvstore::CompressedKvCache& cache = (*results)[0]->cache;
  auto image = kvstore::export_wire_image(cache);
  if (!image.ok()) return keep(image.status());
  if (!overlapped) {
    for (const kvstore::WireSegment& seg : image->segments) {
      Status s = ship.stage(
          std::span(image->pages)
              .subspan(static_cast<size_t>(seg.first_page), static_cast<size_t>(seg.n_pages)),
          *pool);
      if (!s.ok()) return keep(s);
    }
  }
  if (ship.staged_bytes != static_cast<uint64_t>(image->total_bytes())) {
    return keep(internal_error("staged " + std::to_string(ship.staged_bytes) +
                               " bytes of an image of " + std::to_string(image->total_bytes())));
  }
  if (Status s = pair.sender->finish(pair.peer, ship.id); !s.ok()) return keep(s);
  auto received = await_transfer(pair, id);
  if (!received.ok()) {
    // A failure event from the sender means its buffers are free; a
    // timeout does not: keep them either way.
    return keep(received.status());
  }
  // The receiver's region now holds the image: compare it with the source.
  for (size_t i = 0; i < image->pages.size(); ++i) {
    if (std::memcmp(pair.region->arena() + i * static_cast<size_t>(page_bytes),
                    pool->data(image->pages[i]), static_cast<size_t>(page_bytes)) != 0) {
      return internal_error("transfer: landed page " + std::to_string(i) +
                            " differs from the sent one");
    }
  }
  OverlapRun out;
  out.prefill_seconds = seconds_between(t0, t_end);
  out.exposed_seconds = seconds_between(t_end, *received);
  out.total_seconds = out.prefill_seconds + out.exposed_seconds;
  out.image_bytes = image->total_bytes();
  out.segments = static_cast<int64_t>(image->segments.size());
  KVGATE_ASSIGN_OR_RETURN(out.fp, fingerprint(cache, *pool, logits));
  return out;
}

Result<TransportConfig> transport_config(const std::string& kind, const std::string& tls,
                                         const std::string& op) {
  TransportConfig c;
  if (kind == "loopback") {
    c.kind = TransportKind::kLoopback;
    return c;
  }
  if (kind != "ucx") return invalid_argument("--transport: '" + kind + "' (ucx or loopback)");
  c.kind = TransportKind::kUcx;
  c.ucx_net_devices = {"lo"};
  if (tls == "tcp") {
    c.ucx_tls = {"tcp"};
  } else if (tls == "shm") {
    c.ucx_tls = {"sm", "tcp"};
  } else {
    return invalid_argument("--tls: '" + tls + "' (tcp or shm)");
  }
  if (op == "auto")
    c.ucx_op = UcxOp::kAuto;
  else if (op == "am")
    c.ucx_op = UcxOp::kAm;
  else if (op == "tag")
    c.ucx_op = UcxOp::kTag;
  else if (op == "put")
    c.ucx_op = UcxOp::kPut;
  else
    return invalid_argument("--ucx-op: '" + op + "' (auto, am, tag or put)");
  return c;
}

json overlap_json(const OverlapRun& r) {
  return {{"prefill_seconds", r.prefill_seconds},
          {"exposed_transfer_seconds", r.exposed_seconds},
          {"total_seconds", r.total_seconds}};
}

}  // namespace

int run_bench_prefill(const std::vector<std::string>& args) {
  ArgParser p("kvgate bench prefill",
              "Speed of the prefill node's batched layer-major prefill (prompt tokens/s per batch\n"
              "size, as a ratio to batch size 1) and of shipping each block of layers while later\n"
              "layers compute (exposed transfer after the prefill, overlapped vs all after), in\n"
              "one run; checks that batching changes no result. See cli/bench_prefill.cpp.");
  p.add_option("model", "PATH", "GGUF model file", kDefaultModel);
  p.add_option("policy", "NAME",
               "KV policy (default: gate+pod when the model's gate side file exists, else dense)");
  p.add_option("prompts", "N", "prompts in the batching measurement", "8");
  p.add_option("prompt-tokens", "N", "tokens per prompt", "256");
  p.add_option("batch", "LIST", "batch sizes to compare (the first run is the 1's)", "1,2,4,8");
  p.add_option("overlap-tokens", "N", "prompt length of the overlap measurement (0 = skip it)",
               "1024");
  p.add_option("repeat", "N", "runs of each measurement (the best is kept)", "2");
  p.add_option("transport", "KIND", "ucx or loopback", "ucx");
  p.add_option("tls", "NAME", "UCX transports over lo: tcp, or shm (sm,tcp)", "tcp");
  p.add_option("ucx-op", "OP", "UCX data operation: auto, am, tag, put", "auto");
  p.add_option("receiver-poll-us", "N", "receiver thread: sleep between polls (0 = spin)", "100");
  p.add_option("threads", "N", "CPU threads for the prefill; 0 = all cores", "0");
  p.add_option("chunk-tokens", "N", "rows per forward step (prefill.chunk_tokens)", "512");
  p.add_option("page-tokens", "N", "tokens per KV page (decode.page_tokens)", "16");
  p.add_option("text-dir", "DIR", "prompt text (default: eval-data/eval)");
  p.add_flag("json", "print the figures as one JSON object");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto n_prompts = p.get_int("prompts", 1, 1024);
  auto prompt_tokens = p.get_int("prompt-tokens", 1, 1 << 20);
  auto overlap_tokens = p.get_int("overlap-tokens", 0, 1 << 20);
  auto repeat = p.get_int("repeat", 1, 100);
  auto poll_us = p.get_int("receiver-poll-us", 0, 1000000);
  auto threads = p.get_int("threads", 0, 1024);
  auto chunk = p.get_int("chunk-tokens", 1, 1 << 20);
  auto page_tokens = p.get_int("page-tokens", 1, 4096);
  auto batches = parse_sizes(p.get("batch"));
  auto tconf = transport_config(p.get("transport"), p.get("tls"), p.get("ucx-op"));
  std::optional<KvPolicyChoice> choice;
  Status policy_status;
  if (p.has("policy")) {
    auto c = policy_choice(p.get("policy"));
    if (c.ok()) choice = *c;
    policy_status = c.status();
  }
  for (const Status& s : {n_prompts.status(), prompt_tokens.status(), overlap_tokens.status(),
                          repeat.status(), poll_us.status(), threads.status(), chunk.status(),
                          page_tokens.status(), batches.status(), tconf.status(), policy_status}) {
    if (!s.ok()) {
      print_error(s.message());
      return 2;
    }
  }
  const std::string model_path = p.get("model");
  if (!choice) {
    choice = find_gate_file("", model_path).path.empty() ? KvPolicyChoice::kDense
                                                         : KvPolicyChoice::kGatePod;
  }
  const std::string load = load_average();
  progress("loading " + model_path + " (load average " + load + ")");
  auto loaded = load_model_and_tokenizer(model_path);
  if (!loaded.ok()) {
    print_error(loaded.status().message());
    return 1;
  }
  const engine::LlamaModel& model = *loaded->model;
  KvConfig kv;
  kv.policy = *choice;
  auto policy = engine::kv_policy_from_config(kv, model_path, model);
  if (!policy.ok()) {
    print_error(policy.status().message());
    return 1;
  }
  auto plan = engine::plan_kv_policy(model.config(), *policy);
  if (!plan.ok()) {
    print_error(plan.status().message());
    return 1;
  }
  const std::string policy_name(kv_policy_config_name(*choice));
  if (engine::policy_needs_stats((*plan)->config) &&
      std::any_of(batches->begin(), batches->end(), [](int64_t b) { return b > 1; })) {
    print_error("--policy " + policy_name +
                " ranks tokens by attention statistics and is never batched: use --batch 1");
    return 2;
  }
  const int64_t page_bytes = *page_tokens * model.config().head_dim * kvstore::kKvElementBytes;
  if (page_bytes % 64 != 0) {
    print_error("--page-tokens: " + std::to_string(*page_tokens) +
                " tokens are not whole 64-byte lines");
    return 2;
  }

  // Prompts: consecutive slices of the text's tokens.
  const int64_t need = std::max(*n_prompts * *prompt_tokens, *overlap_tokens);
  const std::string dir =
      p.has("text-dir") ? p.get("text-dir") : std::string(KVGATE_SOURCE_DIR) + "/eval-data/eval";
  const std::string text = read_text_files(dir, static_cast<size_t>(need) * 8 + 4096);
  const std::vector<int32_t> ids = loaded->tokenizer->encode(text, false, false);
  if (static_cast<int64_t>(ids.size()) < need) {
    print_error("the text in " + dir + " has " + std::to_string(ids.size()) + " tokens; " +
                std::to_string(need) + " are needed (scripts/fetch-eval-data.sh, or --text-dir)");
    return 1;
  }
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t i = 0; i < *n_prompts; ++i) {
    const auto at = ids.begin() + i * *prompt_tokens;
    prompts.emplace_back(at, at + *prompt_tokens);
  }

  engine::ForwardOptions fo;
  fo.n_threads = static_cast<int>(*threads);
  fo.max_batch_tokens = *chunk;
  engine::CpuForward forward(model, fo);

  // 1. Batching: batch size 1 first, the peer and the reference results.
  std::vector<int64_t> sizes = *batches;
  sizes.erase(std::remove(sizes.begin(), sizes.end(), int64_t{1}), sizes.end());
  sizes.insert(sizes.begin(), 1);
  std::vector<Fingerprint> expected;
  std::vector<BatchRow> rows;
  for (int64_t b : sizes) {
    BatchRow row{b, 1e300, 0};
    for (int64_t rep = 0; rep < *repeat; ++rep) {
      progress("batch " + std::to_string(b) + ", run " + std::to_string(rep + 1) + "/" +
               std::to_string(*repeat) + ": " + std::to_string(*n_prompts) + " prompts of " +
               std::to_string(*prompt_tokens) + " tokens");
      auto t = batch_run(forward, *plan, prompts, b, page_bytes, expected,
                         "batch size " + std::to_string(b) + ", run " + std::to_string(rep + 1));
      if (!t.ok()) {
        print_error(t.status().message());
        return 1;
      }
      row.seconds = std::min(row.seconds, *t);
      progress("  " + std::to_string(*t) + " s");
    }
    row.tokens_per_s = static_cast<double>(*n_prompts * *prompt_tokens) / row.seconds;
    rows.push_back(row);
  }

  // 2. Overlap.
  std::optional<OverlapRun> best[2];  // [0] overlapped, [1] after
  if (*overlap_tokens > 0) {
    const std::span<const int32_t> prompt(ids.data(), static_cast<size_t>(*overlap_tokens));
    OverlapPair pair;
    auto region = fresh_pool(**plan, *overlap_tokens, page_bytes);
    if (!region.ok()) {
      print_error(region.status().message());
      return 1;
    }
    pair.region = std::move(*region);
    pair.receiver =
        std::make_unique<Receiver>(*tconf, *pair.region, std::chrono::microseconds(*poll_us));
    Status setup = [&]() -> Status {
      KVGATE_ASSIGN_OR_RETURN(transport::Bytes address, pair.receiver->address());
      transport::TransportOptions so;
      so.cluster_token = "bench";
      KVGATE_ASSIGN_OR_RETURN(pair.sender, transport::create_transport(*tconf, so));
      KVGATE_ASSIGN_OR_RETURN(pair.peer, pair.sender->connect(address));
      return warm_up(pair, page_bytes);
    }();
    Status failed = setup;
    std::optional<Fingerprint> reference;
    for (int64_t rep = 0; failed.ok() && rep < *repeat; ++rep) {
      for (int mode = 0; failed.ok() && mode < 2; ++mode) {
        const char* name = mode == 0 ? "overlapped" : "after";
        progress(std::string("overlap: ") + name + ", run " + std::to_string(rep + 1) + "/" +
                 std::to_string(*repeat) + ": " + std::to_string(*overlap_tokens) +
                 " tokens over " + std::string(transport::transport_kind_name(tconf->kind)));
        auto r = overlap_run(forward, *plan, prompt, page_bytes, pair, mode == 0);
        if (!r.ok()) {
          failed = Status(r.status().code(),
                          std::string("overlap (") + name + "): " + r.status().message());
          break;
        }
        if (reference && !(*reference == r->fp)) {
          failed = internal_error(std::string("overlap (") + name +
                                  "): the result changed between runs: " + describe(r->fp) +
                                  " vs " + describe(*reference));
          break;
        }
        reference = r->fp;
        progress("  prefill " + std::to_string(r->prefill_seconds) + " s, exposed transfer " +
                 std::to_string(r->exposed_seconds * 1e3) + " ms");
        if (!best[mode]) {
          best[mode] = *r;
        } else {
          best[mode]->prefill_seconds = std::min(best[mode]->prefill_seconds, r->prefill_seconds);
          best[mode]->exposed_seconds = std::min(best[mode]->exposed_seconds, r->exposed_seconds);
          best[mode]->total_seconds = std::min(best[mode]->total_seconds, r->total_seconds);
        }
      }
    }
    // The sender goes first, while the receiver thread still progresses.
    pair.sender.reset();
    pair.receiver.reset();
    if (!failed.ok()) {
      print_error(failed.message());
      return 1;
    }
  }

  json j = {{"model", model_path},
            {"policy", policy_name},
            {"threads", forward.n_threads()},
            {"isa", engine::cpu::isa_name(forward.options().isa)},
            {"chunk_tokens", *chunk},
            {"page_tokens", *page_tokens},
            {"repeat", *repeat},
            {"load_average", load}};
  j["batching"] = {{"prompts", *n_prompts},
                   {"prompt_tokens", *prompt_tokens},
                   {"identical", true},
                   {"rows", json::array()}};
  for (const BatchRow& r : rows) {
    j["batching"]["rows"].push_back({{"batch", r.batch},
                                     {"seconds", r.seconds},
                                     {"tokens_per_s", r.tokens_per_s},
                                     {"vs_batch_1", r.tokens_per_s / rows[0].tokens_per_s}});
  }
  if (best[0] && best[1]) {
    const OverlapRun& o = *best[0];
    const OverlapRun& a = *best[1];
    j["overlap"] = {
        {"prompt_tokens", *overlap_tokens},
        {"transport", std::string(transport::transport_kind_name(tconf->kind))},
        {"tls", tconf->kind == TransportKind::kUcx ? p.get("tls") : ""},
        {"ucx_op", tconf->kind == TransportKind::kUcx ? p.get("ucx-op") : ""},
        {"receiver_poll_us", *poll_us},
        {"image_bytes", o.image_bytes},
        {"segments", o.segments},
        {"identical", true},
        {"overlapped", overlap_json(o)},
        {"after", overlap_json(a)},
        {"exposed_vs_after", a.exposed_seconds > 0 ? o.exposed_seconds / a.exposed_seconds : 0.0},
        {"total_vs_after", o.total_seconds / a.total_seconds}};
  }
  if (p.flag("json")) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf(
      "policy %s, %d threads (%s), chunk %lld tokens, pages of %lld tokens, best of %lld; load "
      "average %s\n",
      policy_name.c_str(), forward.n_threads(), engine::cpu::isa_name(forward.options().isa),
      static_cast<long long>(*chunk), static_cast<long long>(*page_tokens),
      static_cast<long long>(*repeat), load.c_str());
  std::printf("\nbatching: %lld prompts of %lld tokens (results identical at every batch size)\n",
              static_cast<long long>(*n_prompts), static_cast<long long>(*prompt_tokens));
  std::printf("%6s %10s %14s %10s\n", "batch", "seconds", "tokens/s", "vs 1");
  for (const BatchRow& r : rows) {
    std::printf("%6lld %10.3f %14.1f %9.2fx\n", static_cast<long long>(r.batch), r.seconds,
                r.tokens_per_s, r.tokens_per_s / rows[0].tokens_per_s);
  }
  if (best[0] && best[1]) {
    const OverlapRun& o = *best[0];
    const OverlapRun& a = *best[1];
    std::printf("\noverlap: %lld tokens, image %lld bytes in %lld segments, over %s%s\n",
                static_cast<long long>(*overlap_tokens), static_cast<long long>(o.image_bytes),
                static_cast<long long>(o.segments),
                std::string(transport::transport_kind_name(tconf->kind)).c_str(),
                tconf->kind == TransportKind::kUcx
                    ? (" (" + p.get("tls") + ", " + p.get("ucx-op") + ")").c_str()
                    : "");
    std::printf("%-11s %12s %20s %12s\n", "mode", "prefill s", "exposed transfer ms", "total s");
    for (const auto* r : {&o, &a}) {
      std::printf("%-11s %12.3f %20.2f %12.3f\n", r == &o ? "overlapped" : "after",
                  r->prefill_seconds, r->exposed_seconds * 1e3, r->total_seconds);
    }
    std::printf("exposed transfer overlapped / after: %.3f; total: %.3f\n",
                a.exposed_seconds > 0 ? o.exposed_seconds / a.exposed_seconds : 0.0,
                o.total_seconds / a.total_seconds);
  }
  return 0;
}

}  // namespace kvgate::cli
