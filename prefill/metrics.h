// Prometheus metrics of the prefill node (DESIGN.md §8 names), every family
// labelled with the node name; `cause` and `result` take the fixed values
// listed here, never request ids.
//
//   kvgate_prefill_jobs_queued_total                  counter, jobs accepted into the queue
//   kvgate_prefill_jobs_started_total                 counter
//   kvgate_prefill_jobs_done_total                    counter, KV shipped and manifest sent
//   kvgate_prefill_jobs_failed_total{cause}           counter: invalid, queue_full,
//        cancelled, deadline, extend_refused, decode_unreachable, transfer, engine
//   kvgate_prefill_queue_length                       gauge, jobs waiting
//   kvgate_prefill_queued_tokens                      gauge, their prompt tokens
//   kvgate_prefill_prompt_tokens_total                counter, tokens prefilled
//   kvgate_prefill_duration_seconds                   histogram, forward pass + compression
//   kvgate_prefill_throughput_tokens_per_second       histogram, prompt tokens / duration
//   kvgate_prefill_kv_dense_bytes_total               counter, dense fp16 KV of the prompts
//   kvgate_prefill_kv_shipped_bytes_total             counter, compressed KV (formula bytes)
//   kvgate_prefill_kv_wire_bytes_total                counter, page bytes put on the wire
//   kvgate_prefill_keep_rate_ratio                    histogram, retained / distant tokens
//   kvgate_prefill_transfer_duration_seconds          histogram, begin_send -> event
//   kvgate_prefill_transfer_bandwidth_bytes_per_second histogram, wire bytes / duration
//   kvgate_prefill_transfer_failures_total{cause}     counter: peer_lost, deadline,
//        data_loss, overrun, cancelled, other
//   kvgate_prefill_extends_total{result}              counter: granted, refused
//
// Handles are created once in the constructor; the calls only touch
// prometheus-cpp's atomics. Thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace kvgate::prefill {

enum class JobFailure {
  kInvalid,
  kQueueFull,
  kCancelled,
  kDeadline,
  kExtendRefused,
  kDecodeUnreachable,
  kTransfer,
  kEngine,
};
inline constexpr int kJobFailureCount = 8;
const char* job_failure_name(JobFailure cause);

enum class TransferFailure { kPeerLost, kDeadline, kDataLoss, kOverrun, kCancelled, kOther };
inline constexpr int kTransferFailureCount = 6;
const char* transfer_failure_name(TransferFailure cause);
TransferFailure transfer_failure_of(StatusCode code);

class PrefillMetrics {
 public:
  PrefillMetrics(std::shared_ptr<prometheus::Registry> registry, const std::string& node);
  ~PrefillMetrics();
  PrefillMetrics(const PrefillMetrics&) = delete;
  PrefillMetrics& operator=(const PrefillMetrics&) = delete;

  void job_queued();
  void job_started();
  void job_done();
  void job_failed(JobFailure cause);
  void set_queue(int64_t jobs, int64_t tokens);
  void prefill_done(int64_t prompt_tokens, double seconds);
  void kv_shipped(int64_t dense_bytes, int64_t shipped_bytes, int64_t wire_bytes,
                  double keep_rate);
  // seconds: begin_send to the OK event (with per-block shipping this
  // spans the rest of the prefill); exposed_seconds: from the end of the
  // prefill pass to the event — what the request waits for after its
  // prefill.
  void transfer_done(int64_t wire_bytes, double seconds, double exposed_seconds);
  void transfer_failed(TransferFailure cause);
  void extend(bool granted);
  // One layer-major prefill pass of `jobs` jobs with `tokens` prompt tokens
  // that took `seconds` (its throughput is the node's prefill rate).
  void batch(int64_t jobs, int64_t tokens, double seconds);
  // A wire segment issued to the transport while later layers were still
  // computing (overlapped) or after the prefill (held for an Extend, or the
  // last layer's).
  void segment_sent(bool overlapped);

  // The registry in the Prometheus text format.
  std::string serialize() const;
  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Counter* queued_;
  prometheus::Counter* started_;
  prometheus::Counter* done_;
  prometheus::Counter* failed_[kJobFailureCount];
  prometheus::Gauge* queue_length_;
  prometheus::Gauge* queued_tokens_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Histogram* prefill_seconds_;
  prometheus::Histogram* prefill_tokens_per_second_;
  prometheus::Counter* dense_bytes_;
  prometheus::Counter* shipped_bytes_;
  prometheus::Counter* wire_bytes_;
  prometheus::Histogram* keep_rate_;
  prometheus::Histogram* transfer_seconds_;
  prometheus::Histogram* transfer_bandwidth_;
  prometheus::Histogram* transfer_exposed_seconds_;
  prometheus::Counter* transfer_failed_[kTransferFailureCount];
  prometheus::Counter* extend_granted_;
  prometheus::Counter* extend_refused_;
  prometheus::Counter* batches_;
  prometheus::Histogram* batch_jobs_;
  prometheus::Histogram* batch_tokens_;
  prometheus::Counter* segments_overlapped_;
  prometheus::Counter* segments_after_;
};

}  // namespace kvgate::prefill
