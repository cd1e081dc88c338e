#include "prefill/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace kvgate::prefill {

const char* job_failure_name(JobFailure cause) {
  switch (cause) {
    case JobFailure::kInvalid: return "invalid";
    case JobFailure::kQueueFull: return "queue_full";
    case JobFailure::kCancelled: return "cancelled";
    case JobFailure::kDeadline: return "deadline";
    case JobFailure::kExtendRefused: return "extend_refused";
    case JobFailure::kDecodeUnreachable: return "decode_unreachable";
    case JobFailure::kTransfer: return "transfer";
    case JobFailure::kEngine: return "engine";
  }
  return "engine";
}

const char* transfer_failure_name(TransferFailure cause) {
  switch (cause) {
    case TransferFailure::kPeerLost: return "peer_lost";
    case TransferFailure::kDeadline: return "deadline";
    case TransferFailure::kDataLoss: return "data_loss";
    case TransferFailure::kOverrun: return "overrun";
    case TransferFailure::kCancelled: return "cancelled";
    case TransferFailure::kOther: return "other";
  }
  return "other";
}

TransferFailure transfer_failure_of(StatusCode code) {
  switch (code) {
    case StatusCode::kUnavailable: return TransferFailure::kPeerLost;
    case StatusCode::kDeadlineExceeded: return TransferFailure::kDeadline;
    case StatusCode::kDataLoss: return TransferFailure::kDataLoss;
    case StatusCode::kOutOfRange: return TransferFailure::kOverrun;
    case StatusCode::kCancelled: return TransferFailure::kCancelled;
    default: return TransferFailure::kOther;
  }
}

PrefillMetrics::PrefillMetrics(std::shared_ptr<prometheus::Registry> registry,
                               const std::string& node)
    : registry_(std::move(registry)) {
  using prometheus::Histogram;
  const prometheus::Labels labels = {{"node", node}};
  auto counter = [&](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Labels(labels).Register(*registry_);
  };
  auto gauge = [&](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Labels(labels).Register(*registry_).Add({});
  };
  auto histogram = [&](const char* name, const char* help, Histogram::BucketBoundaries b) {
    return &prometheus::BuildHistogram()
                .Name(name)
                .Help(help)
                .Labels(labels)
                .Register(*registry_)
                .Add({}, std::move(b));
  };
  queued_ = &counter("kvgate_prefill_jobs_queued_total", "Prefill jobs accepted into the queue")->Add({});
  started_ = &counter("kvgate_prefill_jobs_started_total", "Prefill jobs the engine started")->Add({});
  done_ = &counter("kvgate_prefill_jobs_done_total",
                   "Prefill jobs whose KV was shipped and whose manifest was sent")
               ->Add({});
  auto* failed = counter("kvgate_prefill_jobs_failed_total", "Prefill jobs that failed, by cause");
  for (int i = 0; i < kJobFailureCount; ++i) {
    failed_[i] = &failed->Add({{"cause", job_failure_name(static_cast<JobFailure>(i))}});
  }
  queue_length_ = gauge("kvgate_prefill_queue_length", "Prefill jobs waiting for the engine");
  queued_tokens_ = gauge("kvgate_prefill_queued_tokens", "Prompt tokens of the waiting jobs");
  prompt_tokens_ =
      &counter("kvgate_prefill_prompt_tokens_total", "Prompt tokens prefilled")->Add({});
  const Histogram::BucketBoundaries seconds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                               1,     2.5,  5,     10,   30,  60,   120};
  prefill_seconds_ = histogram("kvgate_prefill_duration_seconds",
                               "Full-attention prefill plus compression of one prompt (the "
                               "whole pass of the batch it ran in)",
                               seconds);
  prefill_tokens_per_second_ =
      histogram("kvgate_prefill_throughput_tokens_per_second",
                "Prompt tokens per second of one prefill pass (all the jobs of a batch)",
                {50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000});
  dense_bytes_ = &counter("kvgate_prefill_kv_dense_bytes_total",
                          "Bytes the prompts' KV takes as a dense fp16 cache")
                      ->Add({});
  shipped_bytes_ = &counter("kvgate_prefill_kv_shipped_bytes_total",
                            "Bytes of the compressed KV shipped (the footprint formula)")
                        ->Add({});
  wire_bytes_ = &counter("kvgate_prefill_kv_wire_bytes_total",
                         "Page bytes put on the wire (compressed KV, page-granular)")
                     ->Add({});
  keep_rate_ = histogram("kvgate_prefill_keep_rate_ratio",
                         "Share of distant prompt tokens the policy retained",
                         {0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0});
  transfer_seconds_ = histogram("kvgate_prefill_transfer_duration_seconds",
                                "From begin_send to the transfer's event (OK only); blocks ship "
                                "during the prefill, so this spans the rest of the prefill",
                                {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                 0.5, 1, 2.5, 10});
  transfer_bandwidth_ = histogram("kvgate_prefill_transfer_bandwidth_bytes_per_second",
                                  "Wire bytes of one transfer over its duration (a lower bound of "
                                  "the link's: the duration includes prefill compute it overlapped)",
                                  {1e7, 1e8, 2.5e8, 5e8, 1e9, 2e9, 4e9, 8e9, 16e9, 32e9});
  transfer_exposed_seconds_ =
      histogram("kvgate_prefill_transfer_exposed_seconds",
                "From the end of the prefill pass to the transfer's OK event: the part of the "
                "transfer a request waits for after its prefill",
                {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
                 2.5, 10});
  auto* tfail = counter("kvgate_prefill_transfer_failures_total",
                        "KV transfers that failed, by cause");
  for (int i = 0; i < kTransferFailureCount; ++i) {
    transfer_failed_[i] =
        &tfail->Add({{"cause", transfer_failure_name(static_cast<TransferFailure>(i))}});
  }
  auto* ext = counter("kvgate_prefill_extends_total",
                      "Extend requests to decode nodes (the image outgrew its grant), by result");
  extend_granted_ = &ext->Add({{"result", "granted"}});
  extend_refused_ = &ext->Add({{"result", "refused"}});
  batches_ = &counter("kvgate_prefill_batches_total",
                      "Layer-major prefill passes (each runs one or more jobs together)")
                  ->Add({});
  batch_jobs_ = histogram("kvgate_prefill_batch_jobs", "Jobs per prefill pass",
                          {1, 2, 4, 8, 16, 32, 64});
  batch_tokens_ = histogram("kvgate_prefill_batch_tokens", "Prompt tokens per prefill pass",
                            {128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536});
  auto* seg = counter("kvgate_prefill_segments_sent_total",
                      "Wire segments issued to the transport: while later layers were still "
                      "computing (when=\"overlapped\") or after the prefill "
                      "(when=\"after_prefill\": held for an Extend, or the last block)");
  segments_overlapped_ = &seg->Add({{"when", "overlapped"}});
  segments_after_ = &seg->Add({{"when", "after_prefill"}});
}

PrefillMetrics::~PrefillMetrics() = default;

void PrefillMetrics::job_queued() { queued_->Increment(); }
void PrefillMetrics::job_started() { started_->Increment(); }
void PrefillMetrics::job_done() { done_->Increment(); }
void PrefillMetrics::job_failed(JobFailure cause) { failed_[static_cast<int>(cause)]->Increment(); }

void PrefillMetrics::set_queue(int64_t jobs, int64_t tokens) {
  queue_length_->Set(static_cast<double>(jobs));
  queued_tokens_->Set(static_cast<double>(tokens));
}

void PrefillMetrics::prefill_done(int64_t prompt_tokens, double seconds) {
  prompt_tokens_->Increment(static_cast<double>(prompt_tokens));
  prefill_seconds_->Observe(seconds);
}

void PrefillMetrics::kv_shipped(int64_t dense_bytes, int64_t shipped_bytes, int64_t wire_bytes,
                                double keep_rate) {
  dense_bytes_->Increment(static_cast<double>(dense_bytes));
  shipped_bytes_->Increment(static_cast<double>(shipped_bytes));
  wire_bytes_->Increment(static_cast<double>(wire_bytes));
  keep_rate_->Observe(keep_rate);
}

void PrefillMetrics::transfer_done(int64_t wire_bytes, double seconds, double exposed_seconds) {
  transfer_seconds_->Observe(seconds);
  transfer_exposed_seconds_->Observe(exposed_seconds);
  if (seconds > 0) transfer_bandwidth_->Observe(static_cast<double>(wire_bytes) / seconds);
}

void PrefillMetrics::transfer_failed(TransferFailure cause) {
  transfer_failed_[static_cast<int>(cause)]->Increment();
}

void PrefillMetrics::extend(bool granted) {
  (granted ? extend_granted_ : extend_refused_)->Increment();
}

void PrefillMetrics::batch(int64_t jobs, int64_t tokens, double seconds) {
  batches_->Increment();
  batch_jobs_->Observe(static_cast<double>(jobs));
  batch_tokens_->Observe(static_cast<double>(tokens));
  if (seconds > 0) prefill_tokens_per_second_->Observe(static_cast<double>(tokens) / seconds);
}

void PrefillMetrics::segment_sent(bool overlapped) {
  (overlapped ? segments_overlapped_ : segments_after_)->Increment();
}

std::string PrefillMetrics::serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace kvgate::prefill
