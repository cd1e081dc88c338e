#include "coordinator/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace kvgate::coordinator {

const char* metric_route_name(MetricRoute route) {
  switch (route) {
    case MetricRoute::kCompletions:
      return "/v1/completions";
    case MetricRoute::kChatCompletions:
      return "/v1/chat/completions";
    case MetricRoute::kModels:
      return "/v1/models";
    case MetricRoute::kHealth:
      return "/health";
    case MetricRoute::kMetrics:
      return "/metrics";
    case MetricRoute::kOther:
      return "other";
  }
  return "other";
}

CoordinatorMetrics::CoordinatorMetrics(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)) {
  using prometheus::Histogram;
  requests_family_ = &prometheus::BuildCounter()
                          .Name("kvgate_coordinator_requests_total")
                          .Help("HTTP requests answered, by route and status code")
                          .Register(*registry_);
  auto& duration = prometheus::BuildHistogram()
                       .Name("kvgate_coordinator_request_duration_seconds")
                       .Help("Completion requests from admission to the last byte, by route")
                       .Register(*registry_);
  const Histogram::BucketBoundaries seconds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                               2.5,   5,    10,    30,   60,  120,  300};
  for (MetricRoute r : {MetricRoute::kCompletions, MetricRoute::kChatCompletions}) {
    duration_[static_cast<int>(r)] = &duration.Add({{"route", metric_route_name(r)}}, seconds);
  }
  ttft_ = &prometheus::BuildHistogram()
               .Name("kvgate_coordinator_ttft_seconds")
               .Help("Time from admission to the first generated token")
               .Register(*registry_)
               .Add({}, seconds);
  inter_token_ = &prometheus::BuildHistogram()
                      .Name("kvgate_coordinator_inter_token_seconds")
                      .Help("Time between consecutive generated tokens of a request")
                      .Register(*registry_)
                      .Add({}, Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.02, 0.05,
                                                           0.1, 0.25, 0.5, 1, 2.5});
  prompt_tokens_ = &prometheus::BuildCounter()
                        .Name("kvgate_coordinator_prompt_tokens_total")
                        .Help("Prompt tokens of admitted requests")
                        .Register(*registry_)
                        .Add({});
  completion_tokens_ = &prometheus::BuildCounter()
                            .Name("kvgate_coordinator_completion_tokens_total")
                            .Help("Tokens generated")
                            .Register(*registry_)
                            .Add({});
  queue_length_ = &prometheus::BuildGauge()
                       .Name("kvgate_coordinator_queue_length")
                       .Help("Requests admitted and waiting to start")
                       .Register(*registry_)
                       .Add({});
  unauthenticated_ = &prometheus::BuildCounter()
                          .Name("kvgate_coordinator_unauthenticated_requests_total")
                          .Help("Requests refused with 401 (missing or wrong API key)")
                          .Register(*registry_)
                          .Add({});
  for (auto& row : requests_) {
    for (auto& c : row) c.store(nullptr, std::memory_order_relaxed);
  }
}

CoordinatorMetrics::~CoordinatorMetrics() = default;

void CoordinatorMetrics::count_request(MetricRoute route, int http_status) {
  if (http_status < 100 || http_status >= kCodes) http_status = 500;
  auto& slot = requests_[static_cast<int>(route)][http_status];
  prometheus::Counter* c = slot.load(std::memory_order_acquire);
  if (c == nullptr) {
    // First answer with this (route, code): Family::Add is thread-safe and
    // returns the same series for the same labels, so a race is harmless.
    c = &requests_family_->Add(
        {{"route", metric_route_name(route)}, {"code", std::to_string(http_status)}});
    slot.store(c, std::memory_order_release);
  }
  c->Increment();
}

void CoordinatorMetrics::observe_request_duration(MetricRoute route, double seconds) {
  if (auto* h = duration_[static_cast<int>(route)]) h->Observe(seconds);
}
void CoordinatorMetrics::observe_ttft(double seconds) {
  ttft_->Observe(seconds);
}
void CoordinatorMetrics::observe_inter_token(double seconds) {
  inter_token_->Observe(seconds);
}
void CoordinatorMetrics::add_prompt_tokens(int64_t n) {
  prompt_tokens_->Increment(static_cast<double>(n));
}
void CoordinatorMetrics::add_completion_tokens(int64_t n) {
  completion_tokens_->Increment(static_cast<double>(n));
}
void CoordinatorMetrics::set_queue_length(int64_t n) {
  queue_length_->Set(static_cast<double>(n));
}
void CoordinatorMetrics::count_unauthenticated() {
  unauthenticated_->Increment();
}

std::string CoordinatorMetrics::serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

const char* cluster_cause_name(ClusterCause cause) {
  switch (cause) {
    case ClusterCause::kNoCapacity:
      return "no_capacity";
    case ClusterCause::kPrefillQueueFull:
      return "prefill_queue_full";
    case ClusterCause::kPrefillError:
      return "prefill_error";
    case ClusterCause::kDecodeError:
      return "decode_error";
    case ClusterCause::kLeaseExpired:
      return "lease_expired";
    case ClusterCause::kNodeDown:
      return "node_down";
    case ClusterCause::kTimeout:
      return "timeout";
    case ClusterCause::kProtocol:
      return "protocol";
    case ClusterCause::kShutdown:
      return "shutdown";
  }
  return "protocol";
}

ClusterMetrics::ClusterMetrics(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)) {
  using prometheus::Histogram;
  auto& nodes = prometheus::BuildGauge()
                    .Name("kvgate_coordinator_nodes")
                    .Help("Nodes registered with this coordinator, by role and state")
                    .Register(*registry_);
  nodes_[0] = &nodes.Add({{"role", "prefill"}, {"state", "live"}});
  nodes_[1] = &nodes.Add({{"role", "decode"}, {"state", "live"}});
  nodes_[2] = &nodes.Add({{"role", "prefill"}, {"state", "down"}});
  nodes_[3] = &nodes.Add({{"role", "decode"}, {"state", "down"}});
  placements_ = &prometheus::BuildCounter()
                     .Name("kvgate_coordinator_placements_total")
                     .Help("Placements: a decode lease granted and the prefill job sent")
                     .Register(*registry_)
                     .Add({});
  auto& replaced = prometheus::BuildCounter()
                       .Name("kvgate_coordinator_replacements_total")
                       .Help("Attempts abandoned and re-placed, by cause")
                       .Register(*registry_);
  auto& failed = prometheus::BuildCounter()
                     .Name("kvgate_coordinator_request_failures_total")
                     .Help("Requests failed by the cluster backend, by cause")
                     .Register(*registry_);
  for (int i = 0; i < kClusterCauseCount; ++i) {
    const char* cause = cluster_cause_name(static_cast<ClusterCause>(i));
    replacements_[i] = &replaced.Add({{"cause", cause}});
    failures_[i] = &failed.Add({{"cause", cause}});
  }
  reserve_denials_ = &prometheus::BuildCounter()
                          .Name("kvgate_coordinator_reserve_denials_total")
                          .Help("Reservations refused by decode nodes")
                          .Register(*registry_)
                          .Add({});
  Histogram::BucketBoundaries bytes;
  for (double b = 64 * 1024; b <= 64.0 * 1024 * 1024 * 1024; b *= 4) bytes.push_back(b);
  predicted_bytes_ = &prometheus::BuildHistogram()
                          .Name("kvgate_coordinator_predicted_footprint_bytes")
                          .Help("Predicted KV footprint reserved per placement (final length)")
                          .Register(*registry_)
                          .Add({}, bytes);
  committed_bytes_ = &prometheus::BuildHistogram()
                          .Name("kvgate_coordinator_committed_footprint_bytes")
                          .Help("Actual KV bytes committed by decode nodes (prompt length)")
                          .Register(*registry_)
                          .Add({}, bytes);
  prediction_ratio_ =
      &prometheus::BuildHistogram()
           .Name("kvgate_coordinator_footprint_prediction_ratio")
           .Help("Predicted over committed KV bytes at the prompt's length (1 = exact)")
           .Register(*registry_)
           .Add({}, Histogram::BucketBoundaries{0.5, 0.75, 0.9, 0.95, 0.99, 1.0, 1.01, 1.05, 1.1,
                                                1.25, 1.5, 2, 4});
  keep_rate_ = &prometheus::BuildHistogram()
                    .Name("kvgate_coordinator_keep_rate_ratio")
                    .Help("Share of distant prompt tokens kept, per committed request")
                    .Register(*registry_)
                    .Add({}, Histogram::BucketBoundaries{0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                         0.8, 0.9, 1.0});
  kv_dense_bytes_ = &prometheus::BuildCounter()
                         .Name("kvgate_coordinator_kv_dense_bytes_total")
                         .Help("Bytes a dense fp16 cache of the committed prompts would take")
                         .Register(*registry_)
                         .Add({});
  kv_shipped_bytes_ = &prometheus::BuildCounter()
                           .Name("kvgate_coordinator_kv_shipped_bytes_total")
                           .Help("Compressed KV bytes committed on decode nodes")
                           .Register(*registry_)
                           .Add({});
  placement_queue_ = &prometheus::BuildGauge()
                          .Name("kvgate_coordinator_placement_queue_length")
                          .Help("Requests waiting for a decode or prefill node")
                          .Register(*registry_)
                          .Add({});
  active_requests_ = &prometheus::BuildGauge()
                          .Name("kvgate_coordinator_active_requests")
                          .Help("Requests accepted by the cluster backend and not ended")
                          .Register(*registry_)
                          .Add({});
}

ClusterMetrics::~ClusterMetrics() = default;

void ClusterMetrics::set_nodes(int64_t live_prefill, int64_t live_decode, int64_t down_prefill,
                               int64_t down_decode) {
  nodes_[0]->Set(static_cast<double>(live_prefill));
  nodes_[1]->Set(static_cast<double>(live_decode));
  nodes_[2]->Set(static_cast<double>(down_prefill));
  nodes_[3]->Set(static_cast<double>(down_decode));
}
void ClusterMetrics::count_placement() {
  placements_->Increment();
}
void ClusterMetrics::count_replacement(ClusterCause cause) {
  replacements_[static_cast<int>(cause)]->Increment();
}
void ClusterMetrics::count_failure(ClusterCause cause) {
  failures_[static_cast<int>(cause)]->Increment();
}
void ClusterMetrics::count_reserve_denial() {
  reserve_denials_->Increment();
}
void ClusterMetrics::observe_predicted_bytes(double bytes) {
  predicted_bytes_->Observe(bytes);
}
void ClusterMetrics::observe_committed_bytes(double bytes) {
  committed_bytes_->Observe(bytes);
}
void ClusterMetrics::observe_prediction_ratio(double ratio) {
  prediction_ratio_->Observe(ratio);
}
void ClusterMetrics::observe_keep_rate(double rate) {
  keep_rate_->Observe(rate);
}
void ClusterMetrics::add_kv_bytes(double dense_bytes, double shipped_bytes) {
  kv_dense_bytes_->Increment(dense_bytes);
  kv_shipped_bytes_->Increment(shipped_bytes);
}
void ClusterMetrics::set_placement_queue_length(int64_t n) {
  placement_queue_->Set(static_cast<double>(n));
}
void ClusterMetrics::set_active_requests(int64_t n) {
  active_requests_->Set(static_cast<double>(n));
}

}  // namespace kvgate::coordinator
