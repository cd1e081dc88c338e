#include "kvstore/layout.h"

#include <string>

namespace kvgate::kvstore {

Status validate_layout(const KvLayout& layout) {
  if (layout.blocks.n_layers() < 1 || layout.blocks.n_kv_heads() < 1) {
    return invalid_argument("kv layout: block map is empty (no layers or no KV heads)");
  }
  if (layout.head_dim < 1 || layout.head_dim > kMaxHeadDim) {
    return invalid_argument("kv layout: head_dim " + std::to_string(layout.head_dim) +
                            " not in [1, " + std::to_string(kMaxHeadDim) + "]");
  }
  if (layout.n_sink_tokens < 0 || layout.n_sink_tokens >= kMaxTokens) {
    return invalid_argument("kv layout: n_sink_tokens " + std::to_string(layout.n_sink_tokens) +
                            " out of range");
  }
  // The newest token must meet its own key at every layer, so the window
  // holds at least it.
  if (layout.n_window_tokens < 1 || layout.n_window_tokens >= kMaxTokens) {
    return invalid_argument("kv layout: n_window_tokens " + std::to_string(layout.n_window_tokens) +
                            " must be >= 1");
  }
  if (layout.elem_bytes != kKvElementBytes) {
    return invalid_argument("kv layout: elem_bytes " + std::to_string(layout.elem_bytes) +
                            " unsupported (K/V are fp16: 2)");
  }
  if (layout.gate_state_bytes_per_token < 0) {
    return invalid_argument("kv layout: gate_state_bytes_per_token is negative");
  }
  if (layout.gate_state_bytes_per_token % kGateElementBytes != 0) {
    return invalid_argument("kv layout: gate_state_bytes_per_token " +
                            std::to_string(layout.gate_state_bytes_per_token) +
                            " is not a whole number of fp16 values (must be even)");
  }
  return Status();
}

}  // namespace kvgate::kvstore
