#include "kvstore/footprint.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace kvgate::kvstore {
namespace {

Status validate_length(int64_t n_tokens, const char* what) {
  if (n_tokens < 0 || n_tokens > kMaxTokens) {
    return invalid_argument(std::string(what) + " " + std::to_string(n_tokens) +
                            " not in [0, 2^31]");
  }
  return Status();
}

// The formula, given R per slot through `retained(slot)`; inputs validated.
template <typename RetainedFn>
Footprint formula(const KvLayout& layout, int64_t n_tokens, RetainedFn retained) {
  const BlockMap& map = layout.blocks;
  const int64_t p = layout.proximal_tokens(n_tokens);
  int64_t kv_elems = 0;
  int64_t r_sum = 0;
  for (int64_t s = 0; s < map.n_slots(); ++s) {
    const int64_t g = map.slot_block(s).n_layers;
    const int64_t r = retained(s);
    kv_elems += 2 * g * p + (g + 1) * r;
    r_sum += r;
  }
  Footprint f;
  f.kv_bytes = layout.elem_bytes * layout.head_dim * kv_elems;
  f.position_bytes = kPositionBytes * r_sum;
  f.gate_bytes = layout.gate_state_bytes_per_token * map.n_slots() * p +
                 layout.retained_gate_bytes_per_token() * r_sum;
  return f;
}

Status validate_prediction(const KvLayout& layout, int64_t prompt_tokens, int64_t max_new_tokens) {
  KVGATE_RETURN_IF_ERROR(validate_layout(layout));
  KVGATE_RETURN_IF_ERROR(validate_length(prompt_tokens, "prompt_tokens"));
  KVGATE_RETURN_IF_ERROR(validate_length(max_new_tokens, "max_new_tokens"));
  return validate_length(prompt_tokens + max_new_tokens, "prompt_tokens + max_new_tokens");
}

}  // namespace

Result<Footprint> footprint(const KvLayout& layout, int64_t n_tokens,
                            std::span<const int64_t> retained_tokens) {
  KVGATE_RETURN_IF_ERROR(validate_layout(layout));
  KVGATE_RETURN_IF_ERROR(validate_length(n_tokens, "n_tokens"));
  const int64_t n_slots = layout.blocks.n_slots();
  if (static_cast<int64_t>(retained_tokens.size()) != n_slots) {
    return invalid_argument("footprint: " + std::to_string(retained_tokens.size()) +
                            " retained counts for " + std::to_string(n_slots) +
                            " (block, head) slots");
  }
  const int64_t distant = layout.distant_tokens(n_tokens);
  for (int64_t s = 0; s < n_slots; ++s) {
    if (retained_tokens[s] < 0 || retained_tokens[s] > distant) {
      return invalid_argument("footprint: slot " + std::to_string(s) + " retains " +
                              std::to_string(retained_tokens[s]) + " tokens, not in [0, " +
                              std::to_string(distant) + "] distant tokens");
    }
  }
  return formula(layout, n_tokens, [&](int64_t s) { return retained_tokens[s]; });
}

int64_t dense_bytes(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim, int64_t elem_bytes,
                    int64_t n_tokens) {
  return 2 * n_layers * n_kv_heads * head_dim * elem_bytes * n_tokens;
}

int64_t retained_for_keep_rate(double keep_rate, int64_t distant_tokens) {
  const double x = keep_rate * static_cast<double>(distant_tokens);
  const double nearest = std::round(x);
  if (std::abs(x - nearest) <= 1e-9 * std::max(1.0, std::abs(x))) {
    return static_cast<int64_t>(nearest);
  }
  return static_cast<int64_t>(std::ceil(x));
}

Result<Footprint> predict_footprint(const KvLayout& layout, int64_t prompt_tokens,
                                    int64_t max_new_tokens, double keep_rate) {
  KVGATE_RETURN_IF_ERROR(validate_prediction(layout, prompt_tokens, max_new_tokens));
  if (!(keep_rate >= 0.0 && keep_rate <= 1.0)) {  // also rejects NaN
    return invalid_argument("keep_rate " + std::to_string(keep_rate) + " not in [0, 1]");
  }
  const int64_t t = prompt_tokens + max_new_tokens;
  const int64_t r = retained_for_keep_rate(keep_rate, layout.distant_tokens(t));
  return formula(layout, t, [r](int64_t) { return r; });
}

Result<Footprint> predict_footprint(const KvLayout& layout, int64_t prompt_tokens,
                                    int64_t max_new_tokens,
                                    std::span<const int64_t> budget_tokens) {
  KVGATE_RETURN_IF_ERROR(validate_prediction(layout, prompt_tokens, max_new_tokens));
  const int64_t n_slots = layout.blocks.n_slots();
  if (static_cast<int64_t>(budget_tokens.size()) != n_slots) {
    return invalid_argument("budget: " + std::to_string(budget_tokens.size()) + " entries for " +
                            std::to_string(n_slots) + " (block, head) slots");
  }
  for (int64_t s = 0; s < n_slots; ++s) {
    if (budget_tokens[s] < 0) {
      return invalid_argument("budget: slot " + std::to_string(s) + " is negative");
    }
  }
  const int64_t t = prompt_tokens + max_new_tokens;
  const int64_t distant = layout.distant_tokens(t);
  return formula(layout, t, [&](int64_t s) { return std::min(budget_tokens[s], distant); });
}

Result<int64_t> predict_bytes(const KvLayout& layout, int64_t prompt_tokens, int64_t max_new_tokens,
                              double keep_rate) {
  KVGATE_ASSIGN_OR_RETURN(const Footprint f,
                          predict_footprint(layout, prompt_tokens, max_new_tokens, keep_rate));
  return f.total_bytes();
}

Result<int64_t> predict_bytes(const KvLayout& layout, int64_t prompt_tokens, int64_t max_new_tokens,
                              std::span<const int64_t> budget_tokens) {
  KVGATE_ASSIGN_OR_RETURN(const Footprint f,
                          predict_footprint(layout, prompt_tokens, max_new_tokens, budget_tokens));
  return f.total_bytes();
}

Result<PageGeometry> page_geometry(const KvLayout& layout, int64_t page_bytes) {
  KVGATE_RETURN_IF_ERROR(validate_layout(layout));
  const std::string page = "page of " + std::to_string(page_bytes) + " bytes";
  if (page_bytes <= 0) return invalid_argument("page geometry: " + page + " is not positive");
  const int64_t row_bytes = kKvElementBytes * layout.head_dim;
  if (page_bytes % row_bytes != 0) {
    return invalid_argument("page geometry: " + page + " is not a whole number of " +
                            std::to_string(row_bytes) + "-byte K/V rows");
  }
  if (page_bytes % kPositionBytes != 0) {
    return invalid_argument("page geometry: " + page + " is not a whole number of " +
                            std::to_string(kPositionBytes) + "-byte positions");
  }
  const int64_t gate_row_bytes = layout.gate_state_bytes_per_token;
  if (gate_row_bytes > 0 && page_bytes % gate_row_bytes != 0) {
    return invalid_argument("page geometry: " + page + " is not a whole number of " +
                            std::to_string(gate_row_bytes) + "-byte gate state rows");
  }
  PageGeometry g;
  g.page_bytes = page_bytes;
  g.page_tokens = page_bytes / row_bytes;
  g.positions_per_page = page_bytes / kPositionBytes;
  g.gate_rows_per_page = gate_row_bytes > 0 ? page_bytes / gate_row_bytes : 0;
  g.retained_gate_rows_per_page = layout.gate_state_retained ? g.gate_rows_per_page : 0;
  return g;
}

namespace {

// Pages of the state (n_tokens, R per slot through `retained(slot)`);
// inputs validated. At most ~2^31 · (2·L·H + slots · (g + 3)): no overflow
// for any layout validate_layout() accepts with int32 layer indices.
template <typename RetainedFn>
int64_t pages_of_state(const KvLayout& layout, const PageGeometry& geo, int64_t n_tokens,
                       RetainedFn retained) {
  const BlockMap& map = layout.blocks;
  const int64_t p = layout.proximal_tokens(n_tokens);
  int64_t pages = 2 * layout.n_layers() * layout.n_kv_heads() * geo.ring_pages(p) +
                  map.n_slots() * geo.gate_ring_pages(p);
  for (int64_t s = 0; s < map.n_slots(); ++s) {
    pages += geo.retained_pages(retained(s), map.slot_block(s).n_layers);
  }
  return pages;
}

}  // namespace

Result<int64_t> state_pages(const KvLayout& layout, int64_t page_bytes, int64_t n_tokens,
                            std::span<const int64_t> retained_tokens) {
  // footprint() validates the layout, the length and every count.
  KVGATE_RETURN_IF_ERROR(footprint(layout, n_tokens, retained_tokens).status());
  KVGATE_ASSIGN_OR_RETURN(const PageGeometry geo, page_geometry(layout, page_bytes));
  return pages_of_state(layout, geo, n_tokens, [&](int64_t s) { return retained_tokens[s]; });
}

Result<int64_t> state_capacity_bytes(const KvLayout& layout, int64_t page_bytes, int64_t n_tokens,
                                     std::span<const int64_t> retained_tokens) {
  KVGATE_ASSIGN_OR_RETURN(const int64_t pages,
                          state_pages(layout, page_bytes, n_tokens, retained_tokens));
  return pages * page_bytes;
}

Result<int64_t> predict_capacity_bytes(const KvLayout& layout, int64_t page_bytes,
                                       int64_t prompt_tokens, int64_t max_new_tokens,
                                       double keep_rate) {
  // Same validation and the same R as predict_footprint().
  KVGATE_RETURN_IF_ERROR(
      predict_footprint(layout, prompt_tokens, max_new_tokens, keep_rate).status());
  KVGATE_ASSIGN_OR_RETURN(const PageGeometry geo, page_geometry(layout, page_bytes));
  const int64_t t = prompt_tokens + max_new_tokens;
  const int64_t r = retained_for_keep_rate(keep_rate, layout.distant_tokens(t));
  return pages_of_state(layout, geo, t, [r](int64_t) { return r; }) * page_bytes;
}

Result<int64_t> predict_capacity_bytes(const KvLayout& layout, int64_t page_bytes,
                                       int64_t prompt_tokens, int64_t max_new_tokens,
                                       std::span<const int64_t> budget_tokens) {
  KVGATE_RETURN_IF_ERROR(
      predict_footprint(layout, prompt_tokens, max_new_tokens, budget_tokens).status());
  KVGATE_ASSIGN_OR_RETURN(const PageGeometry geo, page_geometry(layout, page_bytes));
  const int64_t t = prompt_tokens + max_new_tokens;
  const int64_t distant = layout.distant_tokens(t);
  return pages_of_state(layout, geo, t,
                        [&](int64_t s) { return std::min(budget_tokens[s], distant); }) *
         page_bytes;
}

}  // namespace kvgate::kvstore
