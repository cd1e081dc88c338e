// Prometheus metrics of the coordinator's HTTP API (DESIGN.md §8 names).
//
//   kvgate_coordinator_requests_total{route,code}        counter
//   kvgate_coordinator_request_duration_seconds{route}   histogram, end to end
//   kvgate_coordinator_ttft_seconds                      histogram, admission -> first token
//   kvgate_coordinator_inter_token_seconds               histogram, between tokens
//   kvgate_coordinator_prompt_tokens_total               counter
//   kvgate_coordinator_completion_tokens_total           counter
//   kvgate_coordinator_queue_length                      gauge, admitted and not started
//   kvgate_coordinator_unauthenticated_requests_total    counter, 401 answers
//
// Cluster series (ClusterMetrics, the placement backend):
//
//   kvgate_coordinator_nodes{role,state}                     gauge, registered nodes
//   kvgate_coordinator_placements_total                      counter, prefill jobs sent
//   kvgate_coordinator_replacements_total{cause}             counter, attempts re-placed
//   kvgate_coordinator_request_failures_total{cause}         counter, requests failed
//   kvgate_coordinator_reserve_denials_total                 counter, ReserveDeny answers
//   kvgate_coordinator_predicted_footprint_bytes             histogram, reserved per placement
//   kvgate_coordinator_committed_footprint_bytes             histogram, Commit.committed_bytes
//   kvgate_coordinator_footprint_prediction_ratio            histogram, predicted / committed
//                                                            at the prompt's length
//   kvgate_coordinator_keep_rate_ratio                       histogram, Commit.keep_rate
//   kvgate_coordinator_kv_dense_bytes_total                  counter, dense fp16 KV of
//                                                            committed prompts
//   kvgate_coordinator_kv_shipped_bytes_total                counter, committed (shipped) KV
//   kvgate_coordinator_placement_queue_length                gauge, waiting for a node
//   kvgate_coordinator_active_requests                       gauge, accepted and not ended
//
// Labels are bounded: route is one of a fixed set, code an HTTP status, role
// and state two values each, cause one of ClusterCause.
// Every handle is created once (the constructor, or the first use of a
// (route, code) pair, cached in an atomic table), so the per-token calls only
// touch prometheus-cpp's atomics. Thread-safe.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace kvgate::coordinator {

enum class MetricRoute { kCompletions, kChatCompletions, kModels, kHealth, kMetrics, kOther };
inline constexpr int kMetricRouteCount = 6;
const char* metric_route_name(MetricRoute route);

class CoordinatorMetrics {
 public:
  explicit CoordinatorMetrics(std::shared_ptr<prometheus::Registry> registry);
  ~CoordinatorMetrics();
  CoordinatorMetrics(const CoordinatorMetrics&) = delete;
  CoordinatorMetrics& operator=(const CoordinatorMetrics&) = delete;

  void count_request(MetricRoute route, int http_status);
  void observe_request_duration(MetricRoute route, double seconds);
  void observe_ttft(double seconds);
  void observe_inter_token(double seconds);
  void add_prompt_tokens(int64_t n);
  void add_completion_tokens(int64_t n);
  void set_queue_length(int64_t n);
  void count_unauthenticated();

  // The whole registry in the Prometheus text format (GET /metrics).
  std::string serialize() const;
  prometheus::Registry& registry() { return *registry_; }

 private:
  static constexpr int kCodes = 600;
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_family_;
  std::array<std::array<std::atomic<prometheus::Counter*>, kCodes>, kMetricRouteCount> requests_{};
  std::array<prometheus::Histogram*, kMetricRouteCount> duration_{};
  prometheus::Histogram* ttft_;
  prometheus::Histogram* inter_token_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* completion_tokens_;
  prometheus::Gauge* queue_length_;
  prometheus::Counter* unauthenticated_;
};

// Why an attempt was re-placed or a request failed (label `cause`).
enum class ClusterCause {
  kNoCapacity,        // no node had room within placement_wait
  kPrefillQueueFull,  // every prefill node refused the job
  kPrefillError,      // Error from the prefill node
  kDecodeError,       // Error / failed transfer from the decode node
  kLeaseExpired,      // Release "expired" before the KV arrived
  kNodeDown,          // a node holding the request went down
  kTimeout,           // coordinator.request_timeout
  kProtocol,          // a node broke the protocol for this request
  kShutdown,          // the coordinator is stopping
};
inline constexpr int kClusterCauseCount = 9;
const char* cluster_cause_name(ClusterCause cause);

class ClusterMetrics {
 public:
  explicit ClusterMetrics(std::shared_ptr<prometheus::Registry> registry);
  ~ClusterMetrics();
  ClusterMetrics(const ClusterMetrics&) = delete;
  ClusterMetrics& operator=(const ClusterMetrics&) = delete;

  void set_nodes(int64_t live_prefill, int64_t live_decode, int64_t down_prefill,
                 int64_t down_decode);
  void count_placement();
  void count_replacement(ClusterCause cause);
  void count_failure(ClusterCause cause);
  void count_reserve_denial();
  void observe_predicted_bytes(double bytes);
  void observe_committed_bytes(double bytes);
  void observe_prediction_ratio(double ratio);
  void observe_keep_rate(double rate);
  void add_kv_bytes(double dense_bytes, double shipped_bytes);
  void set_placement_queue_length(int64_t n);
  void set_active_requests(int64_t n);

  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::array<prometheus::Gauge*, 4> nodes_{};  // prefill live, decode live, prefill down, decode down
  prometheus::Counter* placements_;
  std::array<prometheus::Counter*, kClusterCauseCount> replacements_{};
  std::array<prometheus::Counter*, kClusterCauseCount> failures_{};
  prometheus::Counter* reserve_denials_;
  prometheus::Histogram* predicted_bytes_;
  prometheus::Histogram* committed_bytes_;
  prometheus::Histogram* prediction_ratio_;
  prometheus::Histogram* keep_rate_;
  prometheus::Counter* kv_dense_bytes_;
  prometheus::Counter* kv_shipped_bytes_;
  prometheus::Gauge* placement_queue_;
  prometheus::Gauge* active_requests_;
};

}  // namespace kvgate::coordinator
