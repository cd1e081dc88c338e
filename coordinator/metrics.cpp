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

}  // namespace kvgate::coordinator
