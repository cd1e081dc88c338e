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
// Labels are bounded: route is one of a fixed set, code an HTTP status.
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

}  // namespace kvgate::coordinator
