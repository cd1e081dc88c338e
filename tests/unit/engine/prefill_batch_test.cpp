// prefill_compressed_batch: several prompts under different policies in ONE
// layer-major prefill, each job's compressed cache built block by block and
// handed out segment by segment. Every job's cache must equal the
// reference path — a chunk-major prefill of that prompt alone, the policy's
// flags over the whole prompt, build_from_dense — byte for byte in wire
// order (descriptor and every page), and each segment must be handed out
// right after its last layer, before any later layer is computed.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "engine/gate_runtime.h"
#include "engine/policy_cache.h"
#include "kvstore/wire_image.h"
#include "tests/unit/engine/gate_test_util.h"
#include "tests/unit/engine/test_model.h"

namespace kvgate::engine {
namespace {

std::vector<int32_t> random_tokens(int64_t n, uint32_t seed, int64_t vocab) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& t : out) t = d(rng);
  return out;
}

ForwardOptions options() {
  ForwardOptions o;
  o.n_threads = 2;
  o.max_batch_tokens = 64;  // steps mix prompts and cut them
  return o;
}

constexpr int64_t kPageBytes = 16 * 64 * 2;

std::unique_ptr<kvstore::PagePool> pool_for(const PolicyPlan& plan, int64_t n) {
  return kvstore::PagePool::create(kPageBytes, *compressed_pool_bytes(plan.layout, n, kPageBytes))
      .value();
}

// The reference cache: chunk-major prefill alone, flags of the whole
// prompt, build_from_dense.
kvstore::CompressedKvCache reference(CpuForward& fwd, const PolicyPlan& plan,
                                     std::span<const int32_t> tokens, kvstore::PagePool* pool,
                                     std::vector<float>& logits) {
  const LlamaConfig& c = fwd.model().config();
  const auto n = static_cast<int64_t>(tokens.size());
  KvCache dense(c, n);
  std::unique_ptr<GatePrefill> gate;
  if (policy_uses_gate(plan.config)) {
    gate = std::make_unique<GatePrefill>(*plan.config.gate, plan.layout, n, fwd.options().isa);
  }
  AttentionStats stats;
  const bool want_stats = policy_needs_stats(plan.config);
  if (want_stats) stats.reset(c.n_layers, c.n_kv_heads, n, n - plan.config.snapkv_observe_tokens);
  {
    LayerObserverScope scope(fwd, gate.get());
    EXPECT_TRUE(fwd.prefill(dense, tokens, logits.data(), want_stats ? &stats : nullptr).ok());
  }
  std::vector<uint8_t> flags;
  std::vector<fp16_t> rows;
  kvstore::DenseGate dg;
  if (gate) {
    EXPECT_TRUE(gate->finish(plan.config.effective_gate_decision(), flags, rows).ok());
    dg = gate->dense_gate(rows);
  } else {
    EXPECT_TRUE(policy_flags(plan.config, plan.layout, 0, n, flags, want_stats ? &stats : nullptr).ok());
  }
  const int64_t plane = c.n_kv_heads * n * c.head_dim;
  const kvstore::DenseKv kv{dense.k(0, 0), dense.k(0, 0) + plane, c.head_dim, 2 * plane,
                            n * c.head_dim};
  return kvstore::CompressedKvCache::build_from_dense(plan.layout, pool, n, kv, flags, dg).value();
}

// The same cache: wire descriptor (token counts, retained counts, pending
// flags) byte for byte, and every row the cache holds — proximal and
// distant K/V of every (layer, head), retained positions, gate rows. (Whole
// pages are not compared: a page's rows past the last used one are
// uninitialized pool memory.)
void expect_same_cache(const kvstore::CompressedKvCache& a, const kvstore::CompressedKvCache& b,
                       const std::string& what) {
  auto ia = kvstore::export_wire_image(a);
  auto ib = kvstore::export_wire_image(b);
  ASSERT_TRUE(ia.ok() && ib.ok()) << what;
  EXPECT_EQ(ia->descriptor, ib->descriptor) << what;
  EXPECT_EQ(ia->segments, ib->segments) << what;
  EXPECT_EQ(a.bytes(), b.bytes()) << what;
  const kvstore::KvLayout& lay = a.layout();
  const size_t row = static_cast<size_t>(lay.head_dim) * sizeof(fp16_t);
  for (int64_t l = 0; l < lay.n_layers(); ++l) {
    for (int64_t h = 0; h < lay.n_kv_heads(); ++h) {
      for (bool distant : {false, true}) {
        auto va = distant ? a.distant(l, h) : a.proximal(l, h);
        auto vb = distant ? b.distant(l, h) : b.proximal(l, h);
        ASSERT_TRUE(va.ok() && vb.ok()) << what;
        ASSERT_EQ(va->n_tokens(), vb->n_tokens()) << what;
        for (int64_t r = 0; r < va->n_tokens(); ++r) {
          ASSERT_EQ(std::memcmp(va->k_row(r), vb->k_row(r), row), 0)
              << what << ": K layer " << l << " head " << h << (distant ? " distant" : " proximal")
              << " row " << r;
          ASSERT_EQ(std::memcmp(va->v_row(r), vb->v_row(r), row), 0)
              << what << ": V layer " << l << " head " << h << (distant ? " distant" : " proximal")
              << " row " << r;
        }
      }
    }
  }
  for (int64_t s = 0; s < lay.blocks.n_slots(); ++s) {
    ASSERT_EQ(a.retained_tokens(s), b.retained_tokens(s)) << what << " slot " << s;
    for (int64_t i = 0; i < a.retained_tokens(s); ++i) {
      ASSERT_EQ(a.retained_position(s, i), b.retained_position(s, i)) << what << " slot " << s;
    }
    for (bool distant : {false, true}) {
      auto ga = distant ? a.gate_distant(s) : a.gate_proximal(s);
      auto gb = distant ? b.gate_distant(s) : b.gate_proximal(s);
      ASSERT_TRUE(ga.ok() && gb.ok()) << what;
      ASSERT_EQ(ga->n_rows(), gb->n_rows()) << what;
      for (int64_t r = 0; r < ga->n_rows(); ++r) {
        ASSERT_EQ(std::memcmp(ga->row(r), gb->row(r), static_cast<size_t>(ga->row_elems()) * sizeof(fp16_t)), 0)
            << what << ": gate slot " << s << " row " << r;
      }
    }
  }
}

std::shared_ptr<const PolicyPlan> plan_of(const LlamaConfig& c, KvPolicyConfig cfg) {
  auto plan = plan_kv_policy(c, cfg);
  EXPECT_TRUE(plan.ok()) << plan.status().to_string();
  return *plan;
}

TEST(PrefillBatch, EveryJobEqualsTheReferenceAndShipsEachBlockAfterItsLastLayer) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  auto gate = std::make_shared<const GateModel>(random_gate(*fp, GateKind::kAttention, 5));
  KvPolicyConfig gate_pod;
  gate_pod.policy = KvPolicy::kGatePod;
  gate_pod.gate = gate;
  KvPolicyConfig gate_only = gate_pod;
  gate_only.policy = KvPolicy::kGate;
  gate_only.gate_decision.threshold_offset = 0.5;
  KvPolicyConfig pod;
  pod.policy = KvPolicy::kPod;
  pod.n_sink_tokens = 4;
  pod.n_window_tokens = 16;
  pod.pod_group_layers = 3;
  KvPolicyConfig dense;
  KvPolicyConfig window;
  window.policy = KvPolicy::kWindow;
  window.n_sink_tokens = 2;
  window.n_window_tokens = 8;
  const std::vector<std::shared_ptr<const PolicyPlan>> plans = {
      plan_of(c, gate_pod), plan_of(c, gate_only), plan_of(c, pod), plan_of(c, dense),
      plan_of(c, window)};
  const std::vector<int64_t> lengths = {90, 57, 130, 33, 70};

  CpuForward fwd(*L->model, options());
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::unique_ptr<kvstore::PagePool>> pools;
  std::vector<std::vector<float>> logits;
  std::vector<CompressedPrefillJob> jobs;
  int64_t layers_done = 0;
  struct Seen {
    std::vector<int64_t> indexes;
    std::vector<std::vector<kvstore::PageId>> pages;
  };
  std::vector<Seen> seen(plans.size());
  for (size_t i = 0; i < plans.size(); ++i) {
    prompts.push_back(random_tokens(lengths[i], 100 + static_cast<uint32_t>(i), c.n_vocab));
    pools.push_back(pool_for(*plans[i], lengths[i]));
    logits.emplace_back(static_cast<size_t>(c.n_vocab));
  }
  for (size_t i = 0; i < plans.size(); ++i) {
    const auto groups = kvstore::wire_slot_groups(plans[i]->layout);
    jobs.push_back(CompressedPrefillJob{
        plans[i], prompts[i], pools[i].get(), logits[i],
        [&, i, groups](int64_t index, const kvstore::WireSlotGroup& group,
                       std::span<const kvstore::PageId> pages) -> Status {
          // Handed out in wire order, right after its last layer (layers
          // 0..last_layer done, nothing later yet).
          EXPECT_EQ(index, static_cast<int64_t>(seen[i].indexes.size())) << "job " << i;
          EXPECT_EQ(group, groups.at(static_cast<size_t>(index))) << "job " << i;
          EXPECT_EQ(layers_done, group.last_layer) << "job " << i << " segment " << index;
          seen[i].indexes.push_back(index);
          seen[i].pages.emplace_back(pages.begin(), pages.end());
          return Status();
        }});
  }
  auto out = prefill_compressed_batch(fwd, jobs, [&](int64_t layer) {
    EXPECT_EQ(layer, layers_done);
    ++layers_done;
    return Status();
  });
  ASSERT_TRUE(out.ok()) << out.status().to_string();
  ASSERT_EQ(out->size(), plans.size());
  EXPECT_EQ(layers_done, c.n_layers);

  CpuForward ref_fwd(*L->model, options());
  for (size_t i = 0; i < plans.size(); ++i) {
    const std::string what = "job " + std::to_string(i) + " (" + plans[i]->name + ")";
    ASSERT_TRUE((*out)[i].ok()) << what << ": " << (*out)[i].status().to_string();
    const kvstore::CompressedKvCache& got = (*out)[i]->cache;
    auto ref_pool = pool_for(*plans[i], lengths[i]);
    std::vector<float> ref_logits(static_cast<size_t>(c.n_vocab));
    const kvstore::CompressedKvCache ref = reference(ref_fwd, *plans[i], prompts[i], ref_pool.get(), ref_logits);
    EXPECT_EQ(logits[i], ref_logits) << what;
    expect_same_cache(got, ref, what);
    // The segments handed out are the export's, page for page.
    auto image = kvstore::export_wire_image(got);
    ASSERT_TRUE(image.ok());
    ASSERT_EQ(seen[i].pages.size(), image->segments.size()) << what;
    for (size_t s = 0; s < image->segments.size(); ++s) {
      const auto& seg = image->segments[s];
      const std::vector<kvstore::PageId> expect(image->pages.begin() + seg.first_page,
                                                image->pages.begin() + seg.first_page + seg.n_pages);
      EXPECT_EQ(seen[i].pages[s], expect) << what << " segment " << s;
    }
  }
  // Something was actually evicted by the gate and window policies (the
  // comparison is not between two all-kept caches).
  EXPECT_LT(cache_keep_rate((*out)[0]->cache), 1.0);
  EXPECT_EQ(cache_keep_rate((*out)[4]->cache), 0.0);
}

TEST(PrefillBatch, StatisticsPoliciesRunAloneAndEqualTheReference) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  KvPolicyConfig h2o;
  h2o.policy = KvPolicy::kH2o;
  h2o.n_sink_tokens = 4;
  h2o.n_window_tokens = 16;
  h2o.pod_group_layers = 2;
  KvPolicyConfig snap = h2o;
  snap.policy = KvPolicy::kSnapKv;
  snap.snapkv_observe_tokens = 8;
  CpuForward fwd(*L->model, options());
  for (const KvPolicyConfig& cfg : {h2o, snap}) {
    auto plan = plan_of(c, cfg);
    const auto tokens = random_tokens(80, 7, c.n_vocab);
    auto pool = pool_for(*plan, 80);
    std::vector<float> logits(static_cast<size_t>(c.n_vocab));
    auto got = prefill_compressed(fwd, plan, tokens, pool.get(), logits);
    ASSERT_TRUE(got.ok()) << got.status().to_string();
    auto ref_pool = pool_for(*plan, 80);
    std::vector<float> ref_logits(logits.size());
    const auto ref = reference(fwd, *plan, tokens, ref_pool.get(), ref_logits);
    EXPECT_EQ(logits, ref_logits);
    expect_same_cache(got->cache, ref, plan->name);
    EXPECT_LT(cache_keep_rate(got->cache), 1.0);

    // Batched with another job: refused before any work.
    auto other_pool = pool_for(*plan, 80);
    std::vector<float> other_logits(logits.size());
    std::vector<CompressedPrefillJob> two = {{plan, tokens, pool.get(), logits, {}},
                                             {plan, tokens, other_pool.get(), other_logits, {}}};
    auto refused = prefill_compressed_batch(fwd, two);
    EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(refused.status().message().find("runs alone"), std::string::npos)
        << refused.status().message();
  }
}

TEST(PrefillBatch, AFailingJobStopsAloneAndAFailingHookStopsAll) {
  KVGATE_REQUIRE_MODEL();
  const LlamaConfig& c = L->model->config();
  KvPolicyConfig dense;
  auto plan = plan_of(c, dense);
  CpuForward fwd(*L->model, options());
  const auto a = random_tokens(40, 1, c.n_vocab);
  const auto b = random_tokens(50, 2, c.n_vocab);
  auto pa = pool_for(*plan, 40), pb = pool_for(*plan, 50);
  std::vector<float> la(static_cast<size_t>(c.n_vocab)), lb(la.size());
  int calls_a = 0, calls_b = 0;
  std::vector<CompressedPrefillJob> jobs = {
      {plan, a, pa.get(), la,
       [&](int64_t index, const kvstore::WireSlotGroup&, std::span<const kvstore::PageId>) {
         ++calls_a;
         return index == 3 ? Status(StatusCode::kUnavailable, "decode node gone") : Status();
       }},
      {plan, b, pb.get(), lb,
       [&](int64_t, const kvstore::WireSlotGroup&, std::span<const kvstore::PageId>) {
         ++calls_b;
         return Status();
       }}};
  auto out = prefill_compressed_batch(fwd, jobs);
  ASSERT_TRUE(out.ok()) << out.status().to_string();
  EXPECT_EQ((*out)[0].status().code(), StatusCode::kUnavailable);
  EXPECT_EQ((*out)[0].status().message(), "decode node gone");
  EXPECT_EQ(calls_a, 4);  // no calls after its error
  ASSERT_TRUE((*out)[1].ok());
  EXPECT_EQ(calls_b, c.n_layers);  // dense: one segment per layer
  auto ref_pool = pool_for(*plan, 50);
  std::vector<float> ref_logits(lb.size());
  const auto ref = reference(fwd, *plan, b, ref_pool.get(), ref_logits);
  expect_same_cache((*out)[1]->cache, ref, "the job beside the failed one");
  // The failed job's pages went back to its pool.
  EXPECT_EQ(pa->used_pages(), 0);

  int layers = 0;
  auto pa2 = pool_for(*plan, 40), pb2 = pool_for(*plan, 50);
  jobs[0].pool = pa2.get();
  jobs[1].pool = pb2.get();
  auto stopped = prefill_compressed_batch(fwd, jobs, [&](int64_t layer) {
    ++layers;
    return layer == 5 ? Status(StatusCode::kCancelled, "shutting down") : Status();
  });
  EXPECT_EQ(stopped.status().code(), StatusCode::kCancelled);
  EXPECT_EQ(layers, 6);
}

}  // namespace
}  // namespace kvgate::engine
