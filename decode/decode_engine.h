// DecodeEngine: the decode node's engine loop (DESIGN.md §1 steps 2, 5, 6;
// docs/cluster.md). One thread owns the model forward, the KV page pool,
// the LeaseManager, the transport (its registered region is the pool's
// arena) and every request; nothing of that is touched elsewhere.
//
// Work arrives by posting: post() puts a control message (with the
// connection it came on, where answers go) into a mutex-protected inbox;
// the loop drains the inbox each iteration, then polls transport progress,
// expires leases, finishes transfers whose receive and manifest both
// arrived, and runs one batched decode step over the admitted sequences.
// Idle, it sleeps on a condition variable (bounded short while receives are
// posted, since the transport moves only when polled).
//
// Messages handled (everything else is answered with an Error):
//   Reserve          grant a lease, take its pages, post a receive over them
//                    (TransferId = lease id) -> ReserveGrant / ReserveDeny
//   Extend           grow the lease, take the new pages, grow the live receive
//                    in place (Transport::extend_receive: the new pages follow
//                    the old ones; segments already landed keep their place)
//                    -> ExtendResult with the grant over all pages; refused
//                    (FAILED_PRECONDITION) once the manifest or the verified
//                    KV arrived
//   TransferManifest with the verified receive (either order): adopt the
//                    landed pages as the request's cache, commit the lease ->
//                    TransferResult{OK} to the sender, Commit to the
//                    coordinator, admit with the first token
//   Cancel           drop the request's sequence, lease and receive; a final
//                    TokenChunk{kCancelled}
//   Release          drop the request's lease (coordinator re-placement); no answer
// Failures: a failed receive or refused manifest frees the lease and sends
// TransferResult{code} to the prefill connection (when known) and
// Error{request, code} to the coordinator; an expired lease sends
// Release{reason "expired"} and cancels the receive; a sequence that cannot
// continue (its lease cannot grow: pool full; a forward error) gets
// Error{request, code} then TokenChunk{kError} and is freed, the other
// sequences are unaffected.
//
// Streaming: every step, one TokenChunk per stepped request (first chunk =
// the prefill's first token); text from StreamDecoder + StopMatcher; finish
// on end-of-generation, a stop string, max_new_tokens or the context limit,
// with cumulative usage. On finish the cache is destroyed and the lease
// released (the last chunk says so; no other message).
//
// Known limits: the manifest carries no prompt token ids, so the
// repetition penalty sees only the completion; a sampled (temperature > 0)
// continuation draws from a fresh RNG seeded with the request's seed, not
// the prefill node's stream.
//
// Threading: post(), post_closed(), stats(), stop() are thread-safe and
// never block on compute (stop() joins the loop). Everything else runs on
// the engine thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/config.h"
#include "common/control_channel.h"
#include "common/control_protocol.h"
#include "common/status.h"
#include "decode/decode_metrics.h"
#include "engine/batch_decode.h"
#include "engine/gate.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "kvstore/lease_manager.h"
#include "kvstore/page_pool.h"
#include "transport/transport.h"

namespace kvgate::decode {

using Clock = std::chrono::steady_clock;

// The decode step on a device (engine.backend: cuda, decode_node.cpp; or,
// in tests, any page source and stepper). Leases, the transport and adopt
// stay on the host pool; each admitted cache is then moved into `pool`
// (decode/device_pages.h: move_to_device, pages charged to the lease) and
// stepped by `step` instead of the CPU's BatchDecoder.
struct DecodeDevice {
  // Device pages: the host pool's page size, and at least as many pages
  // (so a device allocation never fails where the lease allows it).
  kvstore::PageSource* pool = nullptr;
  // engine::BatchDecoder::step's contract (CudaBatchDecoder::step).
  std::function<Status(std::span<const engine::DecodeItem> items, std::span<float> logits,
                       std::span<Status> statuses)>
      step;
  // Runs after every move_to_device, before the next step: a device pool's
  // pending page writes enqueued (DevicePagePool::flush). May be empty.
  std::function<Status()> after_move;
  std::string name;                 // for the start-up line ("cuda")
  std::shared_ptr<void> keep_alive;  // owns what pool and step use
};

struct DecodeEngineOptions {
  DecodeConfig decode;
  TransportConfig transport;
  std::string cluster_token;  // the transport's handshake secret
  int64_t context_tokens = 0;  // 0 = the model's training context
  engine::ForwardOptions forward;
  // Null: the CPU engine decodes on the host pool's pages.
  std::shared_ptr<DecodeDevice> device;
  std::string node_name = "decode";  // for log lines
  // Tests only: fault injection into the transport (before_verify, ...).
  transport::TestHooks transport_hooks;
};

// Published by the engine loop every iteration (for heartbeats and tests).
struct DecodeStats {
  kvstore::LeaseStats leases;
  uint32_t waiting_transfers = 0;  // leases granted whose KV has not been adopted
  uint32_t active_sequences = 0;   // admitted to the batch
  uint64_t context_tokens = 0;     // tokens held by admitted sequences
  uint64_t steps = 0;              // decode steps run
  uint64_t iterations = 0;         // loop iterations (tests wait on progress)
};

class DecodeEngine {
 public:
  // Creates the pool (decode.pool_bytes, pages of decode.page_tokens K/V
  // rows), the lease manager and the transport over the pool's arena, and
  // starts the engine thread. `model`, `tokenizer` and `metrics` must
  // outlive the engine; `gate` may be null (gate policies then refuse).
  // Errors name the config key (decode.page_tokens, decode.pool_bytes) or
  // come from create_transport.
  static Result<std::unique_ptr<DecodeEngine>> start(const engine::LlamaModel& model,
                                                     const engine::Tokenizer& tokenizer,
                                                     std::shared_ptr<const engine::GateModel> gate,
                                                     DecodeEngineOptions options,
                                                     DecodeMetrics* metrics);
  ~DecodeEngine();
  DecodeEngine(const DecodeEngine&) = delete;
  DecodeEngine& operator=(const DecodeEngine&) = delete;

  // Any thread: a message that arrived on `from` (answers go back on it).
  void post(control::ConnectionPtr from, control::Message message);
  // Any thread: `connection` closed. Requests whose coordinator connection
  // it was are dropped (their tokens can no longer be delivered).
  void post_closed(control::ConnectionPtr connection);

  // Drains: stops accepting (Reserve is denied kUnavailable), fails every
  // request with Error{kUnavailable, "decode node shutting down"} (and a
  // final TokenChunk{kError} for admitted ones), frees everything and joins
  // the engine thread. Idempotent.
  void stop();

  DecodeStats stats() const;
  // The transport's address blob (Hello::transport_address) and name.
  const transport::Bytes& transport_address() const { return transport_address_; }
  std::string transport_name() const { return transport_name_; }
  int64_t page_bytes() const { return page_bytes_; }

 private:
  struct Sequence;
  struct Request;
  struct Inbound {
    control::ConnectionPtr from;
    control::Message message;
    bool closed = false;  // post_closed
  };

  DecodeEngine(const engine::LlamaModel& model, const engine::Tokenizer& tokenizer,
               std::shared_ptr<const engine::GateModel> gate, DecodeEngineOptions options,
               DecodeMetrics* metrics);

  void loop();
  void handle(Inbound& in);
  void on_reserve(const control::ConnectionPtr& from, const control::Reserve& m);
  void on_extend(const control::ConnectionPtr& from, const control::Extend& m);
  void on_manifest(const control::ConnectionPtr& from, control::TransferManifest m);
  void on_cancel(const control::ConnectionPtr& from, const control::Cancel& m);
  void on_release(const control::ConnectionPtr& from, const control::Release& m);
  void on_closed(const control::ConnectionPtr& connection);
  void on_transfer_event(const transport::TransferEvent& event);
  void expire_leases(Clock::time_point now);
  // Receive verified and manifest present: adopt, commit, admit.
  void try_finish_transfer(Request& r);
  Status adopt_and_admit(Request& r);
  // The transfer failed: frees the lease, TransferResult + Error.
  void fail_transfer(Request& r, const Status& status, TransferResultKind kind);
  Result<transport::Bytes> post_receive(Request& r, Clock::time_point deadline);
  void cancel_receive(Request& r);
  // Forgets the request: sequence, receive, lease (in that order).
  void drop(RequestId id);

  // decode/decode_batch.cpp
  void step();
  // Appends `token` (sampled) to the chunk; returns the finish reason.
  control::FinishReason accept_token(Request& r, int32_t token, control::TokenChunk& chunk);
  void send_chunk(Request& r, control::TokenChunk& chunk);
  // Error{request, code} then TokenChunk{kError}; drops the request.
  void fail_sequence(Request& r, const Status& status);
  Status ensure_pages(Request& r);
  Result<std::shared_ptr<const engine::PolicyPlan>> plan_for(const control::KvPolicySpec& spec);

  void publish_stats();
  void drain();
  void note(const std::string& line) const;

  const engine::LlamaModel& model_;
  const engine::Tokenizer& tokenizer_;
  std::shared_ptr<const engine::GateModel> gate_;
  DecodeEngineOptions options_;
  DecodeMetrics* metrics_;
  int64_t page_bytes_ = 0;
  int64_t context_tokens_ = 0;
  transport::Bytes transport_address_;
  std::string transport_name_;

  // Engine thread only (created before the thread starts).
  std::unique_ptr<kvstore::PagePool> pool_;
  std::unique_ptr<kvstore::LeaseManager> leases_;
  std::unique_ptr<transport::Transport> transport_;
  std::unique_ptr<engine::CpuForward> forward_;
  std::unique_ptr<engine::BatchDecoder> batch_;
  std::unordered_map<RequestId, std::unique_ptr<Request>> requests_;
  std::unordered_map<transport::TransferId, RequestId> by_transfer_;
  std::vector<RequestId> active_;  // admitted, in admission order
  std::vector<std::pair<std::string, std::shared_ptr<const engine::PolicyPlan>>> plans_;
  uint64_t steps_ = 0;
  uint64_t iterations_ = 0;
  std::vector<transport::TransferEvent> events_;
  std::vector<float> logits_;
  std::vector<Status> step_status_;
  std::vector<engine::DecodeItem> step_items_;
  std::vector<Request*> step_requests_;

  // Shared with other threads.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Inbound> inbox_;
  bool stopping_ = false;
  DecodeStats stats_;
  std::thread thread_;
};

}  // namespace kvgate::decode
