// Gates for tests: a ragged block map and a random, valid GateModel for a
// model's shapes (engine/gate.h), shared by the gate runtime and prefill
// tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <random>
#include <vector>

#include "engine/gate.h"
#include "engine/gate_file.h"
#include "engine/kv_policy_spec.h"
#include "engine/model.h"
#include "kvstore/block_map.h"

namespace kvgate::engine {

using kvstore::BlockMap;
using kvstore::LayerBlock;

// Blocks of `g0` layers for head 0 and `g` layers for the other heads (the
// last block of a head shorter when needed): a ragged map.
inline BlockMap ragged_blocks(int64_t n_layers, int64_t n_kv_heads, int64_t g0, int64_t g) {
  std::vector<std::vector<LayerBlock>> per_head(static_cast<size_t>(n_kv_heads));
  for (int64_t h = 0; h < n_kv_heads; ++h) {
    const int64_t size = h == 0 ? g0 : g;
    for (int64_t l = 0; l < n_layers; l += size) {
      per_head[h].push_back({static_cast<int32_t>(l), static_cast<int32_t>(std::min(size, n_layers - l))});
    }
  }
  auto map = BlockMap::create(n_layers, std::move(per_head));
  EXPECT_TRUE(map.ok()) << map.status().to_string();
  return *map;
}

// A gate of `kind` for the shapes of `fingerprint`, blocks of 3 layers for
// head 0 and 2 for the others, random weights N(0, 1/sqrt(n_embd)) (wo of
// the attention kind N(0, 1) so logits are of order |v|), bias and
// threshold 0.
inline GateModel random_gate(const ModelFingerprint& fingerprint, GateKind kind, uint32_t seed) {
  GateModel g;
  g.model = fingerprint;
  g.blocks = ragged_blocks(fingerprint.n_layers, fingerprint.n_kv_heads, 3, 2);
  g.kind = kind;
  g.n_embd = fingerprint.n_embd;
  g.n_gate_heads = kind == GateKind::kAttention ? 2 : 0;
  g.gate_head_dim = kind == GateKind::kAttention ? 4 : 0;
  g.n_sink_tokens = 4;
  g.n_window_tokens = 16;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.n_embd));
  auto fill = [&](size_t n, float s) {
    std::vector<float> v(n);
    for (float& x : v) x = normal(rng) * s;
    return v;
  };
  g.slots.resize(static_cast<size_t>(g.blocks.n_slots()));
  const auto proj = static_cast<size_t>(g.gate_dim() * g.n_embd);
  for (GateSlot& s : g.slots) {
    if (kind == GateKind::kAttention) {
      s.wq = fill(proj, scale);
      s.wk = fill(proj, scale);
      s.wv = fill(proj, scale);
      s.wo = fill(static_cast<size_t>(g.gate_dim()), 1.0f);
    } else {
      s.wo = fill(static_cast<size_t>(g.n_embd), scale);
    }
  }
  EXPECT_TRUE(g.validate().ok()) << g.validate().to_string();
  return g;
}

// A gate for tests that need one, not a good one (shipping, batching,
// decode equality): the calibrated side file next to `model_path` when it
// exists (scripts/setup.sh makes it), else a seeded random attention gate
// of the model's shapes — so those tests run everywhere, CI included.
inline std::shared_ptr<const GateModel> calibrated_or_random_gate(const LlamaModel& model,
                                                                  const std::string& model_path) {
  const std::string path = default_gate_path(model_path);
  if (std::filesystem::exists(path)) {
    auto g = load_gate_for_model(path, model);
    EXPECT_TRUE(g.ok()) << g.status().to_string();
    if (g.ok()) return std::make_shared<const GateModel>(std::move(*g));
  }
  auto fp = fingerprint_model(model);
  EXPECT_TRUE(fp.ok()) << fp.status().to_string();
  if (!fp.ok()) return nullptr;
  GateModel g = random_gate(*fp, GateKind::kAttention, 17);
  // The calibrated file's proximal set (and the policies' defaults): a gate
  // supplies sinks and window to every policy, dense included, so a node
  // with this gate and one without agree on them as with the real file.
  g.n_sink_tokens = 4;
  g.n_window_tokens = 256;
  return std::make_shared<const GateModel>(std::move(g));
}

}  // namespace kvgate::engine
