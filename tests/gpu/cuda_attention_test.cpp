// Conformance of the CUDA decode attention (label gpu) against
// kvstore/attention.h's CPU kernels on the same pages: proximal and distant
// segments, GQA groups, head dims that are not multiples of 32, batches of
// tasks of different lengths in one launch, and plans with few and many
// splits. Without a device every test skips.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/isa.h"
#include "engine/cuda/cuda_ops.h"
#include "kvstore/attention.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::engine::cuda {
namespace {

using testing::device_zeros;
using testing::to_device;
using testing::to_host;

constexpr double kEps = 1.0 / (1 << 24);
constexpr int64_t kPageTokens = 16;

// One task's data on the host: rows of K and V per segment.
struct HostTask {
  int64_t near = 0, far = 0;
  std::vector<fp16_t> near_k, near_v, far_k, far_v;  // rows x head_dim
  std::vector<float> q, q_base;                      // group x head_dim
};

std::vector<fp16_t> random_halves(size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<fp16_t> v(n);
  for (auto& h : v) h = fp32_to_fp16(dist(rng));
  return v;
}

std::vector<float> random_floats(size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

// Reference: kvstore's CPU kernels, page by page, as kvstore::attend does
// (queries rounded to fp16, proximal and distant partials merged).
void cpu_attention(const HostTask& t, int64_t group, int64_t d, std::vector<float>& out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  out.assign(group * d, 0.0f);
  for (int64_t g = 0; g < group; ++g) {
    std::vector<float> q(d), qb(d), acc_far(d);
    for (int64_t e = 0; e < d; ++e) {
      q[e] = fp16_to_fp32(fp32_to_fp16(t.q[g * d + e]));
      qb[e] = fp16_to_fp32(fp32_to_fp16(t.q_base[g * d + e]));
    }
    float* o = out.data() + g * d;
    kvstore::PartialAttention near_state;
    for (int64_t r = 0; r < t.near; r += kPageTokens) {
      kvstore::accumulate_attention(near_state, o, t.near_k.data() + r * d, t.near_v.data() + r * d,
                                    std::min(kPageTokens, t.near - r), d, q.data(), d, scale,
                                    cpu::Isa::kScalar);
    }
    kvstore::PartialAttention far_state;
    for (int64_t r = 0; r < t.far; r += kPageTokens) {
      kvstore::accumulate_attention(far_state, acc_far.data(), t.far_k.data() + r * d,
                                    t.far_v.data() + r * d, std::min(kPageTokens, t.far - r), d,
                                    qb.data(), d, scale, cpu::Isa::kScalar);
    }
    kvstore::merge_partial(near_state, o, far_state, acc_far.data(), d);
    kvstore::finish_partial(near_state, o, o, d);
  }
}

// Cuts a segment's rows into pages of kPageTokens rows (tail rows of the
// last page poisoned with NaN: the kernel must not read them), appending
// them to `pages` and their indices to `ids`.
void add_pages(const std::vector<fp16_t>& rows, int64_t d, std::vector<std::vector<fp16_t>>& pages,
               std::vector<size_t>& ids) {
  const int64_t n = static_cast<int64_t>(rows.size()) / d;
  for (int64_t r = 0; r < n; r += kPageTokens) {
    std::vector<fp16_t> page(kPageTokens * d, fp32_to_fp16(NAN));
    std::copy(rows.begin() + r * d, rows.begin() + std::min(n, r + kPageTokens) * d, page.begin());
    ids.push_back(pages.size());
    pages.push_back(std::move(page));
  }
}

struct Case {
  int64_t group, head_dim;
  std::vector<std::pair<int64_t, int64_t>> lengths;  // (near, far) per task
  int64_t sm_count;                                  // 0: the device's
};

void run_case(const Case& c, uint32_t seed) {
  const int64_t d = c.head_dim, group = c.group;
  const int64_t n_tasks = static_cast<int64_t>(c.lengths.size());
  std::mt19937 rng(seed);
  std::vector<HostTask> tasks(n_tasks);
  int64_t max_rows = 0;
  for (int64_t i = 0; i < n_tasks; ++i) {
    HostTask& t = tasks[i];
    t.near = c.lengths[i].first;
    t.far = c.lengths[i].second;
    max_rows = std::max(max_rows, t.near + t.far);
    t.near_k = random_halves(t.near * d, rng, 1.0f);
    t.near_v = random_halves(t.near * d, rng, 1.0f);
    t.far_k = random_halves(t.far * d, rng, 1.0f);
    t.far_v = random_halves(t.far * d, rng, 1.0f);
    t.q = random_floats(group * d, rng, 1.5f);
    t.q_base = random_floats(group * d, rng, 1.5f);
  }
  int sms = static_cast<int>(c.sm_count);
  if (sms == 0) {
    auto m = multiprocessor_count();
    ASSERT_TRUE(m.ok()) << m.status().to_string();
    sms = *m;
  }
  auto plan = plan_decode_attention({n_tasks, group, d, kPageTokens, max_rows, sms});
  ASSERT_TRUE(plan.ok()) << plan.status().to_string();

  // Pages: one pool, page order shuffled, so a segment's pages are not adjacent.
  std::vector<std::vector<fp16_t>> pages;
  struct Ids {
    std::vector<size_t> nk, nv, fk, fv;
  };
  std::vector<Ids> ids(n_tasks);
  for (int64_t i = 0; i < n_tasks; ++i) {
    add_pages(tasks[i].near_k, d, pages, ids[i].nk);
    add_pages(tasks[i].near_v, d, pages, ids[i].nv);
    add_pages(tasks[i].far_k, d, pages, ids[i].fk);
    add_pages(tasks[i].far_v, d, pages, ids[i].fv);
  }
  std::vector<size_t> slot(pages.size());
  for (size_t i = 0; i < slot.size(); ++i) slot[i] = i;
  std::shuffle(slot.begin(), slot.end(), rng);
  std::vector<fp16_t> pool(std::max<size_t>(1, pages.size()) * kPageTokens * d);
  for (size_t i = 0; i < pages.size(); ++i) {
    std::copy(pages[i].begin(), pages[i].end(), pool.begin() + slot[i] * kPageTokens * d);
  }
  DeviceBuffer pool_d = to_device(pool);
  auto addr = [&](size_t page) {
    return reinterpret_cast<const uint16_t*>(pool_d.as<fp16_t>() + slot[page] * kPageTokens * d);
  };
  // Page address lists, then q/q_base/out, all in device memory.
  std::vector<const uint16_t*> lists;
  std::vector<size_t> list_off(n_tasks * 4);
  for (int64_t i = 0; i < n_tasks; ++i) {
    const std::vector<size_t>* segs[4] = {&ids[i].nk, &ids[i].nv, &ids[i].fk, &ids[i].fv};
    for (int s = 0; s < 4; ++s) {
      list_off[i * 4 + s] = lists.size();
      for (size_t p : *segs[s]) lists.push_back(addr(p));
    }
  }
  lists.push_back(nullptr);  // never empty
  DeviceBuffer lists_d = to_device(lists);
  std::vector<float> qs;
  for (const auto& t : tasks) {
    qs.insert(qs.end(), t.q.begin(), t.q.end());
    qs.insert(qs.end(), t.q_base.begin(), t.q_base.end());
  }
  DeviceBuffer q_d = to_device(qs);
  DeviceBuffer out_d = device_zeros<float>(n_tasks * group * d);
  std::vector<AttnTask> recs(n_tasks);
  const auto* lbase = lists_d.as<const uint16_t*>();
  for (int64_t i = 0; i < n_tasks; ++i) {
    AttnTask& r = recs[i];
    r.near_k = lbase + list_off[i * 4 + 0];
    r.near_v = lbase + list_off[i * 4 + 1];
    r.far_k = lbase + list_off[i * 4 + 2];
    r.far_v = lbase + list_off[i * 4 + 3];
    r.near_tokens = static_cast<int32_t>(tasks[i].near);
    r.far_tokens = static_cast<int32_t>(tasks[i].far);
    r.q = q_d.as<float>() + i * 2 * group * d;
    r.q_base = r.q + group * d;
    r.out = out_d.as<float>() + i * group * d;
  }
  ASSERT_TRUE(check_attn_tasks(recs.data(), n_tasks, *plan).ok());
  DeviceBuffer recs_d = to_device(recs);
  auto work = DeviceBuffer::allocate(plan->workspace_bytes);
  ASSERT_TRUE(work.ok());
  const Status st =
      decode_attention(*plan, recs_d.as<AttnTask>(), n_tasks, work->as<float>(), nullptr);
  ASSERT_TRUE(st.ok()) << st.to_string();
  ASSERT_TRUE(cuda_status(cudaDeviceSynchronize(), "synchronize").ok());
  const auto got = to_host<float>(out_d, n_tasks * group * d);

  for (int64_t i = 0; i < n_tasks; ++i) {
    const HostTask& t = tasks[i];
    std::vector<float> want;
    cpu_attention(t, group, d, want);
    const int64_t n = t.near + t.far;
    for (int64_t g = 0; g < group; ++g) {
      // Score error: both sides sum d exact products in some order, (d + 8)
      // ulps of sum |k q| * scale each. A score error delta moves the
      // weights by ~2 delta relative; exponentials, the sums over n rows and
      // the merges add (n + d + 16) ulps each side; the output is a convex
      // combination of V rows, so the bound scales with max |v|.
      double max_abs_dot = 0, max_v = 0;
      auto scan = [&](const std::vector<fp16_t>& k, const std::vector<fp16_t>& v, int64_t rows,
                      const std::vector<float>& q) {
        for (int64_t r = 0; r < rows; ++r) {
          double s = 0;
          for (int64_t e = 0; e < d; ++e) {
            s += std::fabs(fp16_to_fp32(k[r * d + e]) * q[g * d + e]);
            max_v = std::max<double>(max_v, std::fabs(fp16_to_fp32(v[r * d + e])));
          }
          max_abs_dot = std::max(max_abs_dot, s);
        }
      };
      scan(t.near_k, t.near_v, t.near, t.q);
      scan(t.far_k, t.far_v, t.far, t.q_base);
      const double delta = 2.0 * (d + 8) * kEps * max_abs_dot / std::sqrt(double(d));
      const double tol = max_v * (4 * delta + 4.0 * (n + d + 16) * kEps);
      for (int64_t e = 0; e < d; ++e) {
        const size_t o = (i * group + g) * d + e;
        ASSERT_NEAR(got[o], want[g * d + e], tol)
            << "task " << i << " (" << t.near << " near, " << t.far << " far) head " << g
            << " elem " << e << " splits " << plan->n_splits;
      }
    }
  }
}

TEST(CudaAttention, SmolLmShapesOneTaskPerHead) {
  KVGATE_REQUIRE_GPU();
  // 3 KV heads of a layer, group 3, d 64: window only, window + distant.
  run_case({3, 64, {{1, 0}, {20, 0}, {272, 0}}, 0}, 1);
  run_case({3, 64, {{272, 1000}, {272, 3}, {5, 4000}}, 0}, 2);
}

TEST(CudaAttention, GroupsAndHeadDims) {
  KVGATE_REQUIRE_GPU();
  uint32_t seed = 10;
  for (int64_t group : {1, 2, 4, 8}) {
    for (int64_t d : {32, 64, 80, 128, 256}) {
      if (group * d > kAttnMaxGroupDims) continue;
      run_case({group, d, {{17, 300}, {300, 0}, {64, 64}}, 0}, seed++);
    }
  }
}

// The same tasks under a plan with few splits (1 SM: 2 splits of 3756
// rows) and one with many (1000 SMs: 117 splits of 64 rows): the
// log-sum-exp merges must not change the result beyond the bound.
TEST(CudaAttention, SplitCountDoesNotMatter) {
  KVGATE_REQUIRE_GPU();
  run_case({4, 128, {{512, 7000}, {1, 1}, {272, 33}}, 1}, 30);
  run_case({4, 128, {{512, 7000}, {1, 1}, {272, 33}}, 1000}, 30);
}

TEST(CudaAttention, ManyTasksOfDifferentLengths) {
  KVGATE_REQUIRE_GPU();
  std::vector<std::pair<int64_t, int64_t>> lengths;
  std::mt19937 rng(40);
  for (int i = 0; i < 96; ++i) lengths.emplace_back(1 + rng() % 300, rng() % 2000);
  run_case({3, 64, lengths, 0}, 41);
}

TEST(CudaAttention, RejectsBadCalls) {
  KVGATE_REQUIRE_GPU();
  auto plan = plan_decode_attention({2, 3, 64, kPageTokens, 100, 4});
  ASSERT_TRUE(plan.ok());
  DeviceBuffer buf = device_zeros<float>(1024);
  EXPECT_FALSE(decode_attention(*plan, buf.as<AttnTask>(), 3, buf.as<float>(), nullptr).ok());
  EXPECT_FALSE(decode_attention(*plan, nullptr, 1, buf.as<float>(), nullptr).ok());
  EXPECT_FALSE(decode_attention(*plan, buf.as<AttnTask>(), 1, nullptr, nullptr).ok());
}

}  // namespace
}  // namespace kvgate::engine::cuda
