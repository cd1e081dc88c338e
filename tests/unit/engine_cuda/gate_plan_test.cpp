// plan_gate: shapes, grid and scratch sizes, and rejection of bad shapes
// naming the field; gate_context_rows against the CPU's context rule.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>

#include "engine/cuda/gate_plan.h"
#include "engine/cuda/kernel_params.h"

namespace kvgate::engine::cuda {
namespace {

TEST(GatePlan, ShapesAndScratch) {
  auto p = plan_gate(300, 3, 4, 8, 4, 16, 64);
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(p->dim, 32);
  EXPECT_EQ(p->logit_blocks, 900);
  EXPECT_EQ(p->logit_threads, 32);
  // 300 * 3 * 96 rows, 8 warps a block.
  EXPECT_EQ(p->project_blocks, 300 * 3 * 96 / 8);
  EXPECT_EQ(p->project_threads, 256);
  EXPECT_EQ(p->flag_blocks, (900 + 255) / 256);
  EXPECT_EQ(p->proj_bytes, size_t{300} * 3 * 96 * 4);
  EXPECT_EQ(p->logits_bytes, size_t{900} * 4);
}

TEST(GatePlan, ProjectBlocksRoundUp) {
  auto p = plan_gate(1, 1, 1, 1, 0, 1, 1);  // 3 rows: one block
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->project_blocks, 1);
  EXPECT_EQ(p->flag_blocks, 1);
  EXPECT_EQ(p->proj_bytes, 12u);
}

void expect_rejects(Result<GatePlan> r, const std::string& field) {
  ASSERT_FALSE(r.ok()) << field;
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(field), std::string::npos) << r.status().to_string();
}

TEST(GatePlan, RejectsBadShapesNamingTheField) {
  expect_rejects(plan_gate(0, 1, 2, 4, 4, 16, 8), "n_tokens");
  expect_rejects(plan_gate(-5, 1, 2, 4, 4, 16, 8), "n_tokens");
  expect_rejects(plan_gate(1, 0, 2, 4, 4, 16, 8), "n_slots");
  expect_rejects(plan_gate(1, 1, 0, 4, 4, 16, 8), "heads");
  expect_rejects(plan_gate(1, 1, 65, 4, 4, 16, 8), "heads");
  expect_rejects(plan_gate(1, 1, 2, 0, 4, 16, 8), "head_dim");
  expect_rejects(plan_gate(1, 1, 2, 65, 4, 16, 8), "head_dim");
  expect_rejects(plan_gate(1, 1, 2, 4, -1, 16, 8), "n_sink");
  expect_rejects(plan_gate(1, 1, 2, 4, 4, 0, 8), "n_window");
  expect_rejects(plan_gate(1, 1, 2, 4, 4, 16, 0), "n_embd");
  expect_rejects(plan_gate(int64_t{1} << 20, int64_t{1} << 12, 2, 4, 4, 16, 8), "n_slots");
  // Pairs fit the logit grid but the projection's rows do not.
  expect_rejects(plan_gate(int64_t{1} << 20, 64, 64, 64, 4, 16, 8), "projection grid");
  EXPECT_TRUE(plan_gate(1, 1, 64, 64, 0, 1, 1).ok());
}

// The CPU's context (gate_runtime.cpp, window context), as a set.
int64_t cpu_context_rows(int64_t t, int64_t n_sink, int64_t window) {
  std::set<int64_t> rows;
  for (int64_t i = 0; i < std::min(n_sink, t + 1); ++i) rows.insert(i);
  for (int64_t i = std::max(n_sink, t + 1 - window); i <= t; ++i) rows.insert(i);
  return static_cast<int64_t>(rows.size());
}

TEST(GatePlan, ContextRowsMatchTheCpuRule) {
  for (int64_t sink : {0, 1, 4}) {
    for (int64_t window : {1, 3, 16}) {
      for (int64_t t = 0; t < 40; ++t) {
        EXPECT_EQ(gate_context_rows(t, sink, window), cpu_context_rows(t, sink, window))
            << "t=" << t << " sink=" << sink << " window=" << window;
      }
    }
  }
  EXPECT_EQ(gate_context_rows(0, 4, 16), 1);     // t < n_sink: the sinks so far
  EXPECT_EQ(gate_context_rows(100, 4, 16), 20);  // 4 sinks + 16 window
  EXPECT_EQ(gate_context_rows(10, 0, 256), 11);
}

}  // namespace
}  // namespace kvgate::engine::cuda
