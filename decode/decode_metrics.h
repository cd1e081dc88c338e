// Prometheus metrics of a decode node (DESIGN.md §8 names,
// kvgate_decode_<quantity>_<unit>):
//
//   kvgate_decode_pool_free_bytes / _pool_reserved_bytes / _pool_used_bytes  gauges
//   kvgate_decode_pool_capacity_bytes                                        gauge
//   kvgate_decode_leases_granted_total / _denied_total / _expired_total      counters
//   kvgate_decode_transfers_total{result}        counter: ok, or the failure cause
//                                                (data_loss, deadline, peer_lost,
//                                                overrun, cancelled, bad_manifest, other)
//   kvgate_decode_transfer_duration_seconds      histogram, post_receive -> verified
//   kvgate_decode_transfer_bytes_total           counter, verified payload bytes
//   kvgate_decode_batch_requests                 histogram, sequences per decode step
//   kvgate_decode_generated_tokens_total         counter
//   kvgate_decode_step_duration_seconds          histogram, one batched decode step
//   kvgate_decode_inter_token_seconds            histogram, between a request's tokens
//   kvgate_decode_active_requests                gauge, sequences admitted to the batch
//
// Labels are bounded (result is one of a fixed set). Every handle is made in
// the constructor, so the per-step calls only touch prometheus-cpp's atomics.
// Thread-safe (the engine thread writes, the exposer's thread reads).
#pragma once

#include <array>
#include <cstdint>
#include <memory>

#include "common/status.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace kvgate::decode {

// Why a transfer ended (the `result` label).
enum class TransferResultKind {
  kOk,
  kDataLoss,
  kDeadline,
  kPeerLost,
  kOverrun,
  kCancelled,
  kBadManifest,  // the manifest or its descriptor was refused
  kOther,
};
inline constexpr int kTransferResultKinds = 8;
const char* transfer_result_name(TransferResultKind kind);
// The cause of a transport failure code.
TransferResultKind transfer_result_of(StatusCode code);

struct PoolGauges {
  int64_t capacity_bytes = 0;
  int64_t free_bytes = 0;
  int64_t reserved_bytes = 0;
  int64_t used_bytes = 0;
};

class DecodeMetrics {
 public:
  explicit DecodeMetrics(std::shared_ptr<prometheus::Registry> registry);
  ~DecodeMetrics();
  DecodeMetrics(const DecodeMetrics&) = delete;
  DecodeMetrics& operator=(const DecodeMetrics&) = delete;

  void set_pool(const PoolGauges& pool);
  void count_lease_granted();
  void count_lease_denied();
  void count_lease_expired();
  void count_transfer(TransferResultKind result);
  void observe_transfer(double seconds, uint64_t bytes);
  void observe_step(double seconds, int64_t batch_requests);
  void add_generated_tokens(int64_t n);
  void observe_inter_token(double seconds);
  void set_active_requests(int64_t n);

  prometheus::Registry& registry() { return *registry_; }
  const std::shared_ptr<prometheus::Registry>& shared_registry() const { return registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Gauge* pool_capacity_;
  prometheus::Gauge* pool_free_;
  prometheus::Gauge* pool_reserved_;
  prometheus::Gauge* pool_used_;
  prometheus::Counter* leases_granted_;
  prometheus::Counter* leases_denied_;
  prometheus::Counter* leases_expired_;
  std::array<prometheus::Counter*, kTransferResultKinds> transfers_{};
  prometheus::Histogram* transfer_duration_;
  prometheus::Counter* transfer_bytes_;
  prometheus::Histogram* batch_requests_;
  prometheus::Counter* generated_tokens_;
  prometheus::Histogram* step_duration_;
  prometheus::Histogram* inter_token_;
  prometheus::Gauge* active_requests_;
};

}  // namespace kvgate::decode
