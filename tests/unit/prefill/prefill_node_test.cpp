// The prefill node end to end in one process (docs/cluster.md step 4): a
// real PrefillNode with the real model registers with a fake coordinator
// over a real control connection on 127.0.0.1, gets PrefillJobs there, and
// ships the KV over the loopback transport into a fake decode node's
// leased pages (PagePool + LeaseManager), whose control listener records
// the Extend and TransferManifest messages. The test adopts the landed
// pages with adopt_wire_image and decodes on, against a local prefill.
#include <gtest/gtest.h>

#if KVGATE_HAVE_CUDA
#include "engine/cuda/device_buffer.h"
#endif

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>

#include "../engine/test_model.h"
#include "tests/unit/engine/gate_test_util.h"
#include "engine/gate_file.h"
#include "engine/gate_runtime.h"
#include "engine/kv_policy_spec.h"
#include "engine/policy_cache.h"
#include "engine/sampler.h"
#include "kvstore/footprint.h"
#include "kvstore/wire_image.h"
#include "prefill/prefill_node.h"
#include "prefill_test_util.h"

namespace kvgate::prefill {
namespace {

using namespace std::chrono_literals;
using testing::FakeCluster;

constexpr int64_t kPageTokens = 16;
constexpr char kPrompt[] =
    "The lighthouse keeper climbed the stairs every evening at dusk. He counted the steps, "
    "one hundred and twelve of them, and lit the great lamp so that the fishing boats could "
    "find their way home through the fog. One night the lamp would not light.";

std::shared_ptr<const engine::LlamaModel> borrowed(const engine::LlamaModel* m) {
  return std::shared_ptr<const engine::LlamaModel>(m, [](const engine::LlamaModel*) {});
}

// The value of the first sample of `name` whose labels contain `labels`.
double metric(const std::string& text, const std::string& name, const std::string& labels = "") {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name + "{", 0) != 0 && line.rfind(name + " ", 0) != 0) continue;
    if (!labels.empty() && line.find(labels) == std::string::npos) continue;
    return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return std::nan("");
}

control::KvPolicySpec spec(std::string name, std::vector<control::KvPolicyParam> params = {}) {
  control::KvPolicySpec s;
  s.name = std::move(name);
  s.params = std::move(params);
  return s;
}

class PrefillNodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = engine::testing::test_model();
    if (!model_->model) GTEST_SKIP() << "model not found at " KVGATE_TEST_MODEL;
    page_bytes_ = kPageTokens * model_->model->config().head_dim * 2;
    fake_ = std::make_unique<FakeCluster>(page_bytes_, int64_t{48} << 20);
    prompt_ = model_->tokenizer->encode(kPrompt, true, false);
    ASSERT_GT(prompt_.size(), 40u);
  }
  void TearDown() override {
    if (node_) node_->stop();
    node_.reset();
    sources_.clear();
    fake_.reset();
  }

  NodeConfig config() const {
    NodeConfig c;
    c.model.path = KVGATE_TEST_MODEL;
    c.engine.threads = 2;
    c.cluster.coordinators = {fake_->coordinator_address()};
    c.cluster.token = testing::kToken;
    c.prefill.listen = {"127.0.0.1", 0};
    c.decode.page_tokens = kPageTokens;
    c.transport.kind = TransportKind::kLoopback;
    c.metrics.enabled = false;
    return c;
  }

  // Starts the node (no gate unless `gate`) and waits for its registration.
  void start(const NodeConfig& c, std::shared_ptr<const engine::GateModel> gate = nullptr) {
    PrefillResources r;
    r.model = borrowed(model_->model.get());
    r.gate_given = true;
    r.gate = std::move(gate);
    auto node = PrefillNode::start(c, r);
    ASSERT_TRUE(node.ok()) << node.status().to_string();
    node_ = std::move(*node);
    ASSERT_TRUE(fake_->wait_until([&] { return fake_->coordinator_connected(); }, 10s));
  }

  control::PrefillJob job(uint64_t request, const control::KvPolicySpec& policy,
                          const FakeCluster::Grant& g) const {
    control::PrefillJob j;
    j.request_id = RequestId(request);
    j.prompt_token_ids = prompt_;
    j.generation.max_new_tokens = 8;
    j.kv_policy = policy;
    j.decode_node = NodeId(2);
    j.decode_transport_address = fake_->decode_transport_address();
    j.decode_control_address = fake_->decode_control_address();
    j.lease_id = g.lease;
    j.granted_bytes = g.granted_bytes;
    j.pool_descriptor = g.descriptor;
    j.deadline_in = 60s;
    return j;
  }

  std::optional<control::Error> wait_error(uint64_t request, std::chrono::milliseconds t = 60s) {
    std::optional<control::Error> e;
    fake_->wait_until(
        [&] {
          e = fake_->coordinator_inbox().find<control::Error>(
              [&](const control::Error& x) { return x.request_id == RequestId(request); });
          return e.has_value();
        },
        t);
    return e;
  }
  std::optional<control::TransferManifest> wait_manifest(uint64_t request) {
    std::optional<control::TransferManifest> m;
    fake_->wait_until([&] {
      m = fake_->decode_inbox().find<control::TransferManifest>(
          [&](const control::TransferManifest& x) { return x.request_id == RequestId(request); });
      return m.has_value();
    });
    return m;
  }
  std::optional<kvstore::CompressedKvCache> adopt_and_compare(const engine::PolicyPlan& plan,
                                                             const control::TransferManifest& manifest,
                                                             const FakeCluster::Grant& g,
                                                             const kvstore::CompressedKvCache& local);
  std::optional<control::TransferManifest> manifest_of(uint64_t request) const {
    return fake_->decode_inbox().find<control::TransferManifest>(
        [&](const control::TransferManifest& x) { return x.request_id == RequestId(request); });
  }

  // Ships `policy` end to end and checks the manifest and the continued
  // decode of the adopted cache.
  // grant_bytes 0: a grant that holds everything (the whole image ships
  // during the prefill); else that much, and the decode side extends the
  // live receive in place when the node asks.
  void ship_and_continue(const control::KvPolicySpec& policy,
                         std::shared_ptr<const engine::GateModel> gate = nullptr,
                         int64_t grant_bytes = 0);

  const engine::testing::TestModel* model_ = nullptr;
  int64_t page_bytes_ = 0;
  std::unique_ptr<FakeCluster> fake_;
  std::unique_ptr<PrefillNode> node_;
  std::vector<int32_t> prompt_;
  std::vector<std::unique_ptr<kvstore::LeasePages>> sources_;
};

// Greedy continuation of an adopted (or local) compressed cache under `plan`.
std::vector<int32_t> continue_greedy(engine::CpuForward& fwd, const engine::PolicyPlan& plan,
                                     kvstore::CompressedKvCache& cache, int32_t first, int steps,
                                     std::vector<std::vector<float>>* all_logits) {
  std::vector<float> logits(static_cast<size_t>(fwd.model().config().n_vocab));
  std::vector<uint8_t> flags;
  std::vector<int32_t> out{first};
  std::unique_ptr<engine::GateDecoder> gate;
  if (engine::policy_uses_gate(plan.config)) {
    gate = std::make_unique<engine::GateDecoder>(*plan.config.gate, plan.layout, fwd.options().isa);
  }
  for (int i = 0; i < steps; ++i) {
    Status s;
    if (gate) {
      // The gate computes the new token's flags during the step (deferred).
      kvstore::CompressedKvCache* caches[1] = {&cache};
      gate->bind(caches, plan.config.effective_gate_decision());
      fwd.set_layer_observer(gate.get());
      engine::CompressedItem item{&cache, out.back(), {}, true};
      s = fwd.forward_compressed(std::span(&item, 1), logits.data());
      fwd.set_layer_observer(nullptr);
      EXPECT_TRUE(gate->status().ok()) << gate->status().to_string();
    } else {
      s = engine::policy_flags(plan.config, plan.layout, cache.n_tokens(), 1, flags);
      EXPECT_TRUE(s.ok()) << s.to_string();
      engine::CompressedItem item{&cache, out.back(), flags, true};
      s = fwd.forward_compressed(std::span(&item, 1), logits.data());
    }
    EXPECT_TRUE(s.ok()) << s.to_string();
    if (all_logits) all_logits->push_back(logits);
    out.push_back(engine::argmax(logits));
  }
  return out;
}

// Adopts the pages that landed for `g` (lease order = wire order) as the
// decode node would and checks the cache row for row against `local`.
std::optional<kvstore::CompressedKvCache> PrefillNodeTest::adopt_and_compare(
    const engine::PolicyPlan& plan, const control::TransferManifest& manifest_in,
    const FakeCluster::Grant& g, const kvstore::CompressedKvCache& local) {
  const auto* manifest = &manifest_in;
  const int64_t n = local.n_tokens();
  std::vector<kvstore::PageId> pages(fake_->leases().pages(g.lease).begin(),
                                     fake_->leases().pages(g.lease).end());
  // The adopted cache draws on the lease through this source: it lives as
  // long as the fixture (longer than any cache of the test body).
  sources_.push_back(std::make_unique<kvstore::LeasePages>(&fake_->leases(), g.lease));
  auto adopted =
      kvstore::adopt_wire_image(plan.layout, sources_.back().get(), manifest->layout_descriptor, pages);
  if (!adopted.ok()) {
    ADD_FAILURE() << adopted.status().to_string();
    return std::nullopt;
  }
  EXPECT_EQ(adopted->n_tokens(), n);
  EXPECT_EQ(adopted->bytes(), local.bytes());

  // Same state, row for row, before decoding on.
  {
    const kvstore::KvLayout& lay = plan.layout;
    for (int64_t slot = 0; slot < lay.blocks.n_slots(); ++slot) {
      EXPECT_EQ(adopted->retained_tokens(slot), local.retained_tokens(slot)) << slot;
      for (int64_t i = 0; i < adopted->retained_tokens(slot); ++i) {
        EXPECT_EQ(adopted->retained_position(slot, i), local.retained_position(slot, i));
      }
    }
    const int64_t d = lay.head_dim;
    for (int64_t l = 0; l < lay.n_layers(); ++l) {
      for (int64_t h = 0; h < lay.n_kv_heads(); ++h) {
        for (bool distant : {false, true}) {
          auto a = distant ? adopted->distant(l, h) : adopted->proximal(l, h);
          auto b = distant ? local.distant(l, h) : local.proximal(l, h);
          if (!a.ok() || !b.ok()) { ADD_FAILURE() << "views"; return std::nullopt; }
          if (a->n_tokens() != b->n_tokens()) {
            ADD_FAILURE() << "layer " << l << " head " << h << ": " << a->n_tokens() << " vs "
                          << b->n_tokens() << (distant ? " distant" : " proximal") << " rows";
            return std::nullopt;
          }
          for (int64_t r = 0; r < a->n_tokens(); ++r) {
            if (std::memcmp(a->k_row(r), b->k_row(r), d * 2) != 0 ||
                std::memcmp(a->v_row(r), b->v_row(r), d * 2) != 0) {
              ADD_FAILURE() << "K/V layer " << l << " head " << h
                            << (distant ? " distant" : " proximal") << " row " << r << " differs";
              return std::nullopt;
            }
          }
        }
      }
    }
    for (int64_t r = 0; r < adopted->proximal_tokens(); ++r) {
      EXPECT_EQ(adopted->proximal_row_position(r), local.proximal_row_position(r)) << r;
    }
  }

  return std::optional<kvstore::CompressedKvCache>(std::move(*adopted));
}

void PrefillNodeTest::ship_and_continue(const control::KvPolicySpec& policy,
                                        std::shared_ptr<const engine::GateModel> gate,
                                        int64_t grant_bytes) {
  start(config(), gate);
  const engine::LlamaModel& model = *model_->model;
  const int64_t n = static_cast<int64_t>(prompt_.size());
  if (grant_bytes > 0) {
    fake_->set_extend_answer([this](const control::Extend& e) { return fake_->extend_in_place(e); });
  }
  const FakeCluster::Grant g = fake_->reserve(RequestId(7), grant_bytes > 0 ? grant_bytes : int64_t{4} << 20);
  fake_->send_to_node(job(7, policy, g));

  auto manifest = wait_manifest(7);
  ASSERT_TRUE(manifest.has_value()) << "no manifest; errors: "
                                    << fake_->coordinator_inbox().all<control::Error>().size();
  std::optional<transport::TransferEvent> received;
  ASSERT_TRUE(fake_->wait_until([&] { return (received = fake_->receive_event(g.lease)).has_value(); }));
  ASSERT_TRUE(received->status.ok()) << received->status.to_string();

  // The reference: the same policy prefilled here.
  engine::ForwardOptions fo;
  fo.n_threads = 2;
  engine::CpuForward fwd(model, fo);
  auto cfg = engine::kv_policy_from_spec(manifest->kv_policy, gate);
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  auto plan = engine::plan_kv_policy(model.config(), *cfg);
  ASSERT_TRUE(plan.ok()) << plan.status().to_string();
  auto local_pool = kvstore::PagePool::create(
                        page_bytes_, *engine::compressed_pool_bytes((*plan)->layout, n + 16, page_bytes_))
                        .value();
  std::vector<float> logits(static_cast<size_t>(model.config().n_vocab));
  auto local = engine::prefill_compressed(fwd, *plan, prompt_, local_pool.get(), logits);
  ASSERT_TRUE(local.ok()) << local.status().to_string();
  const int32_t greedy_first = engine::argmax(logits);

  // Manifest fields.
  EXPECT_EQ(manifest->lease_id, g.lease);
  EXPECT_EQ(manifest->prompt_tokens, static_cast<uint32_t>(n));
  EXPECT_EQ(manifest->first_token_id, greedy_first);
  EXPECT_EQ(manifest->dense_bytes, static_cast<uint64_t>(model.kv_bytes_per_token() * n));
  EXPECT_EQ(manifest->actual_bytes, static_cast<uint64_t>(local->cache.bytes()));
  EXPECT_DOUBLE_EQ(manifest->keep_rate, engine::cache_keep_rate(local->cache));
  EXPECT_EQ(manifest->kv_policy, policy);
  EXPECT_EQ(manifest->layout_version, kvstore::kWireImageVersion);
  const int64_t wire_pages = kvstore::wire_image_pages(local->cache);
  uint64_t covered = 0;
  for (const auto& seg : manifest->segments) {
    EXPECT_EQ(seg.offset_bytes, covered);
    covered += seg.length_bytes;
  }
  EXPECT_EQ(covered, static_cast<uint64_t>(wire_pages * page_bytes_));
  EXPECT_EQ(received->bytes, covered);

  auto adopted = adopt_and_compare(**plan, *manifest, g, local->cache);
  ASSERT_TRUE(adopted.has_value());

  constexpr int kSteps = 8;
  std::vector<std::vector<float>> remote_logits, local_logits;
  const auto remote_tokens =
      continue_greedy(fwd, **plan, *adopted, manifest->first_token_id, kSteps, &remote_logits);
  const auto local_tokens =
      continue_greedy(fwd, **plan, local->cache, greedy_first, kSteps, &local_logits);
  // Same bytes, same kernels: the shipped cache continues bit for bit.
  EXPECT_EQ(remote_tokens, local_tokens);
  ASSERT_EQ(remote_logits.size(), local_logits.size());
  for (size_t i = 0; i < remote_logits.size(); ++i) {
    EXPECT_EQ(remote_logits[i], local_logits[i]) << "step " << i;
  }
  // And like the local PolicySequence (generate's path; dense there is the
  // plain dense cache).
  std::vector<float> seq_logits(logits.size());
  auto seqs = engine::prefill_for_policies(fwd, std::span(&*plan, 1), prompt_, n + kSteps + 1,
                                           seq_logits);
  ASSERT_TRUE(seqs.ok()) << seqs.status().to_string();
  std::vector<int32_t> seq_tokens{engine::argmax(seq_logits)};
  for (int i = 0; i < kSteps; ++i) {
    ASSERT_TRUE((*seqs)[0]->decode(seq_tokens.back(), seq_logits).ok());
    seq_tokens.push_back(engine::argmax(seq_logits));
  }
  EXPECT_EQ(remote_tokens, seq_tokens);

  // The job counts as done once the manifest left (just before it may be read here).
  ASSERT_TRUE(fake_->wait_until(
      [&] { return metric(node_->metrics_text(), "kvgate_prefill_jobs_done_total") == 1; }, 10s));
  const std::string m = node_->metrics_text();
  EXPECT_EQ(metric(m, "kvgate_prefill_kv_wire_bytes_total"), static_cast<double>(covered));
  EXPECT_EQ(metric(m, "kvgate_prefill_kv_dense_bytes_total"),
            static_cast<double>(manifest->dense_bytes));
  EXPECT_TRUE(fake_->coordinator_inbox().all<control::Error>().empty());
  EXPECT_EQ(metric(m, "kvgate_prefill_batches_total"), 1);
  // Overlap: every block but the last layer's left while later layers were
  // computing — all of them when the grant held the image; with a small
  // grant, those that fit it, the rest after the Extend.
  const double overlapped = metric(m, "kvgate_prefill_segments_sent_total", "when=\"overlapped\"");
  const double after = metric(m, "kvgate_prefill_segments_sent_total", "when=\"after_prefill\"");
  EXPECT_EQ(overlapped + after, static_cast<double>(manifest->segments.size()));
  if (grant_bytes == 0) {
    EXPECT_EQ(overlapped, static_cast<double>(manifest->segments.size() - 1));
    EXPECT_TRUE(fake_->decode_inbox().all<control::Extend>().empty());
  } else {
    uint64_t fit = 0;
    size_t fitting = 0;
    for (const auto& seg : manifest->segments) {
      if (seg.offset_bytes + seg.length_bytes > g.granted_bytes) break;
      fit = seg.offset_bytes + seg.length_bytes;
      ++fitting;
    }
    ASSERT_GT(fitting, 0u) << "the test's grant holds no segment";
    ASSERT_LT(fit, covered) << "the test's grant holds the whole image";
    EXPECT_EQ(overlapped, static_cast<double>(std::min(fitting, manifest->segments.size() - 1)));
    EXPECT_EQ(fake_->decode_inbox().all<control::Extend>().size(), 1u);
    EXPECT_EQ(fake_->extends_in_place(), 1);
    EXPECT_EQ(metric(m, "kvgate_prefill_extends_total", "result=\"granted\""), 1);
  }
}

TEST_F(PrefillNodeTest, DenseShipsAndContinuesLikeLocal) { ship_and_continue(spec("dense")); }

TEST_F(PrefillNodeTest, ExtendAfterBlocksShippedGrowsTheTransferInPlace) {
  // A grant of a third of the image: the first blocks ship during the
  // prefill, then the node asks for more, the decode side grows the live
  // receive, and the rest lands in the new pages — the same cache arrives.
  const int64_t n = static_cast<int64_t>(prompt_.size());
  const int64_t layer_bytes = 2 * 3 * ((n + kPageTokens - 1) / kPageTokens) * page_bytes_;
  ship_and_continue(spec("dense"), nullptr, 10 * layer_bytes + page_bytes_);
}

TEST_F(PrefillNodeTest, QueuedJobsRunAsOneBatchAndEachEqualsItsOwnPrefill) {
  start(config());
  node_->set_paused_for_test(true);
  const engine::LlamaModel& model = *model_->model;
  std::vector<int32_t> twice = prompt_;
  twice.insert(twice.end(), prompt_.begin(), prompt_.end());
  const std::vector<std::vector<int32_t>> prompts = {
      prompt_, std::vector<int32_t>(prompt_.begin(), prompt_.begin() + 19), twice};
  const std::vector<control::KvPolicySpec> policies = {
      spec("dense"),
      spec("pod", {{"n_sink_tokens", 4}, {"n_window_tokens", 16}, {"pod_group_layers", 3}}),
      spec("window", {{"n_sink_tokens", 2}, {"n_window_tokens", 8}})};
  std::vector<FakeCluster::Grant> grants;
  for (size_t i = 0; i < prompts.size(); ++i) {
    grants.push_back(fake_->reserve(RequestId(91 + i), int64_t{4} << 20));
    control::PrefillJob j = job(91 + i, policies[i], grants.back());
    j.prompt_token_ids = prompts[i];
    fake_->send_to_node(j);
  }
  ASSERT_TRUE(fake_->wait_until(
      [&] { return metric(node_->metrics_text(), "kvgate_prefill_jobs_queued_total") == 3; }, 10s));
  node_->set_paused_for_test(false);
  ASSERT_TRUE(fake_->wait_until(
      [&] { return metric(node_->metrics_text(), "kvgate_prefill_jobs_done_total") == 3; }, 60s));
  const std::string m = node_->metrics_text();
  EXPECT_EQ(metric(m, "kvgate_prefill_batches_total"), 1);  // one pass for all three
  EXPECT_EQ(metric(m, "kvgate_prefill_batch_jobs_sum"), 3);
  EXPECT_TRUE(fake_->coordinator_inbox().all<control::Error>().empty());

  engine::ForwardOptions fo;
  fo.n_threads = 2;
  engine::CpuForward fwd(model, fo);
  for (size_t i = 0; i < prompts.size(); ++i) {
    SCOPED_TRACE("job " + std::to_string(91 + i) + " (" + policies[i].name + ")");
    auto manifest = manifest_of(91 + i);
    ASSERT_TRUE(manifest.has_value());
    std::optional<transport::TransferEvent> received;
    ASSERT_TRUE(fake_->wait_until(
        [&] { return (received = fake_->receive_event(grants[i].lease)).has_value(); }));
    ASSERT_TRUE(received->status.ok()) << received->status.to_string();
    auto cfg = engine::kv_policy_from_spec(manifest->kv_policy, nullptr);
    ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
    auto plan = engine::plan_kv_policy(model.config(), *cfg);
    ASSERT_TRUE(plan.ok());
    const auto n = static_cast<int64_t>(prompts[i].size());
    auto pool = kvstore::PagePool::create(
                    page_bytes_, *engine::compressed_pool_bytes((*plan)->layout, n, page_bytes_))
                    .value();
    std::vector<float> logits(static_cast<size_t>(model.config().n_vocab));
    auto local = engine::prefill_compressed(fwd, *plan, prompts[i], pool.get(), logits);
    ASSERT_TRUE(local.ok()) << local.status().to_string();
    EXPECT_EQ(manifest->prompt_tokens, static_cast<uint32_t>(n));
    EXPECT_EQ(manifest->first_token_id, engine::argmax(logits));
    EXPECT_EQ(manifest->actual_bytes, static_cast<uint64_t>(local->cache.bytes()));
    EXPECT_DOUBLE_EQ(manifest->keep_rate, engine::cache_keep_rate(local->cache));
    EXPECT_TRUE(adopt_and_compare(**plan, *manifest, grants[i], local->cache).has_value());
  }
}

TEST_F(PrefillNodeTest, PodShipsAndContinuesLikeLocal) {
  // A small window so most prompt tokens are distant: shared base keys.
  ship_and_continue(spec("pod", {{"n_sink_tokens", 4}, {"n_window_tokens", 16},
                                 {"pod_group_layers", 2}}));
}

TEST_F(PrefillNodeTest, GatePodShipsGateStateAndContinuesLikeLocal) {
  auto gate = engine::calibrated_or_random_gate(*model_->model, KVGATE_TEST_MODEL);
  ASSERT_NE(gate, nullptr);
  // A small window, so the gates decide most of the prompt.
  ship_and_continue(spec("gate+pod", {{"n_sink_tokens", 4}, {"n_window_tokens", 16}}), gate);
}

TEST_F(PrefillNodeTest, RegistersAndHeartbeats) {
  start(config());
  auto hello = fake_->node_hello();
  ASSERT_TRUE(hello.has_value());
  EXPECT_EQ(hello->role, control::NodeRole::kPrefill);
  EXPECT_EQ(hello->node_id, node_->node_id());
  EXPECT_EQ(hello->transport_name, "loopback");
  EXPECT_EQ(hello->transport_address, node_->transport_address());
  EXPECT_EQ(hello->model_name, "SmolLM2-135M-Instruct.Q4_1");
  EXPECT_EQ(hello->control_address, node_->listen_address().to_string());
  EXPECT_NE(node_->listen_address().port, 0);
  ASSERT_TRUE(fake_->wait_until(
      [&] { return fake_->coordinator_inbox().all<control::Heartbeat>().size() >= 2; }, 10s));
  const auto hbs = fake_->coordinator_inbox().all<control::Heartbeat>();
  EXPECT_EQ(hbs[0].node_id, node_->node_id());
  EXPECT_EQ(hbs[0].sequence, 1u);
  EXPECT_EQ(hbs[1].sequence, 2u);
  EXPECT_EQ(hbs[0].queue_length, 0u);
}

TEST_F(PrefillNodeTest, ReconnectsWithTheSameNodeIdAfterTheConnectionDrops) {
  start(config());
  ASSERT_EQ(fake_->hellos(), 1);
  fake_->drop_node_connection();
  ASSERT_TRUE(fake_->wait_until([&] { return fake_->hellos() == 2 && fake_->coordinator_connected(); },
                                10s));
  EXPECT_EQ(fake_->node_hello()->node_id, node_->node_id());
  // Jobs flow on the new connection.
  const FakeCluster::Grant g = fake_->reserve(RequestId(61), int64_t{4} << 20);
  fake_->send_to_node(job(61, spec("dense"), g));
  EXPECT_TRUE(wait_manifest(61).has_value());
}

TEST_F(PrefillNodeTest, GrantTooSmallSendsExtendAndRefusalFailsTheJob) {
  start(config());
  fake_->set_extend_answer([](const control::Extend& e) {
    control::ExtendResult r;
    r.request_id = e.request_id;
    r.lease_id = e.lease_id;
    r.code = StatusCode::kResourceExhausted;
    r.message = "decode pool full";
    return r;
  });
  const FakeCluster::Grant g = fake_->reserve(RequestId(11), page_bytes_);  // one page
  fake_->send_to_node(job(11, spec("dense"), g));
  auto err = wait_error(11);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kResourceExhausted);
  EXPECT_NE(err->message.find("needs "), std::string::npos) << err->message;
  EXPECT_NE(err->message.find("granted " + std::to_string(page_bytes_)), std::string::npos)
      << err->message;
  EXPECT_NE(err->message.find("decode pool full"), std::string::npos) << err->message;

  const auto extends = fake_->decode_inbox().all<control::Extend>();
  ASSERT_EQ(extends.size(), 1u);
  EXPECT_EQ(extends[0].request_id, RequestId(11));
  EXPECT_EQ(extends[0].lease_id, g.lease);
  // The image of a dense prompt of n tokens needs more than the one page.
  EXPECT_GT(extends[0].extra_bytes, 0u);
  EXPECT_EQ(extends[0].extra_bytes % static_cast<uint64_t>(page_bytes_), 0u);
  // Nothing shipped: no manifest, no transfer on the decode side.
  EXPECT_FALSE(manifest_of(11).has_value());
  fake_->pump();
  EXPECT_EQ(fake_->receive_events(), 0u);
  const std::string m = node_->metrics_text();
  EXPECT_EQ(metric(m, "kvgate_prefill_extends_total", "result=\"refused\""), 1);
  EXPECT_EQ(metric(m, "kvgate_prefill_jobs_failed_total", "cause=\"extend_refused\""), 1);
  EXPECT_EQ(metric(m, "kvgate_prefill_kv_wire_bytes_total"), 0);
}

TEST_F(PrefillNodeTest, ExtendGrantedShipsWithTheNewGrant) {
  start(config());
  // The receive covers 4 MiB, but the job says one page was granted: the
  // node asks to extend, and the answer grants everything.
  const FakeCluster::Grant g = fake_->reserve(RequestId(12), int64_t{4} << 20);
  fake_->set_extend_answer([g](const control::Extend& e) {
    control::ExtendResult r;
    r.request_id = e.request_id;
    r.lease_id = e.lease_id;
    r.granted_bytes = g.granted_bytes;
    r.expires_in = 60s;
    r.pool_descriptor = g.descriptor;
    return r;
  });
  FakeCluster::Grant small = g;
  small.granted_bytes = static_cast<uint64_t>(page_bytes_);
  small.descriptor = {std::byte{1}};  // never used: replaced by the extension's
  fake_->send_to_node(job(12, spec("dense"), small));
  auto manifest = wait_manifest(12);
  ASSERT_TRUE(manifest.has_value());
  EXPECT_EQ(fake_->decode_inbox().all<control::Extend>().size(), 1u);
  ASSERT_TRUE(fake_->wait_until([&] { return fake_->receive_event(g.lease).has_value(); }));
  EXPECT_TRUE(fake_->receive_event(g.lease)->status.ok());
  EXPECT_EQ(metric(node_->metrics_text(), "kvgate_prefill_extends_total", "result=\"granted\""), 1);
}

TEST_F(PrefillNodeTest, QueueFullIsResourceExhausted) {
  NodeConfig c = config();
  c.prefill.max_queued_jobs = 1;
  c.prefill.max_queued_tokens = static_cast<int64_t>(prompt_.size()) + 10;
  start(c);
  node_->set_paused_for_test(true);
  const FakeCluster::Grant g = fake_->reserve(RequestId(21), int64_t{4} << 20);
  fake_->send_to_node(job(21, spec("dense"), g));
  fake_->send_to_node(job(22, spec("dense"), g));  // second job: the queue holds one
  auto err = wait_error(22, 10s);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kResourceExhausted);
  EXPECT_NE(err->message.find("max_queued_jobs"), std::string::npos) << err->message;
  EXPECT_EQ(node_->queue_stats().queued_jobs, 1);
  EXPECT_EQ(node_->queue_stats().queued_tokens, static_cast<int64_t>(prompt_.size()));

  // The token limit: a one-job queue of prompt + 10 tokens; cancel 21 first.
  fake_->send_to_node(control::Cancel{RequestId(21), "test"});
  ASSERT_TRUE(fake_->wait_until([&] { return node_->queue_stats().queued_jobs == 0; }, 10s));
  control::PrefillJob big = job(23, spec("dense"), g);
  big.prompt_token_ids.insert(big.prompt_token_ids.end(), prompt_.begin(), prompt_.begin() + 11);
  fake_->send_to_node(big);
  err = wait_error(23, 10s);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kResourceExhausted);
  EXPECT_NE(err->message.find("max_queued_tokens"), std::string::npos) << err->message;
  EXPECT_EQ(metric(node_->metrics_text(), "kvgate_prefill_jobs_failed_total",
                   "cause=\"queue_full\""),
            2);
}

TEST_F(PrefillNodeTest, InvalidJobsAreRefusedNamingTheFieldAndTheNodeKeepsServing) {
  start(config());  // no gate on this node
  const int32_t n_vocab = static_cast<int32_t>(model_->model->config().n_vocab);
  const FakeCluster::Grant g = fake_->reserve(RequestId(31), int64_t{4} << 20);

  control::PrefillJob bad_token = job(31, spec("dense"), g);
  bad_token.prompt_token_ids[5] = n_vocab;
  fake_->send_to_node(bad_token);
  auto err = wait_error(31, 10s);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kInvalidArgument);
  EXPECT_NE(err->message.find("prompt_token_ids[5]"), std::string::npos) << err->message;
  EXPECT_NE(err->message.find(std::to_string(n_vocab)), std::string::npos) << err->message;

  fake_->send_to_node(job(32, spec("bogus"), g));
  err = wait_error(32, 10s);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kInvalidArgument);
  EXPECT_NE(err->message.find("kv_policy.name"), std::string::npos) << err->message;

  fake_->send_to_node(job(33, spec("gate+pod"), g));
  err = wait_error(33, 10s);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kInvalidArgument);
  EXPECT_NE(err->message.find("kv_policy.name"), std::string::npos) << err->message;
  EXPECT_NE(err->message.find("gate"), std::string::npos) << err->message;

  control::PrefillJob too_long = job(34, spec("dense"), g);
  too_long.prompt_token_ids.assign(8193, 1);
  fake_->send_to_node(too_long);
  err = wait_error(34, 10s);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kInvalidArgument);
  EXPECT_NE(err->message.find("prompt_token_ids"), std::string::npos) << err->message;

  control::PrefillJob bad_sampling = job(35, spec("dense"), g);
  bad_sampling.generation.sampling.top_p = 0.0f;
  fake_->send_to_node(bad_sampling);
  err = wait_error(35, 10s);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kInvalidArgument);
  EXPECT_NE(err->message.find("generation.sampling"), std::string::npos) << err->message;

  // Still serving: a valid job on the same lease goes through.
  fake_->send_to_node(job(36, spec("dense"), g));
  auto manifest = wait_manifest(36);
  ASSERT_TRUE(manifest.has_value());
  EXPECT_EQ(manifest->prompt_tokens, prompt_.size());
  EXPECT_EQ(metric(node_->metrics_text(), "kvgate_prefill_jobs_failed_total", "cause=\"invalid\""), 5);
}

TEST_F(PrefillNodeTest, CancelledQueuedJobNeverRuns) {
  start(config());
  node_->set_paused_for_test(true);
  const FakeCluster::Grant ga = fake_->reserve(RequestId(41), int64_t{4} << 20);
  const FakeCluster::Grant gb = fake_->reserve(RequestId(42), int64_t{4} << 20);
  fake_->send_to_node(job(41, spec("dense"), ga));
  fake_->send_to_node(control::Cancel{RequestId(41), "client went away"});
  fake_->send_to_node(job(42, spec("dense"), gb));
  // In order on one connection: once 42 is queued, 41 was queued and dropped.
  ASSERT_TRUE(fake_->wait_until(
      [&] { return metric(node_->metrics_text(), "kvgate_prefill_jobs_queued_total") == 2; }, 10s));
  EXPECT_EQ(node_->queue_stats().queued_jobs, 1);
  node_->set_paused_for_test(false);
  ASSERT_TRUE(wait_manifest(42).has_value());
  ASSERT_TRUE(fake_->wait_until(
      [&] { return metric(node_->metrics_text(), "kvgate_prefill_jobs_done_total") == 1; }, 10s));
  const std::string m = node_->metrics_text();
  EXPECT_EQ(metric(m, "kvgate_prefill_jobs_started_total"), 1);
  EXPECT_EQ(metric(m, "kvgate_prefill_jobs_failed_total", "cause=\"cancelled\""), 1);
  EXPECT_FALSE(manifest_of(41).has_value());
  EXPECT_TRUE(fake_->coordinator_inbox().all<control::Error>().empty());
  EXPECT_FALSE(fake_->receive_event(ga.lease).has_value());
}

}  // namespace
}  // namespace kvgate::prefill

namespace kvgate::prefill {
namespace {

TEST_F(PrefillNodeTest, CancelWhileWaitingForExtendEndsTheJobQuietly) {
  start(config());  // the fake decode never answers Extend
  const FakeCluster::Grant g = fake_->reserve(RequestId(51), page_bytes_);
  fake_->send_to_node(job(51, spec("dense"), g));
  ASSERT_TRUE(fake_->wait_until([&] { return !fake_->decode_inbox().all<control::Extend>().empty(); }));
  fake_->send_to_node(control::Cancel{RequestId(51), "client went away"});
  ASSERT_TRUE(fake_->wait_until(
      [&] {
        return metric(node_->metrics_text(), "kvgate_prefill_jobs_failed_total",
                      "cause=\"cancelled\"") == 1;
      },
      10s));
  EXPECT_TRUE(fake_->coordinator_inbox().all<control::Error>().empty());
  EXPECT_FALSE(manifest_of(51).has_value());
  EXPECT_FALSE(node_->queue_stats().running);
}

TEST_F(PrefillNodeTest, JobDeadlinePassingIsDeadlineExceeded) {
  start(config());  // the fake decode never answers Extend
  const FakeCluster::Grant g = fake_->reserve(RequestId(52), page_bytes_);
  control::PrefillJob j = job(52, spec("dense"), g);
  j.deadline_in = 400ms;
  fake_->send_to_node(j);
  auto err = wait_error(52, 20s);
  ASSERT_TRUE(err.has_value());
  EXPECT_EQ(err->code, StatusCode::kDeadlineExceeded);
  EXPECT_NE(err->message.find("ExtendResult"), std::string::npos) << err->message;
  EXPECT_EQ(metric(node_->metrics_text(), "kvgate_prefill_jobs_failed_total", "cause=\"deadline\""), 1);
}

}  // namespace
}  // namespace kvgate::prefill

namespace kvgate::prefill {
namespace {

// GET `path` from 127.0.0.1:port with a plain socket; the whole response.
std::string http_get(uint16_t port, const std::string& path) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  boost::system::error_code ec;
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), port}, ec);
  if (ec) return "connect: " + ec.message();
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  boost::asio::write(socket, boost::asio::buffer(request), ec);
  std::string response;
  char buf[4096];
  while (true) {
    const size_t n = socket.read_some(boost::asio::buffer(buf), ec);
    response.append(buf, n);
    if (ec) break;
  }
  return response;
}

// (Stopping takes ~2 s here: civetweb's shutdown inside the exposer.)
TEST_F(PrefillNodeTest, ServesMetricsOverHttp) {
  NodeConfig c = config();
  c.metrics.enabled = true;
  c.metrics.listen = {"127.0.0.1", 0};
  start(c);
  ASSERT_TRUE(node_->metrics_address().has_value());
  const uint16_t port = node_->metrics_address()->port;
  ASSERT_NE(port, 0);
  const std::string body = http_get(port, "/metrics");
  EXPECT_NE(body.find("200 OK"), std::string::npos) << body.substr(0, 200);
  EXPECT_NE(body.find("kvgate_prefill_jobs_queued_total{node=\"" + node_->node_name() + "\"} 0"),
            std::string::npos)
      << body.substr(0, 2000);
  EXPECT_NE(body.find("kvgate_prefill_transfer_failures_total"), std::string::npos);
}

// engine.backend: cuda runs the prefill on the GPU (CudaForward +
// prefill_compressed_batch_cuda). Where it cannot (this build has no CUDA
// backend, or the machine no device) the node refuses to start, naming the
// key and why — it never falls back to the CPU silently.
TEST_F(PrefillNodeTest, CudaBackendWithoutAGpuRefusesToStartNamingTheKey) {
  NodeConfig c = config();
  c.engine.backend = EngineBackend::kCuda;
  PrefillResources r;
  r.model = borrowed(model_->model.get());
  r.gate_given = true;
  auto node = PrefillNode::start(c, r);
  ASSERT_FALSE(node.ok());
  EXPECT_NE(node.status().message().find("engine.backend: cuda"), std::string::npos)
      << node.status().to_string();
#if KVGATE_HAVE_CUDA
  // A CUDA build on a machine without a device: UNAVAILABLE from the forward.
  if (engine::cuda::device_count() == 0) {
    EXPECT_EQ(node.status().code(), StatusCode::kUnavailable);
  }
#else
  EXPECT_EQ(node.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(node.status().message().find("-DKVGATE_CUDA=ON"), std::string::npos);
#endif
}

}  // namespace
}  // namespace kvgate::prefill
