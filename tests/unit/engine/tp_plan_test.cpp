// Tensor-parallel planning (engine/tp/tp_plan.h): pure logic over model
// shapes, no model file needed.
#include "engine/tp/tp_plan.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "engine/tp/collective.h"

namespace kvgate::engine::tp {
namespace {

LlamaConfig shapes(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t n_ff) {
  LlamaConfig c;
  c.architecture = "llama";
  c.n_layers = 2;
  c.n_heads = n_heads;
  c.n_kv_heads = n_kv_heads;
  c.head_dim = head_dim;
  c.n_embd = n_heads * head_dim;
  c.n_ff = n_ff;
  c.n_vocab = 100;
  return c;
}
LlamaConfig smollm2() { return shapes(9, 3, 64, 1536); }
LlamaConfig llama3_8b() { return shapes(32, 8, 128, 14336); }

const TpWeight kAll[] = {TpWeight::kWq, TpWeight::kWk,   TpWeight::kWv,   TpWeight::kWo,
                         TpWeight::kWGate, TpWeight::kWUp, TpWeight::kWDown};

// Every invariant the forward relies on, for one valid plan.
void check_plan(const LlamaConfig& c, const TpPlan& p, int world) {
  ASSERT_EQ(p.world_size, world);
  ASSERT_EQ(static_cast<int>(p.ranks.size()), world);
  const int64_t group = c.n_heads / c.n_kv_heads;
  std::vector<int> q_owner(c.n_heads, -1), kv_owner(c.n_kv_heads, -1), ff_owner(c.n_ff, -1);
  for (int r = 0; r < world; ++r) {
    const TpRankPlan& rp = p.ranks[r];
    EXPECT_EQ(rp.rank, r);
    // KV heads split evenly.
    EXPECT_EQ(rp.kv_heads.size(), c.n_kv_heads / world);
    // The rank's query heads are exactly the GQA groups of its KV heads.
    EXPECT_EQ(rp.q_heads.begin, rp.kv_heads.begin * group);
    EXPECT_EQ(rp.q_heads.end, rp.kv_heads.end * group);
    for (int64_t h = rp.q_heads.begin; h < rp.q_heads.end; ++h) {
      ASSERT_GE(h, 0);
      ASSERT_LT(h, c.n_heads);
      EXPECT_EQ(q_owner[h], -1) << "query head " << h << " owned twice";
      q_owner[h] = r;
      // Its KV head (h / group) is this rank's too.
      EXPECT_GE(h / group, rp.kv_heads.begin);
      EXPECT_LT(h / group, rp.kv_heads.end);
    }
    for (int64_t h = rp.kv_heads.begin; h < rp.kv_heads.end; ++h) {
      EXPECT_EQ(kv_owner[h], -1) << "KV head " << h << " owned twice";
      kv_owner[h] = r;
    }
    for (int64_t j = rp.ff.begin; j < rp.ff.end; ++j) {
      EXPECT_EQ(ff_owner[j], -1) << "MLP column " << j << " owned twice";
      ff_owner[j] = r;
    }
    // Row-parallel splits on quant-block boundaries (both ends).
    for (TpWeight w : {TpWeight::kWo, TpWeight::kWDown}) {
      const TpRange rg = p.range(r, w);
      EXPECT_EQ(rg.begin % kTpBlockCols, 0) << tp_weight_name(w) << " rank " << r;
      EXPECT_EQ(rg.end % kTpBlockCols, 0) << tp_weight_name(w) << " rank " << r;
    }
  }
  for (int64_t h = 0; h < c.n_heads; ++h) EXPECT_NE(q_owner[h], -1) << "query head " << h;
  for (int64_t h = 0; h < c.n_kv_heads; ++h) EXPECT_NE(kv_owner[h], -1) << "KV head " << h;
  for (int64_t j = 0; j < c.n_ff; ++j) ASSERT_NE(ff_owner[j], -1) << "MLP column " << j;
  // MLP blocks as even as possible: sizes differ by at most one block.
  int64_t lo = c.n_ff, hi = 0;
  for (const auto& rp : p.ranks) {
    lo = std::min(lo, rp.ff.size());
    hi = std::max(hi, rp.ff.size());
  }
  EXPECT_LE(hi - lo, kTpBlockCols);
  // Each weight's ranges tile its split dimension in rank order.
  for (TpWeight w : kAll) {
    const int64_t full = tp_split_of(w) == TpSplit::kColumn ? p.rows(w) : p.cols(w);
    int64_t at = 0;
    for (int r = 0; r < world; ++r) {
      const TpRange rg = p.range(r, w);
      EXPECT_EQ(rg.begin, at) << tp_weight_name(w) << " rank " << r;
      EXPECT_GT(rg.size(), 0) << tp_weight_name(w) << " rank " << r;
      at = rg.end;
    }
    EXPECT_EQ(at, full) << tp_weight_name(w);
  }
}

TEST(TpPlan, SplitKinds) {
  EXPECT_EQ(tp_split_of(TpWeight::kWq), TpSplit::kColumn);
  EXPECT_EQ(tp_split_of(TpWeight::kWk), TpSplit::kColumn);
  EXPECT_EQ(tp_split_of(TpWeight::kWv), TpSplit::kColumn);
  EXPECT_EQ(tp_split_of(TpWeight::kWGate), TpSplit::kColumn);
  EXPECT_EQ(tp_split_of(TpWeight::kWUp), TpSplit::kColumn);
  EXPECT_EQ(tp_split_of(TpWeight::kWo), TpSplit::kRow);
  EXPECT_EQ(tp_split_of(TpWeight::kWDown), TpSplit::kRow);
}

TEST(TpPlan, SmolLM2ValidWorlds) {
  for (int world : {1, 3}) {
    SCOPED_TRACE(world);
    auto p = plan_tensor_parallel(smollm2(), world);
    ASSERT_TRUE(p.ok()) << p.status().to_string();
    check_plan(smollm2(), *p, world);
  }
  // The concrete split at world 3: one KV head, 3 query heads, 512 MLP
  // columns (16 blocks) per rank.
  auto p = plan_tensor_parallel(smollm2(), 3);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->ranks[1].kv_heads, (TpRange{1, 2}));
  EXPECT_EQ(p->ranks[1].q_heads, (TpRange{3, 6}));
  EXPECT_EQ(p->ranks[1].ff, (TpRange{512, 1024}));
  EXPECT_EQ(p->range(2, TpWeight::kWq), (TpRange{384, 576}));
  EXPECT_EQ(p->range(2, TpWeight::kWk), (TpRange{128, 192}));
  EXPECT_EQ(p->range(2, TpWeight::kWo), (TpRange{384, 576}));
  EXPECT_EQ(p->range(0, TpWeight::kWDown), (TpRange{0, 512}));
}

TEST(TpPlan, SmolLM2InvalidWorlds) {
  for (int world : {-1, 0, 2, 4, 6, 9}) {
    SCOPED_TRACE(world);
    auto p = plan_tensor_parallel(smollm2(), world);
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  }
  EXPECT_NE(plan_tensor_parallel(smollm2(), 0).status().message().find("at least 1"), std::string::npos);
  EXPECT_NE(plan_tensor_parallel(smollm2(), 2).status().message().find("does not divide"),
            std::string::npos);
  EXPECT_NE(plan_tensor_parallel(smollm2(), 4).status().message().find("exceeds the model's 3 KV heads"),
            std::string::npos);
}

TEST(TpPlan, Llama3_8BValidWorlds) {
  for (int world : {1, 2, 4, 8}) {
    SCOPED_TRACE(world);
    auto p = plan_tensor_parallel(llama3_8b(), world);
    ASSERT_TRUE(p.ok()) << p.status().to_string();
    check_plan(llama3_8b(), *p, world);
  }
  auto p = plan_tensor_parallel(llama3_8b(), 8);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->ranks[7].q_heads, (TpRange{28, 32}));
  EXPECT_EQ(p->ranks[7].ff, (TpRange{7 * 1792, 14336}));  // 448 blocks / 8 = 56 each
}

TEST(TpPlan, Llama3_8BInvalidWorlds) {
  for (int world : {0, 3, 5, 6, 7, 16}) {
    SCOPED_TRACE(world);
    auto p = plan_tensor_parallel(llama3_8b(), world);
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  }
}

TEST(TpPlan, UnevenMlpBlocksDifferByOneBlock) {
  // 11 blocks over 2 ranks: the first rank takes the odd block (6 and 5).
  const LlamaConfig c = shapes(8, 4, 64, 32 * 11);
  auto p = plan_tensor_parallel(c, 2);
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  check_plan(c, *p, 2);
  EXPECT_EQ(p->ranks[0].ff, (TpRange{0, 192}));
  EXPECT_EQ(p->ranks[1].ff, (TpRange{192, 352}));
}

TEST(TpPlan, SplitOffBlockBoundaryIsRejected) {
  // n_ff not a multiple of 32: fine unsplit, rejected when split.
  const LlamaConfig odd_ff = shapes(8, 4, 64, 1000);
  EXPECT_TRUE(plan_tensor_parallel(odd_ff, 1).ok());
  auto p = plan_tensor_parallel(odd_ff, 2);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("MLP width 1000"), std::string::npos) << p.status().to_string();

  // head_dim 16, one query head per rank: wo's split at 16 columns.
  const LlamaConfig small_heads = shapes(4, 4, 16, 256);
  p = plan_tensor_parallel(small_heads, 4);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("attention-output columns"), std::string::npos)
      << p.status().to_string();
  // Two heads per rank (32 columns) is on the boundary.
  EXPECT_TRUE(plan_tensor_parallel(small_heads, 2).ok());

  // Fewer MLP blocks than ranks.
  const LlamaConfig narrow_ff = shapes(8, 8, 64, 64);
  p = plan_tensor_parallel(narrow_ff, 4);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("quant blocks of the MLP width"), std::string::npos);
}

TEST(TpPlan, InconsistentHeadsRejected) {
  LlamaConfig c = shapes(9, 4, 64, 1536);  // 9 % 4 != 0
  auto p = plan_tensor_parallel(c, 1);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
}

// ---- InProcessGroup (engine/tp/collective.h): pure threading, no model.

using Group = std::vector<std::unique_ptr<Collective>>;

Group make_group(int world, std::chrono::milliseconds timeout = std::chrono::milliseconds(20000)) {
  auto g = InProcessGroup::create(world, timeout);
  EXPECT_TRUE(g.ok()) << g.status().to_string();
  return g.ok() ? std::move(*g) : Group{};
}

// Runs body(rank) on one thread per rank and joins them all.
void run_ranks(int world, const std::function<void(int)>& body) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back(body, r);
  for (auto& t : threads) t.join();
}

// Rank r's input element i, chosen so the float sum depends on the order
// (large values cancel, small ones are absorbed unless added last).
float input(int r, size_t i) {
  const float big[] = {1e8f, 3.0f, -1e8f, 0.1f};
  return big[r % 4] * (1.0f + 0.001f * static_cast<float>(i)) + 0.37f * static_cast<float>(r);
}

TEST(InProcessGroup, AllReduceSumsInRankOrderBitIdenticalOnEveryRank) {
  for (int world : {1, 2, 3, 4}) {
    SCOPED_TRACE(world);
    Group g = make_group(world);
    ASSERT_EQ(static_cast<int>(g.size()), world);
    // Several sizes, including one that does not divide among the ranks and
    // one larger than before (the shared buffer grows), and n = 0.
    const std::vector<size_t> sizes = {7, 1000, 3, 0, 4097};
    std::vector<std::vector<std::vector<float>>> got(world);
    run_ranks(world, [&](int r) {
      EXPECT_EQ(g[r]->rank(), r);
      EXPECT_EQ(g[r]->world(), world);
      for (size_t n : sizes) {
        std::vector<float> data(n);
        for (size_t i = 0; i < n; ++i) data[i] = input(r, i);
        Status s = g[r]->all_reduce_sum(data.data(), n);
        EXPECT_TRUE(s.ok()) << s.to_string();
        got[r].push_back(std::move(data));
      }
    });
    for (size_t k = 0; k < sizes.size(); ++k) {
      for (size_t i = 0; i < sizes[k]; ++i) {
        float want = input(0, i);
        for (int r = 1; r < world; ++r) want += input(r, i);  // ((r0 + r1) + r2) + ...
        for (int r = 0; r < world; ++r) {
          ASSERT_EQ(std::memcmp(&got[r][k][i], &want, sizeof(float)), 0)
              << "size " << sizes[k] << " element " << i << " rank " << r << ": " << got[r][k][i]
              << " vs " << want;
        }
      }
    }
  }
}

TEST(InProcessGroup, BroadcastCopiesTheRootsBytes) {
  Group g = make_group(3);
  std::vector<std::vector<uint8_t>> bufs(3);
  run_ranks(3, [&](int r) {
    bufs[r].assign(100, static_cast<uint8_t>(r));
    if (r == 1) {
      for (size_t i = 0; i < bufs[r].size(); ++i) bufs[r][i] = static_cast<uint8_t>(i * 7 + 1);
    }
    EXPECT_TRUE(g[r]->broadcast(bufs[r].data(), bufs[r].size(), 1).ok());
    EXPECT_TRUE(g[r]->barrier().ok());
  });
  for (int r = 0; r < 3; ++r) {
    for (size_t i = 0; i < 100; ++i) ASSERT_EQ(bufs[r][i], static_cast<uint8_t>(i * 7 + 1)) << r;
  }
}

TEST(InProcessGroup, SizeMismatchIsInvalidArgumentOnEveryRankAndGroupStaysUsable) {
  Group g = make_group(3);
  std::vector<Status> first(3), second(3);
  std::vector<float> after(3);
  run_ranks(3, [&](int r) {
    std::vector<float> data(r == 2 ? 5 : 4, 1.0f);
    first[r] = g[r]->all_reduce_sum(data.data(), data.size());
    float one = static_cast<float>(r + 1);
    second[r] = g[r]->all_reduce_sum(&one, 1);
    after[r] = one;
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(first[r].code(), StatusCode::kInvalidArgument) << first[r].to_string();
    EXPECT_NE(first[r].message().find("rank 2 with 5 floats"), std::string::npos) << first[r].to_string();
    EXPECT_TRUE(second[r].ok()) << second[r].to_string();
    EXPECT_EQ(after[r], 6.0f);
  }
}

TEST(InProcessGroup, MismatchedOperationsAndRootsAreInvalidArgument) {
  Group g = make_group(2);
  std::vector<Status> ops(2), roots(2);
  run_ranks(2, [&](int r) {
    float x = 1.0f;
    ops[r] = r == 0 ? g[r]->all_reduce_sum(&x, 1) : g[r]->barrier();
    roots[r] = g[r]->broadcast(&x, sizeof(x), r);  // each names itself root
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(ops[r].code(), StatusCode::kInvalidArgument) << ops[r].to_string();
    EXPECT_NE(ops[r].message().find("called barrier"), std::string::npos) << ops[r].to_string();
    EXPECT_EQ(roots[r].code(), StatusCode::kInvalidArgument) << roots[r].to_string();
  }
  float x = 0;
  EXPECT_EQ(g[0]->broadcast(&x, sizeof(x), 2).code(), StatusCode::kInvalidArgument);
}

TEST(InProcessGroup, MissingRankTimesOutWithStatusNotHang) {
  const auto timeout = std::chrono::milliseconds(200);
  Group g = make_group(3, timeout);
  std::vector<Status> st(2);
  const auto t0 = std::chrono::steady_clock::now();
  run_ranks(2, [&](int r) {  // rank 2 never joins
    std::vector<float> data(16, 1.0f);
    st[r] = g[r]->all_reduce_sum(data.data(), data.size());
  });
  const auto waited = std::chrono::steady_clock::now() - t0;
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(st[r].code(), StatusCode::kDeadlineExceeded) << st[r].to_string();
    EXPECT_NE(st[r].message().find("rank(s) 2 did not reach"), std::string::npos) << st[r].to_string();
  }
  EXPECT_GE(waited, timeout);
  EXPECT_LT(waited, std::chrono::seconds(10));  // one timeout, not a hang
  // The group is broken: the late rank fails fast with the same Status.
  float x = 1.0f;
  Status late = g[2]->all_reduce_sum(&x, 1);
  EXPECT_EQ(late.code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(g[0]->barrier().code(), StatusCode::kDeadlineExceeded);
}

TEST(InProcessGroup, RankThatLeftIsUnavailable) {
  // A long timeout: the waiting ranks must be woken by the departure, not
  // by the deadline.
  Group g = make_group(3, std::chrono::milliseconds(60000));
  std::vector<Status> st(2);
  const auto t0 = std::chrono::steady_clock::now();
  std::thread leaver([&] { g[2].reset(); });
  run_ranks(2, [&](int r) { st[r] = g[r]->barrier(); });
  leaver.join();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(st[r].code(), StatusCode::kUnavailable) << st[r].to_string();
    EXPECT_NE(st[r].message().find("rank 2 left"), std::string::npos) << st[r].to_string();
  }
}

TEST(InProcessGroup, InvalidCreate) {
  EXPECT_EQ(InProcessGroup::create(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(InProcessGroup::create(2, std::chrono::milliseconds(0)).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::engine::tp
