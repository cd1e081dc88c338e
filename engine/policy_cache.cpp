#include "engine/policy_cache.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "kvstore/footprint.h"
#include "kvstore/wire_image.h"

namespace kvgate::engine {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Forwards each layer input to several observers, in order.
class FanOutObserver final : public LayerInputObserver {
 public:
  void add(LayerInputObserver* o) {
    if (o != nullptr) to_.push_back(o);
  }
  size_t size() const { return to_.size(); }
  void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                      std::span<const int64_t> row_pos,
                      std::span<const int32_t> row_item) override {
    for (LayerInputObserver* o : to_) o->on_layer_input(layer, xn, n_rows, row_pos, row_item);
  }

 private:
  std::vector<LayerInputObserver*> to_;
};

// Two observers without allocating (one decode step: the caller's and a
// GateDecoder).
class PairObserver final : public LayerInputObserver {
 public:
  PairObserver(LayerInputObserver* a, LayerInputObserver* b) : a_(a), b_(b) {}
  void on_layer_input(int64_t layer, const float* xn, int64_t n_rows,
                      std::span<const int64_t> row_pos,
                      std::span<const int32_t> row_item) override {
    a_->on_layer_input(layer, xn, n_rows, row_pos, row_item);
    b_->on_layer_input(layer, xn, n_rows, row_pos, row_item);
  }

 private:
  LayerInputObserver* a_;
  LayerInputObserver* b_;
};

// Pages of 8 KiB (64 K/V rows of head_dim 64), widened to whole K/V rows and
// whole gate rows when a model or gate needs it.
int64_t page_bytes_for(const kvstore::KvLayout& layout) {
  int64_t bytes = std::lcm<int64_t>(8192, layout.head_dim * kvstore::kKvElementBytes);
  if (layout.has_gate_state()) bytes = std::lcm(bytes, layout.gate_state_bytes_per_token);
  return bytes;
}

Result<std::unique_ptr<kvstore::PagePool>> make_pool(const kvstore::KvLayout& layout,
                                                     int64_t capacity_tokens) {
  const int64_t page_bytes = page_bytes_for(layout);
  KVGATE_ASSIGN_OR_RETURN(int64_t bytes, compressed_pool_bytes(layout, capacity_tokens, page_bytes));
  return kvstore::PagePool::create(page_bytes, bytes);
}

// What the prefill must observe for a set of plans: attention statistics
// (h2o, snapkv; one observation window for all) and a GatePrefill per gate
// plan (gates[i] for plans[i]), fanned out with the forward's own observer.
struct PrefillObservers {
  std::shared_ptr<AttentionStats> stats;
  std::vector<std::unique_ptr<GatePrefill>> gates;
  FanOutObserver fan;
  bool any_gate = false;
};

Status make_observers(CpuForward& forward, std::span<const std::shared_ptr<const PolicyPlan>> plans,
                      int64_t n, PrefillObservers& obs) {
  const LlamaConfig& c = forward.model().config();
  int64_t observe_tokens = 0;
  for (const auto& plan : plans) {
    if (plan->config.policy != KvPolicy::kSnapKv) continue;
    if (observe_tokens != 0 && observe_tokens != plan->config.snapkv_observe_tokens) {
      return invalid_argument(
          "snapkv policies of one prefill must share snapkv_observe_tokens (one prefill records "
          "one observation window)");
    }
    observe_tokens = plan->config.snapkv_observe_tokens;
  }
  if (std::any_of(plans.begin(), plans.end(),
                  [](const auto& p) { return policy_needs_stats(p->config); })) {
    obs.stats = std::make_shared<AttentionStats>();
    obs.stats->reset(c.n_layers, c.n_kv_heads, n, std::max<int64_t>(0, n - observe_tokens));
  }
  obs.gates.resize(plans.size());
  obs.fan.add(forward.layer_observer());
  for (size_t i = 0; i < plans.size(); ++i) {
    if (!policy_uses_gate(plans[i]->config)) continue;
    obs.gates[i] = std::make_unique<GatePrefill>(*plans[i]->config.gate, plans[i]->layout, n,
                                                 forward.options().isa);
    obs.fan.add(obs.gates[i].get());
    obs.any_gate = true;
  }
  return Status();
}

// The full-attention prefill of `tokens` into a dense cache of
// capacity_tokens, with the observers installed for its duration.
Result<std::unique_ptr<KvCache>> run_dense_prefill(CpuForward& forward, PrefillObservers& obs,
                                                   std::span<const int32_t> tokens,
                                                   int64_t capacity_tokens, float* logits,
                                                   double* prefill_seconds) {
  auto dense = std::make_unique<KvCache>(forward.model().config(), capacity_tokens);
  const auto t0 = Clock::now();
  std::optional<LayerObserverScope> scope;
  if (obs.any_gate) scope.emplace(forward, &obs.fan);
  KVGATE_RETURN_IF_ERROR(forward.prefill(*dense, tokens, logits, obs.stats.get()));
  if (prefill_seconds != nullptr) *prefill_seconds = seconds_since(t0);
  return dense;
}

// The dense K/V of a prefilled cache as build_from_dense reads it.
kvstore::DenseKv dense_view(const LlamaConfig& c, const KvCache& dense) {
  const int64_t plane = c.n_kv_heads * dense.capacity() * c.head_dim;
  return kvstore::DenseKv{dense.k(0, 0), dense.k(0, 0) + plane, c.head_dim, 2 * plane,
                          dense.capacity() * c.head_dim};
}

// Flags (and gate rows) of the n prompt tokens under `plan`; `gate` is the
// plan's GatePrefill (null for policies without a gate).
Status prompt_flags(const PolicyPlan& plan, GatePrefill* gate, const AttentionStats* stats,
                    int64_t n, std::vector<uint8_t>& flags, std::vector<fp16_t>& gate_rows,
                    kvstore::DenseGate& dense_gate) {
  dense_gate = {};
  if (gate != nullptr) {
    KVGATE_RETURN_IF_ERROR(gate->finish(plan.config.effective_gate_decision(), flags, gate_rows));
    dense_gate = gate->dense_gate(gate_rows);
    return Status();
  }
  return policy_flags(plan.config, plan.layout, 0, n, flags, stats);
}

Status check_prefill_args(const LlamaConfig& c, std::span<const int32_t> tokens,
                          int64_t capacity_tokens, std::span<float> logits) {
  const auto n = static_cast<int64_t>(tokens.size());
  if (n == 0) return invalid_argument("prompt is empty");
  if (capacity_tokens < n) {
    return invalid_argument("capacity of " + std::to_string(capacity_tokens) +
                            " tokens is below the prompt's " + std::to_string(n));
  }
  if (static_cast<int64_t>(logits.size()) < c.n_vocab) {
    return invalid_argument("logits buffer smaller than the vocabulary");
  }
  return Status();
}

}  // namespace

Result<int64_t> compressed_pool_bytes(const kvstore::KvLayout& layout, int64_t capacity_tokens,
                                      int64_t page_bytes) {
  if (page_bytes <= 0) return invalid_argument("page_bytes must be > 0");
  // The footprint with every distant token retained, plus one partly filled
  // page per page list (a K and a V ring per (layer, head); per slot its
  // base keys, positions, gate ring and gate list, and a V list per block
  // layer), so the pool is never the limit of one sequence.
  KVGATE_ASSIGN_OR_RETURN(int64_t most, kvstore::predict_bytes(layout, capacity_tokens, 0, 1.0));
  const int64_t pairs = layout.n_layers() * layout.n_kv_heads();
  const int64_t lists = 3 * pairs + 4 * layout.blocks.n_slots();
  return most + (lists + 1) * page_bytes;
}

double cache_keep_rate(const kvstore::CompressedKvCache& cache) {
  const kvstore::KvLayout& layout = cache.layout();
  const int64_t distant = layout.distant_tokens(cache.n_tokens());
  const int64_t n_slots = layout.blocks.n_slots();
  if (distant == 0 || n_slots == 0) return 1.0;
  int64_t retained = 0;
  for (int64_t s = 0; s < n_slots; ++s) retained += cache.retained_tokens(s);
  return static_cast<double>(retained) / (static_cast<double>(n_slots) * static_cast<double>(distant));
}

Result<std::shared_ptr<const PolicyPlan>> plan_kv_policy(const LlamaConfig& config,
                                                         const KvPolicyConfig& policy) {
  auto plan = std::make_shared<PolicyPlan>();
  plan->config = policy;
  KVGATE_ASSIGN_OR_RETURN(plan->layout, make_kv_layout(config, policy));
  plan->name = kv_policy_name(policy.policy);
  plan->blocks = kv_policy_blocks(policy);
  return std::shared_ptr<const PolicyPlan>(std::move(plan));
}

PolicySequence::PolicySequence(CpuForward& forward, std::shared_ptr<const PolicyPlan> plan,
                               int64_t capacity_tokens)
    : forward_(forward), plan_(std::move(plan)), capacity_tokens_(capacity_tokens) {}

PolicySequence::~PolicySequence() = default;

int64_t PolicySequence::n_tokens() const {
  return dense_ ? dense_->n_tokens() : cache_->n_tokens();
}

int64_t PolicySequence::kv_dense_bytes() const {
  return forward_.model().kv_bytes_per_token() * n_tokens();
}

int64_t PolicySequence::kv_bytes() const {
  return dense_ ? kv_dense_bytes() : cache_->bytes();
}

double PolicySequence::keep_rate() const {
  return dense_ ? 1.0 : cache_keep_rate(*cache_);
}

Status PolicySequence::decode(int32_t token, std::span<float> logits) {
  if (static_cast<int64_t>(logits.size()) < forward_.model().config().n_vocab) {
    return invalid_argument("logits buffer smaller than the vocabulary");
  }
  if (n_tokens() + 1 > capacity_tokens_) {
    return out_of_range("sequence of " + std::to_string(n_tokens() + 1) +
                        " tokens exceeds its capacity of " + std::to_string(capacity_tokens_));
  }
  if (dense_) {
    BatchItem item{dense_.get(), std::span<const int32_t>(&token, 1), true};
    return forward_.forward(std::span<const BatchItem>(&item, 1), logits.data());
  }
  if (gate_decoder_) {
    // Flags deferred (empty): the decoder sets them at each slot's base layer.
    kvstore::CompressedKvCache* caches[1] = {&*cache_};
    gate_decoder_->bind(caches, gate_decision_);
    LayerInputObserver* previous = forward_.layer_observer();
    PairObserver both(previous, gate_decoder_.get());
    LayerObserverScope scope(forward_, previous != nullptr ? static_cast<LayerInputObserver*>(&both)
                                                      : gate_decoder_.get());
    CompressedItem item{&*cache_, token, {}, true};
    KVGATE_RETURN_IF_ERROR(
        forward_.forward_compressed(std::span<const CompressedItem>(&item, 1), logits.data()));
    return gate_decoder_->status();
  }
  KVGATE_RETURN_IF_ERROR(
      policy_flags(plan_->config, plan_->layout, cache_->n_tokens(), 1, flags_, stats_.get()));
  CompressedItem item{&*cache_, token, flags_, true};
  return forward_.forward_compressed(std::span<const CompressedItem>(&item, 1), logits.data());
}

Result<std::vector<std::unique_ptr<PolicySequence>>> prefill_for_policies(
    CpuForward& forward, std::span<const std::shared_ptr<const PolicyPlan>> plans,
    std::span<const int32_t> tokens, int64_t capacity_tokens, std::span<float> logits,
    double* prefill_seconds) {
  const LlamaConfig& c = forward.model().config();
  const auto n = static_cast<int64_t>(tokens.size());
  if (plans.empty()) return invalid_argument("no KV policy to prefill for");
  KVGATE_RETURN_IF_ERROR(check_prefill_args(c, tokens, capacity_tokens, logits));

  PrefillObservers obs;
  KVGATE_RETURN_IF_ERROR(make_observers(forward, plans, n, obs));
  KVGATE_ASSIGN_OR_RETURN(auto dense, run_dense_prefill(forward, obs, tokens, capacity_tokens,
                                                        logits.data(), prefill_seconds));

  // Fork: compressed caches are built from the dense K/V first; the dense
  // cache itself then goes to the last dense plan (earlier ones get copies).
  const kvstore::DenseKv kv = dense_view(c, *dense);
  std::vector<std::unique_ptr<PolicySequence>> out;
  out.reserve(plans.size());
  int64_t last_dense = -1;
  std::vector<uint8_t> flags;
  std::vector<fp16_t> gate_rows;
  for (size_t i = 0; i < plans.size(); ++i) {
    const PolicyPlan& plan = *plans[i];
    std::unique_ptr<PolicySequence> seq(new PolicySequence(forward, plans[i], capacity_tokens));
    if (plan.config.policy == KvPolicy::kDense) {
      if (last_dense >= 0) out[last_dense]->dense_ = std::make_unique<KvCache>(*dense);
      last_dense = static_cast<int64_t>(i);
      out.push_back(std::move(seq));
      continue;
    }
    const auto t0 = Clock::now();
    kvstore::DenseGate dense_gate;
    KVGATE_RETURN_IF_ERROR(
        prompt_flags(plan, obs.gates[i].get(), obs.stats.get(), n, flags, gate_rows, dense_gate));
    if (obs.gates[i]) {
      seq->gate_decoder_ =
          std::make_unique<GateDecoder>(*plan.config.gate, plan.layout, forward.options().isa);
      seq->gate_decision_ = plan.config.effective_gate_decision();
    } else if (policy_needs_stats(plan.config)) {
      seq->stats_ = obs.stats;
    }
    KVGATE_ASSIGN_OR_RETURN(seq->pool_, make_pool(plan.layout, capacity_tokens));
    KVGATE_ASSIGN_OR_RETURN(auto built, kvstore::CompressedKvCache::build_from_dense(
                                            plan.layout, seq->pool_.get(), n, kv, flags, dense_gate));
    seq->cache_.emplace(std::move(built));
    seq->compress_seconds_ = seconds_since(t0);
    obs.gates[i].reset();  // its per-token projections are no longer needed
    out.push_back(std::move(seq));
  }
  if (last_dense >= 0) out[last_dense]->dense_ = std::move(dense);
  return out;
}

Result<CompressedPrefill> prefill_compressed(CpuForward& forward,
                                             const std::shared_ptr<const PolicyPlan>& plan,
                                             std::span<const int32_t> tokens,
                                             kvstore::PagePool* pool, std::span<float> logits) {
  CompressedPrefillJob job{plan, tokens, pool, logits, {}};
  auto out = prefill_compressed_batch(forward, std::span(&job, 1));
  if (!out.ok()) return out.status();
  return std::move((*out)[0]);
}

namespace {

// One job's state during prefill_compressed_batch.
struct StreamJob {
  CompressedPrefillJob* job = nullptr;
  int64_t n = 0;
  std::unique_ptr<KvCache> dense;
  PrefillObservers obs;
  std::optional<kvstore::CompressedKvCache> cache;
  std::vector<kvstore::WireSlotGroup> groups;
  size_t next_group = 0;
  std::vector<uint8_t> flags;
  std::vector<fp16_t> gate_rows;
  bool flags_ready = false;  // policies whose flags need no layer (dense, window, pod)
  double compress_seconds = 0.0;
  Status status;  // first error; the job gets no more work after it
};

// Builds and hands out the wire segments of `j` whose last layer is `layer`.
Status ship_groups(const LlamaConfig& c, StreamJob& j, int64_t layer) {
  const PolicyPlan& plan = *j.job->plan;
  const kvstore::DenseKv kv = dense_view(c, *j.dense);
  while (j.next_group < j.groups.size() && j.groups[j.next_group].last_layer == layer) {
    const kvstore::WireSlotGroup& group = j.groups[j.next_group];
    kvstore::DenseGate dense_gate;
    if (GatePrefill* gate = j.obs.gates[0].get(); gate != nullptr) {
      KVGATE_RETURN_IF_ERROR(gate->finish_slots(plan.config.effective_gate_decision(), group.slots,
                                                j.flags, j.gate_rows));
      dense_gate = gate->dense_gate(j.gate_rows);
    } else if (policy_needs_stats(plan.config)) {
      // Ranked by the attention the tokens received in the group's layers,
      // which are complete now; only the group's slots.
      KVGATE_RETURN_IF_ERROR(
          policy_flags(plan.config, plan.layout, 0, j.n, j.flags, j.obs.stats.get(), group.slots));
    } else if (!j.flags_ready) {
      KVGATE_RETURN_IF_ERROR(policy_flags(plan.config, plan.layout, 0, j.n, j.flags, nullptr));
      j.flags_ready = true;
    }
    for (int64_t s : group.slots) {
      KVGATE_RETURN_IF_ERROR(j.cache->fill_slot(
          s, kv, std::span<const uint8_t>(j.flags.data() + s * j.n, static_cast<size_t>(j.n)),
          dense_gate));
    }
    if (j.job->on_segment) {
      KVGATE_ASSIGN_OR_RETURN(auto pages, kvstore::wire_group_pages(*j.cache, group));
      KVGATE_RETURN_IF_ERROR(j.job->on_segment(static_cast<int64_t>(j.next_group), group, pages));
    }
    ++j.next_group;
  }
  return Status();
}

}  // namespace

Result<std::vector<Result<CompressedPrefill>>> prefill_compressed_batch(
    CpuForward& forward, std::span<CompressedPrefillJob> jobs,
    const std::function<Status(int64_t layer)>& on_layer) {
  const LlamaConfig& c = forward.model().config();
  if (jobs.empty()) return invalid_argument("no prefill jobs");
  std::vector<StreamJob> state(jobs.size());
  std::vector<PrefillSequence> seqs;
  seqs.reserve(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    CompressedPrefillJob& job = jobs[i];
    StreamJob& j = state[i];
    j.job = &job;
    j.n = static_cast<int64_t>(job.tokens.size());
    if (!job.plan) return invalid_argument("prefill job " + std::to_string(i) + " has no KV policy");
    if (job.pool == nullptr) {
      return invalid_argument("prefill job " + std::to_string(i) + " has no page pool");
    }
    KVGATE_RETURN_IF_ERROR(check_prefill_args(c, job.tokens, j.n, job.logits));
    if (policy_needs_stats(job.plan->config) && jobs.size() != 1) {
      return invalid_argument(std::string("KV policy '") + job.plan->name +
                              "' ranks tokens by attention statistics: its prefill runs alone");
    }
    KVGATE_ASSIGN_OR_RETURN(auto cache,
                            kvstore::CompressedKvCache::begin_build(job.plan->layout, job.pool, j.n));
    j.cache.emplace(std::move(cache));
    j.groups = kvstore::wire_slot_groups(job.plan->layout);
    KVGATE_RETURN_IF_ERROR(make_observers(forward, std::span(&job.plan, 1), j.n, j.obs));
    j.dense = std::make_unique<KvCache>(c, j.n);
    seqs.push_back(PrefillSequence{j.dense.get(), job.tokens, j.obs.gates[0].get(),
                                   j.obs.stats.get(), job.logits.data()});
  }

  const auto t0 = Clock::now();
  auto layer_done = [&](int64_t layer) -> Status {
    for (StreamJob& j : state) {
      if (!j.status.ok()) continue;
      const auto t = Clock::now();
      j.status = ship_groups(c, j, layer);
      j.compress_seconds += seconds_since(t);
    }
    return on_layer ? on_layer(layer) : Status();
  };
  KVGATE_RETURN_IF_ERROR(forward.prefill_layers(seqs, layer_done));
  const double wall = seconds_since(t0);

  std::vector<Result<CompressedPrefill>> out;
  out.reserve(state.size());
  for (StreamJob& j : state) {
    if (j.status.ok()) j.status = j.cache->finish_build();
    if (!j.status.ok()) {
      out.push_back(j.status);
      continue;
    }
    out.push_back(CompressedPrefill{std::move(*j.cache), std::max(0.0, wall - j.compress_seconds),
                                    j.compress_seconds});
  }
  return out;
}

}  // namespace kvgate::engine
