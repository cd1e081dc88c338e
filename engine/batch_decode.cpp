#include "engine/batch_decode.h"

#include <algorithm>
#include <cstring>

#include "kvstore/footprint.h"

namespace kvgate::engine {

int64_t max_append_pages(const kvstore::CompressedKvCache& cache) {
  const kvstore::KvLayout& layout = cache.layout();
  const int64_t n = cache.n_tokens();
  const int64_t page_tokens = cache.page_tokens();
  const int64_t gate_rows = cache.gate_rows_per_page();
  const int64_t n_slots = layout.blocks.n_slots();
  int64_t need = 0;
  if (n < layout.n_proximal_capacity()) {
    // The ring still fills: row n is new; a page round when it starts a page.
    if (n % page_tokens == 0) need += 2 * layout.n_layers() * layout.n_kv_heads();
    if (gate_rows > 0 && n % gate_rows == 0) need += n_slots;
    return need;
  }
  // Token n - n_window leaves the window now (never a sink here: n >= cap).
  const int64_t positions_per_page = cache.geometry().positions_per_page;
  // Gates whose context is the window keep no gate rows for retained tokens.
  const int64_t retained_gate_rows = cache.retained_gate_rows_per_page();
  for (int64_t s = 0; s < n_slots; ++s) {
    const int64_t r = cache.retained_tokens(s);
    const int64_t g = layout.blocks.slot_block(s).n_layers;
    if (r % page_tokens == 0) need += 1 + g;
    if (r % positions_per_page == 0) need += 1;
    if (retained_gate_rows > 0 && r % retained_gate_rows == 0) need += 1;
  }
  return need;
}

BatchDecoder::BatchDecoder(CpuForward& forward) : forward_(forward) {}

void BatchDecoder::forget_plan(const PolicyPlan* plan) {
  gate_decoders_.erase(plan);
}

Status step_by_plan(std::span<const DecodeItem> items, std::span<float> logits, int64_t n_vocab,
                    std::span<Status> statuses, size_t max_group, std::vector<size_t>& order,
                    const char* what,
                    const std::function<Status(std::span<const size_t> members)>& run_group) {
  if (statuses.size() != items.size()) {
    return invalid_argument(std::string(what) + ": " + std::to_string(statuses.size()) +
                            " statuses for " + std::to_string(items.size()) + " items");
  }
  if (static_cast<int64_t>(logits.size()) < static_cast<int64_t>(items.size()) * n_vocab) {
    return invalid_argument(std::string(what) + ": logits buffer smaller than items x vocabulary");
  }
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].plan == nullptr || items[i].cache == nullptr) {
      return invalid_argument(std::string(what) + ": item " + std::to_string(i) +
                              " has no plan or cache");
    }
  }
  // Group by plan, keeping item order within a group (stable).
  order.resize(items.size());
  for (size_t i = 0; i < items.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return items[a].plan < items[b].plan; });
  max_group = std::max<size_t>(1, max_group);
  size_t at = 0;
  while (at < order.size()) {
    size_t end = at + 1;
    while (end < order.size() && items[order[end]].plan == items[order[at]].plan &&
           end - at < max_group) {
      ++end;
    }
    const std::span<const size_t> members(order.data() + at, end - at);
    const Status s = run_group(members);
    for (size_t m : members) statuses[m] = s;
    at = end;
  }
  return Status();
}

Status group_items(const PolicyPlan& plan, std::span<const size_t> members,
                   std::span<const DecodeItem> items, std::vector<std::vector<uint8_t>>& flags,
                   std::vector<CompressedItem>& batch, const char* what) {
  batch.clear();
  if (policy_uses_gate(plan.config)) {
    if (!plan.config.gate) {
      return failed_precondition(std::string(what) + ": policy '" + plan.name +
                                 "' has no gate model");
    }
    for (size_t m : members) batch.push_back(CompressedItem{items[m].cache, items[m].token, {}, true});
    return Status();
  }
  if (flags.size() < members.size()) flags.resize(members.size());
  for (size_t k = 0; k < members.size(); ++k) {
    const DecodeItem& item = items[members[k]];
    AttentionStats prompt_only;
    prompt_only.n_tokens = item.prompt_tokens;
    const AttentionStats* stats = policy_needs_stats(plan.config) ? &prompt_only : nullptr;
    if (stats != nullptr && item.cache->n_tokens() < item.prompt_tokens) {
      return invalid_argument(std::string(what) + ": a sequence shorter than its prompt");
    }
    KVGATE_RETURN_IF_ERROR(
        policy_flags(plan.config, plan.layout, item.cache->n_tokens(), 1, flags[k], stats));
    batch.push_back(CompressedItem{item.cache, item.token, flags[k], true});
  }
  return Status();
}

void scatter_group_logits(std::span<const size_t> members, std::span<const float> group_logits,
                          int64_t n_vocab, std::span<float> logits) {
  const auto v = static_cast<size_t>(n_vocab);
  for (size_t k = 0; k < members.size(); ++k) {
    std::memcpy(logits.data() + members[k] * v, group_logits.data() + k * v, v * sizeof(float));
  }
}

Status BatchDecoder::step(std::span<const DecodeItem> items, std::span<float> logits,
                          std::span<Status> statuses) {
  return step_by_plan(items, logits, forward_.model().config().n_vocab, statuses,
                      static_cast<size_t>(forward_.options().max_batch_tokens), order_,
                      "batch decode", [&](std::span<const size_t> members) {
                        return run_group(members, items, logits);
                      });
}

Status BatchDecoder::run_group(std::span<const size_t> members, std::span<const DecodeItem> items,
                               std::span<float> logits) {
  const int64_t n_vocab = forward_.model().config().n_vocab;
  const PolicyPlan& plan = *items[members[0]].plan;
  group_logits_.resize(members.size() * static_cast<size_t>(n_vocab));
  KVGATE_RETURN_IF_ERROR(group_items(plan, members, items, flags_, batch_, "batch decode"));
  Status run;
  if (policy_uses_gate(plan.config)) {
    auto& decoder = gate_decoders_[&plan];
    if (!decoder) {
      decoder = std::make_unique<GateDecoder>(*plan.config.gate, plan.layout, forward_.options().isa);
    }
    caches_.clear();
    for (size_t m : members) caches_.push_back(items[m].cache);
    decoder->bind(caches_, plan.config.effective_gate_decision());
    {
      LayerObserverScope scope(forward_, decoder.get());
      run = forward_.forward_compressed(batch_, group_logits_.data());
    }
    if (run.ok()) run = decoder->status();
  } else {
    run = forward_.forward_compressed(batch_, group_logits_.data());
  }
  if (!run.ok()) return run;
  scatter_group_logits(members, group_logits_, n_vocab, logits);
  return Status();
}

}  // namespace kvgate::engine
