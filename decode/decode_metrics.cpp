#include "decode/decode_metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace kvgate::decode {

const char* transfer_result_name(TransferResultKind kind) {
  switch (kind) {
    case TransferResultKind::kOk: return "ok";
    case TransferResultKind::kDataLoss: return "data_loss";
    case TransferResultKind::kDeadline: return "deadline";
    case TransferResultKind::kPeerLost: return "peer_lost";
    case TransferResultKind::kOverrun: return "overrun";
    case TransferResultKind::kCancelled: return "cancelled";
    case TransferResultKind::kBadManifest: return "bad_manifest";
    case TransferResultKind::kOther: return "other";
  }
  return "other";
}

TransferResultKind transfer_result_of(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return TransferResultKind::kOk;
    case StatusCode::kDataLoss: return TransferResultKind::kDataLoss;
    case StatusCode::kDeadlineExceeded: return TransferResultKind::kDeadline;
    case StatusCode::kUnavailable: return TransferResultKind::kPeerLost;
    case StatusCode::kOutOfRange: return TransferResultKind::kOverrun;
    case StatusCode::kCancelled: return TransferResultKind::kCancelled;
    default: return TransferResultKind::kOther;
  }
}

DecodeMetrics::DecodeMetrics(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)) {
  using prometheus::Histogram;
  auto gauge = [&](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(*registry_).Add({});
  };
  auto counter = [&](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(*registry_).Add({});
  };
  pool_capacity_ = gauge("kvgate_decode_pool_capacity_bytes", "Bytes of the KV page pool");
  pool_free_ = gauge("kvgate_decode_pool_free_bytes", "Pool bytes held by no lease");
  pool_reserved_ = gauge("kvgate_decode_pool_reserved_bytes",
                         "Pool bytes held by leases whose KV has not arrived yet");
  pool_used_ = gauge("kvgate_decode_pool_used_bytes", "Pool bytes held by committed leases");
  leases_granted_ = counter("kvgate_decode_leases_granted_total", "Reserve requests granted");
  leases_denied_ = counter("kvgate_decode_leases_denied_total", "Reserve requests denied");
  leases_expired_ = counter("kvgate_decode_leases_expired_total",
                            "Leases whose KV did not arrive before their deadline");
  auto& transfers = prometheus::BuildCounter()
                        .Name("kvgate_decode_transfers_total")
                        .Help("KV transfers received, by result (ok or the failure cause)")
                        .Register(*registry_);
  for (int k = 0; k < kTransferResultKinds; ++k) {
    transfers_[k] =
        &transfers.Add({{"result", transfer_result_name(static_cast<TransferResultKind>(k))}});
  }
  const Histogram::BucketBoundaries seconds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                               0.25,  0.5,    1,     2.5,  5,     10};
  transfer_duration_ = &prometheus::BuildHistogram()
                            .Name("kvgate_decode_transfer_duration_seconds")
                            .Help("From posting a receive to the verified KV")
                            .Register(*registry_)
                            .Add({}, seconds);
  transfer_bytes_ = counter("kvgate_decode_transfer_bytes_total", "Verified KV payload bytes received");
  batch_requests_ = &prometheus::BuildHistogram()
                         .Name("kvgate_decode_batch_requests")
                         .Help("Sequences stepped together in one decode step")
                         .Register(*registry_)
                         .Add({}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128});
  generated_tokens_ = counter("kvgate_decode_generated_tokens_total", "Tokens generated");
  step_duration_ = &prometheus::BuildHistogram()
                        .Name("kvgate_decode_step_duration_seconds")
                        .Help("One batched decode step (forward passes and sampling)")
                        .Register(*registry_)
                        .Add({}, seconds);
  inter_token_ = &prometheus::BuildHistogram()
                      .Name("kvgate_decode_inter_token_seconds")
                      .Help("Time between consecutive tokens of a request")
                      .Register(*registry_)
                      .Add({}, seconds);
  active_requests_ = gauge("kvgate_decode_active_requests", "Sequences admitted to the batch");
}

DecodeMetrics::~DecodeMetrics() = default;

void DecodeMetrics::set_pool(const PoolGauges& pool) {
  pool_capacity_->Set(static_cast<double>(pool.capacity_bytes));
  pool_free_->Set(static_cast<double>(pool.free_bytes));
  pool_reserved_->Set(static_cast<double>(pool.reserved_bytes));
  pool_used_->Set(static_cast<double>(pool.used_bytes));
}
void DecodeMetrics::count_lease_granted() { leases_granted_->Increment(); }
void DecodeMetrics::count_lease_denied() { leases_denied_->Increment(); }
void DecodeMetrics::count_lease_expired() { leases_expired_->Increment(); }
void DecodeMetrics::count_transfer(TransferResultKind result) {
  transfers_[static_cast<int>(result)]->Increment();
}
void DecodeMetrics::observe_transfer(double seconds, uint64_t bytes) {
  transfer_duration_->Observe(seconds);
  transfer_bytes_->Increment(static_cast<double>(bytes));
}
void DecodeMetrics::observe_step(double seconds, int64_t batch_requests) {
  step_duration_->Observe(seconds);
  batch_requests_->Observe(static_cast<double>(batch_requests));
}
void DecodeMetrics::add_generated_tokens(int64_t n) {
  generated_tokens_->Increment(static_cast<double>(n));
}
void DecodeMetrics::observe_inter_token(double seconds) { inter_token_->Observe(seconds); }
void DecodeMetrics::set_active_requests(int64_t n) {
  active_requests_->Set(static_cast<double>(n));
}

}  // namespace kvgate::decode
