// The records of a compressed decode step (engine/cuda/compressed_step.h),
// checked on the CPU: the tables are built for host-memory pages with the
// image placed at its own host address, then read back the way the CUDA
// kernels read them (page address arrays, row = page[r / per_page] + r %
// per_page) — a split attention with an online softmax over each task's
// rows, and the gate's logit over each gate task's rows. Those must equal
// kvstore::attend() and gate_attention_logit() over the caches themselves,
// for PoD blocks, retained distant tokens, caches shorter and longer than
// the window, and several items in one step.
#include "engine/cuda/compressed_step.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "engine/cpu/isa.h"
#include "engine/gate_math.h"
#include "kvstore/attention.h"
#include "kvstore/block_map.h"
#include "kvstore/page_pool.h"

namespace kvgate::engine::cuda {
namespace {

using kvstore::BlockMap;
using kvstore::CompressedKvCache;
using kvstore::KvLayout;
using kvstore::LayerBlock;

constexpr int64_t kLayers = 6;
constexpr int64_t kKvHeads = 2;
constexpr int64_t kHeads = 4;  // group 2
constexpr int64_t kHeadDim = 8;
constexpr int64_t kGateHeads = 2;
constexpr int64_t kGateHeadDim = 4;
constexpr int64_t kEmbd = 16;

// Head 0 in blocks of 3 layers, head 1 in blocks of 2: PoD with a ragged map.
BlockMap pod_blocks() {
  std::vector<std::vector<LayerBlock>> per_head(kKvHeads);
  for (int64_t l = 0; l < kLayers; l += 3) per_head[0].push_back({static_cast<int32_t>(l), 3});
  for (int64_t l = 0; l < kLayers; l += 2) per_head[1].push_back({static_cast<int32_t>(l), 2});
  return *BlockMap::create(kLayers, std::move(per_head));
}

KvLayout make_layout(const BlockMap& blocks, bool gate_state) {
  KvLayout lay;
  lay.blocks = blocks;
  lay.head_dim = kHeadDim;
  lay.n_sink_tokens = 2;
  lay.n_window_tokens = 5;
  lay.gate_state_bytes_per_token = gate_state ? 2 * kGateHeads * kGateHeadDim * 2 : 0;
  lay.gate_state_retained = false;
  return lay;
}

GateModel make_gate(std::mt19937& rng) {
  GateModel g;
  g.blocks = pod_blocks();
  g.kind = GateKind::kAttention;
  g.context = GateContext::kWindow;
  g.n_embd = kEmbd;
  g.n_gate_heads = kGateHeads;
  g.gate_head_dim = kGateHeadDim;
  g.n_sink_tokens = 2;
  g.n_window_tokens = 5;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  g.slots.resize(static_cast<size_t>(g.blocks.n_slots()));
  for (GateSlot& s : g.slots) {
    s.wo.resize(static_cast<size_t>(g.gate_dim()));
    for (float& x : s.wo) x = normal(rng);
    s.bias = normal(rng);
  }
  return g;
}

std::vector<fp16_t> random_half(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<fp16_t> v(n);
  for (auto& x : v) x = fp32_to_fp16(u(rng));
  return v;
}

// A cache of `len` tokens (random K/V/gate rows, random flags: about half
// retained), then begin_append of one more token whose rows are written.
CompressedKvCache make_cache(const KvLayout& lay, kvstore::PagePool& pool, int64_t len,
                             std::mt19937& rng) {
  auto c = CompressedKvCache::create(lay, &pool);
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  const int64_t n_slots = lay.blocks.n_slots();
  const int64_t row = kLayers * kKvHeads * kHeadDim;
  const int64_t gate_row = lay.gate_row_elems();
  std::bernoulli_distribution keep(0.5);
  for (int64_t t = 0; t < len; ++t) {
    const auto k = random_half(static_cast<size_t>(row), rng);
    const auto v = random_half(static_cast<size_t>(row), rng);
    const auto g = random_half(static_cast<size_t>(std::max<int64_t>(1, n_slots * gate_row)), rng);
    kvstore::TokenKv kv{k.data(), v.data(), kKvHeads * kHeadDim, kHeadDim,
                        gate_row > 0 ? g.data() : nullptr, gate_row};
    std::vector<uint8_t> flags(static_cast<size_t>(n_slots));
    for (auto& f : flags) f = keep(rng) ? 1 : 0;
    const Status st = c->append(t, kv, flags);
    EXPECT_TRUE(st.ok()) << st.to_string();
  }
  const Status st = c->begin_append(len, {});
  EXPECT_TRUE(st.ok()) << st.to_string();
  for (int64_t l = 0; l < kLayers; ++l) {
    for (int64_t h = 0; h < kKvHeads; ++h) {
      const auto k = random_half(kHeadDim, rng);
      const auto v = random_half(kHeadDim, rng);
      std::memcpy(c->new_k_row(l, h), k.data(), kHeadDim * 2);
      std::memcpy(c->new_v_row(l, h), v.data(), kHeadDim * 2);
    }
  }
  for (int64_t s = 0; s < n_slots && gate_row > 0; ++s) {
    const auto g = random_half(static_cast<size_t>(gate_row), rng);
    std::memcpy(c->new_gate_row(s), g.data(), static_cast<size_t>(gate_row) * 2);
  }
  return std::move(*c);
}

float half(const uint16_t* p, int64_t i) {
  return fp16_to_fp32(p[i]);
}

// The decode kernel's reading of one task for query head g of its group:
// fp16-rounded queries, proximal rows against q, distant rows against
// q_base, one online softmax.
void emulate_task(const AttnTask& t, int64_t g, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  float q[kHeadDim], qb[kHeadDim], acc[kHeadDim] = {};
  for (int64_t d = 0; d < kHeadDim; ++d) {
    q[d] = fp16_to_fp32(fp32_to_fp16(t.q[g * kHeadDim + d]));
    qb[d] = fp16_to_fp32(fp32_to_fp16(t.q_base[g * kHeadDim + d]));
  }
  const int64_t pt = 4;  // page_tokens of the 64-byte pages
  float m = -INFINITY, sum = 0.0f;
  const int64_t rows = t.near_tokens + t.far_tokens;
  for (int64_t r = 0; r < rows; ++r) {
    const bool near = r < t.near_tokens;
    const int64_t j = near ? r : r - t.near_tokens;
    const uint16_t* k = (near ? t.near_k : t.far_k)[j / pt] + (j % pt) * kHeadDim;
    const uint16_t* v = (near ? t.near_v : t.far_v)[j / pt] + (j % pt) * kHeadDim;
    const float* qq = near ? q : qb;
    float s = 0.0f;
    for (int64_t d = 0; d < kHeadDim; ++d) s += qq[d] * half(k, d);
    s *= scale;
    if (s > m) {
      const float f = std::exp(m - s);
      sum *= f;
      for (float& a : acc) a *= f;
      m = s;
    }
    const float p = std::exp(s - m);
    sum += p;
    for (int64_t d = 0; d < kHeadDim; ++d) acc[d] += p * half(v, d);
  }
  for (int64_t d = 0; d < kHeadDim; ++d) out[d] = acc[d] / sum;
}

struct Step {
  std::unique_ptr<kvstore::PagePool> pool;
  std::vector<CompressedKvCache> caches;
  std::vector<CompressedKvCache*> ptrs;
  std::vector<float> q_layers, attn_out;
  StepBuffers buffers;
  StepTables tables;
  std::vector<std::byte> placed;  // the "device": the image at its own address
  std::vector<int32_t> tokens;
};

// Builds a step over caches of the given lengths and places the image.
void build_step(Step& st, const KvLayout& lay, std::vector<int64_t> lengths,
                const GateSchedule* gate, std::mt19937& rng) {
  st.pool = std::move(kvstore::PagePool::create(64, 64 * 4096)).value();
  for (int64_t len : lengths) st.caches.push_back(make_cache(lay, *st.pool, len, rng));
  for (auto& c : st.caches) st.ptrs.push_back(&c);
  const int64_t cap = 8;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  st.q_layers.resize(static_cast<size_t>(kLayers * cap * kHeads * kHeadDim));
  for (float& x : st.q_layers) x = u(rng);
  st.attn_out.assign(static_cast<size_t>(cap * kHeads * kHeadDim), 0.0f);
  st.buffers = {st.q_layers.data(), st.attn_out.data(), cap};
  for (size_t i = 0; i < lengths.size(); ++i) st.tokens.push_back(static_cast<int32_t>(100 + i));
  const StepModelShape shape{kLayers, kHeads, kKvHeads, kHeadDim};
  auto size = st.tables.measure(shape, st.ptrs, gate, st.buffers);
  ASSERT_TRUE(size.ok()) << size.status().to_string();
  st.placed.resize(size->total + 64);
  auto base = reinterpret_cast<std::uintptr_t>(st.placed.data());
  base = (base + 63) & ~std::uintptr_t{63};
  const Status b = st.tables.build(shape, st.ptrs, st.tokens, gate, st.buffers, base);
  ASSERT_TRUE(b.ok()) << b.to_string();
  ASSERT_EQ(st.tables.image().size(), size->total);
  std::memcpy(reinterpret_cast<void*>(base), st.tables.image().data(), size->total);
}

const std::byte* placed_base(const Step& st) {
  auto base = reinterpret_cast<std::uintptr_t>(st.placed.data());
  return reinterpret_cast<const std::byte*>((base + 63) & ~std::uintptr_t{63});
}

TEST(CompressedStepTest, TasksAttendAsTheCacheDoes) {
  std::mt19937 rng(5);
  const KvLayout lay = make_layout(pod_blocks(), false);
  Step st;
  // Shorter than sinks + window, exactly full, and long with retained tokens.
  build_step(st, lay, {3, 6, 20, 41}, nullptr, rng);
  const StepTableOffsets& o = st.tables.offsets();
  const std::byte* dev = placed_base(st);
  const auto* tasks = reinterpret_cast<const AttnTask*>(dev + o.tasks);
  const int64_t n = 4, group = kHeads / kKvHeads, qd = kHeads * kHeadDim;
  int64_t with_far = 0;
  for (int64_t l = 0; l < kLayers; ++l) {
    for (int64_t i = 0; i < n; ++i) {
      const CompressedKvCache& c = *st.ptrs[i];
      for (int64_t h = 0; h < kKvHeads; ++h) {
        const AttnTask& t = tasks[(l * n + i) * kKvHeads + h];
        EXPECT_EQ(t.near_tokens, c.proximal_tokens());
        EXPECT_EQ(t.far_tokens, c.distant(l, h)->n_tokens());
        with_far += t.far_tokens > 0 ? 1 : 0;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t qh = h * group + g;
          const int64_t base = lay.blocks.base_layer(l, h);
          const float* q = st.q_layers.data() + (l * 8 + i) * qd + qh * kHeadDim;
          const float* qb = st.q_layers.data() + (base * 8 + i) * qd + qh * kHeadDim;
          float want[kHeadDim], got[kHeadDim];
          ASSERT_TRUE(kvstore::attend(c, l, qh, kHeads, q, qb, want, cpu::best_isa()).ok());
          emulate_task(t, g, got);
          for (int64_t d = 0; d < kHeadDim; ++d) {
            // attend() rounds probabilities to fp16 before V: ~2^-11 relative.
            EXPECT_NEAR(got[d], want[d], 2e-3) << "layer " << l << " item " << i << " head " << qh;
          }
          EXPECT_EQ(t.out + g * kHeadDim, st.attn_out.data() + i * qd + qh * kHeadDim);
        }
      }
    }
  }
  EXPECT_GT(with_far, 0);  // the long caches retained distant tokens
}

TEST(CompressedStepTest, RowsTokensAndPositions) {
  std::mt19937 rng(6);
  const KvLayout lay = make_layout(pod_blocks(), false);
  Step st;
  build_step(st, lay, {1, 9, 30}, nullptr, rng);
  const StepTableOffsets& o = st.tables.offsets();
  const std::byte* dev = placed_base(st);
  const auto* k_rows = reinterpret_cast<uint16_t* const*>(dev + o.k_rows);
  const auto* v_rows = reinterpret_cast<uint16_t* const*>(dev + o.v_rows);
  const auto* tok = reinterpret_cast<const int32_t*>(dev + o.tokens);
  const auto* pos = reinterpret_cast<const int32_t*>(dev + o.positions);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(tok[i], 100 + i);
    EXPECT_EQ(pos[i], st.ptrs[i]->n_tokens() - 1);
    for (int64_t l = 0; l < kLayers; ++l) {
      for (int64_t h = 0; h < kKvHeads; ++h) {
        const size_t r = static_cast<size_t>((l * 3 + i) * kKvHeads + h);
        EXPECT_EQ(reinterpret_cast<void*>(k_rows[r]), st.ptrs[i]->new_k_row(l, h));
        EXPECT_EQ(reinterpret_cast<void*>(v_rows[r]), st.ptrs[i]->new_v_row(l, h));
      }
    }
  }
}

TEST(CompressedStepTest, GateTasksReadTheProximalGateRows) {
  std::mt19937 rng(7);
  const GateModel gate = make_gate(rng);
  const KvLayout lay = make_layout(pod_blocks(), true);
  auto schedule = make_gate_schedule(gate, lay);
  ASSERT_TRUE(schedule.ok()) << schedule.status().to_string();
  // PoD layout = the gate's map: head 0 gated at layers 0 and 3, head 1 at
  // 0, 2, 4; every slot exactly once.
  int64_t gated = 0;
  for (int64_t l = 0; l < kLayers; ++l) {
    for (int32_t s : schedule->by_layer[l]) {
      EXPECT_EQ(lay.blocks.slot_block(s).first_layer, l);
      ++gated;
    }
  }
  EXPECT_EQ(gated, lay.blocks.n_slots());
  EXPECT_EQ(schedule->by_layer[0].size(), 2u);
  EXPECT_EQ(schedule->by_layer[1].size(), 0u);
  EXPECT_EQ(schedule->by_layer[3].size(), 1u);

  Step st;
  build_step(st, lay, {2, 7, 25}, &*schedule, rng);
  const std::byte* dev = placed_base(st);
  const int64_t D = gate.gate_dim();
  std::vector<float> scratch;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t l = 0; l < kLayers; ++l) {
    const auto& slots = schedule->by_layer[l];
    if (slots.empty()) continue;
    const auto* g = reinterpret_cast<const GateRowTask*>(dev + st.tables.offsets().gate_tasks[l]);
    for (int64_t i = 0; i < 3; ++i) {
      const CompressedKvCache& c = *st.ptrs[i];
      for (size_t j = 0; j < slots.size(); ++j) {
        const int64_t s = slots[j];
        const GateRowTask& t = g[i * static_cast<int64_t>(slots.size()) + j];
        EXPECT_EQ(reinterpret_cast<void*>(t.own_row), st.ptrs[i]->new_gate_row(s));
        auto rows = c.gate_proximal(s);
        ASSERT_TRUE(rows.ok());
        ASSERT_EQ(t.n_rows, rows->n_rows());
        std::vector<float> q(static_cast<size_t>(3 * D));
        for (float& x : q) x = u(rng);
        const int64_t gs = schedule->gate_slot[s];
        const float want = gate_attention_logit(gate, gs, q.data(), rows->n_rows(),
                                                [&](int64_t r) { return rows->row(r); }, scratch);
        const float got = gate_attention_logit(
            gate, gs, q.data(), t.n_rows,
            [&](int64_t r) {
              return reinterpret_cast<const fp16_t*>(t.pages[r / t.rows_per_page] +
                                                     (r % t.rows_per_page) * 2 * D);
            },
            scratch);
        EXPECT_EQ(got, want) << "layer " << l << " item " << i << " slot " << s;
      }
    }
  }
}

TEST(CompressedStepTest, GateScheduleOfSingleLayerBlocks) {
  // Policy `gate` (no key sharing): layout slots are single layers; each is
  // gated at the first layer of the gate block holding it, as GateDecoder.
  std::mt19937 rng(8);
  const GateModel gate = make_gate(rng);
  const KvLayout lay = make_layout(*BlockMap::dense(kLayers, kKvHeads), true);
  auto schedule = make_gate_schedule(gate, lay);
  ASSERT_TRUE(schedule.ok()) << schedule.status().to_string();
  for (int64_t l = 0; l < kLayers; ++l) {
    for (int32_t s : schedule->by_layer[l]) {
      const int64_t h = lay.blocks.slot_head(s);
      const int64_t layer = lay.blocks.slot_block(s).first_layer;
      EXPECT_EQ(gate.blocks.base_layer(layer, h), l);
    }
  }
  // Head 0's blocks of 3: layers 0, 1, 2 of head 0 are all gated at layer 0.
  int64_t head0_at0 = 0;
  for (int32_t s : schedule->by_layer[0]) head0_at0 += lay.blocks.slot_head(s) == 0 ? 1 : 0;
  EXPECT_EQ(head0_at0, 3);
}

TEST(CompressedStepTest, RefusalsNameTheProblem) {
  std::mt19937 rng(9);
  GateModel gate = make_gate(rng);
  const KvLayout lay = make_layout(pod_blocks(), true);
  gate.context = GateContext::kCache;
  auto s1 = make_gate_schedule(gate, lay);
  EXPECT_EQ(s1.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(s1.status().message().find("cache"), std::string::npos);
  gate.context = GateContext::kWindow;
  auto s2 = make_gate_schedule(gate, make_layout(pod_blocks(), false));
  EXPECT_EQ(s2.status().code(), StatusCode::kInvalidArgument);

  auto pool = std::move(kvstore::PagePool::create(64, 64 * 1024)).value();
  CompressedKvCache a = make_cache(make_layout(pod_blocks(), false), *pool, 4, rng);
  CompressedKvCache b = make_cache(make_layout(*BlockMap::dense(kLayers, kKvHeads), false), *pool, 4, rng);
  std::vector<float> q(kLayers * 2 * kHeads * kHeadDim), out(2 * kHeads * kHeadDim);
  StepTables t;
  const StepModelShape shape{kLayers, kHeads, kKvHeads, kHeadDim};
  std::vector<CompressedKvCache*> mixed{&a, &b};
  auto m1 = t.measure(shape, mixed, nullptr, {q.data(), out.data(), 2});
  EXPECT_EQ(m1.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(m1.status().message().find("item 1"), std::string::npos);
  std::vector<CompressedKvCache*> two{&a, &a};
  auto m2 = t.measure(shape, two, nullptr, {q.data(), out.data(), 1});
  EXPECT_NE(m2.status().message().find("batch capacity"), std::string::npos);
  auto m3 = t.measure({kLayers, kHeads, kKvHeads, 16}, two, nullptr, {q.data(), out.data(), 2});
  EXPECT_NE(m3.status().message().find("does not match the model"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::engine::cuda
