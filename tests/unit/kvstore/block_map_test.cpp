#include "kvstore/block_map.h"

#include <gtest/gtest.h>

#include <random>

#include "kvstore/layout.h"
#include "tests/unit/kvstore/kv_test_util.h"

namespace kvgate::kvstore {
namespace {

using testing::random_block_map;

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

TEST(BlockMap, DenseHasOneLayerPerBlock) {
  auto m = BlockMap::dense(30, 3);
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  EXPECT_EQ(m->n_layers(), 30);
  EXPECT_EQ(m->n_kv_heads(), 3);
  EXPECT_EQ(m->n_slots(), 90);
  for (int64_t h = 0; h < 3; ++h) {
    for (int64_t l = 0; l < 30; ++l) {
      EXPECT_EQ(m->base_layer(l, h), l);
      EXPECT_EQ(m->block_index(l, h), l);
      EXPECT_EQ(m->slot_of_layer(l, h), h * 30 + l);
    }
  }
}

TEST(BlockMap, UniformLastBlockIsShorter) {
  auto m = BlockMap::uniform(30, 3, 4);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->n_blocks(0), 8);
  EXPECT_EQ(m->block(2, 7).first_layer, 28);
  EXPECT_EQ(m->block(2, 7).n_layers, 2);
  EXPECT_EQ(m->base_layer(29, 1), 28);
  EXPECT_EQ(m->base_layer(5, 1), 4);
  EXPECT_EQ(m->slot_head(m->slot(2, 3)), 2);
  EXPECT_EQ(m->to_string(),
            "h0: 0-3,4-7,8-11,12-15,16-19,20-23,24-27,28-29\n"
            "h1: 0-3,4-7,8-11,12-15,16-19,20-23,24-27,28-29\n"
            "h2: 0-3,4-7,8-11,12-15,16-19,20-23,24-27,28-29\n");
}

TEST(BlockMap, RaggedHeadsAndTextRoundTrip) {
  auto m = BlockMap::parse("h0: 0-3,4,5-7\nh1: 0,1-7;h2:0-7", 8);
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  EXPECT_EQ(m->n_blocks(0), 3);
  EXPECT_EQ(m->n_blocks(1), 2);
  EXPECT_EQ(m->n_blocks(2), 1);
  EXPECT_EQ(m->n_slots(), 6);
  EXPECT_EQ(m->base_layer(6, 0), 5);
  EXPECT_EQ(m->base_layer(6, 1), 1);
  EXPECT_EQ(m->base_layer(6, 2), 0);
  EXPECT_EQ(m->to_string(), "h0: 0-3,4,5-7\nh1: 0,1-7\nh2: 0-7\n");

  std::mt19937 rng(7);
  for (int i = 0; i < 50; ++i) {
    BlockMap r = random_block_map(30, 3, rng);
    auto back = BlockMap::parse(r.to_string(), 30);
    ASSERT_TRUE(back.ok()) << back.status().to_string();
    EXPECT_EQ(*back, r);
  }
}

TEST(BlockMap, RejectsGapOverlapRangeAndEmptyWithClearErrors) {
  auto gap = BlockMap::create(8, {{{0, 3}, {4, 4}}});
  ASSERT_FALSE(gap.ok());
  EXPECT_EQ(gap.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(gap.status().message(), "head 0")) << gap.status().message();
  EXPECT_TRUE(contains(gap.status().message(), "gap: layers 3-3")) << gap.status().message();

  auto tail_gap = BlockMap::create(8, {{{0, 8}}, {{0, 6}}});
  ASSERT_FALSE(tail_gap.ok());
  EXPECT_TRUE(contains(tail_gap.status().message(), "head 1: gap: layers 6-7"))
      << tail_gap.status().message();

  auto overlap = BlockMap::create(8, {{{0, 4}, {3, 5}}});
  ASSERT_FALSE(overlap.ok());
  EXPECT_TRUE(contains(overlap.status().message(), "overlaps")) << overlap.status().message();

  auto range = BlockMap::create(8, {{{0, 4}, {4, 5}}});
  ASSERT_FALSE(range.ok());
  EXPECT_TRUE(contains(range.status().message(), "out of range")) << range.status().message();

  auto empty = BlockMap::create(8, {{{0, 4}, {4, 0}, {4, 4}}});
  ASSERT_FALSE(empty.ok());
  EXPECT_TRUE(contains(empty.status().message(), "empty")) << empty.status().message();

  EXPECT_FALSE(BlockMap::create(0, {{}}).ok());
  EXPECT_FALSE(BlockMap::create(4, {}).ok());
  EXPECT_FALSE(BlockMap::uniform(8, 2, 0).ok());
  EXPECT_FALSE(BlockMap::dense(-1, 2).ok());
}

TEST(BlockMap, ParseErrorsNameTheLine) {
  for (const char* bad : {"x0: 0-7", "h1: 0-7", "h0 0-7", "h0: 0-a", "h0: 5-2", "h0: ,",
                          "h0: 0-3,5-7", "h0: 0-7\nh0: 0-7", "h0: -1-7"}) {
    auto m = BlockMap::parse(bad, 8);
    ASSERT_FALSE(m.ok()) << bad;
    EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_TRUE(contains(m.status().message(), "block map")) << m.status().message();
  }
  EXPECT_FALSE(BlockMap::parse("", 8).ok());  // no heads
}

TEST(KvLayout, ValidationNamesTheField) {
  KvLayout layout = testing::make_layout(*BlockMap::dense(4, 2), 64, 4, 16);
  EXPECT_TRUE(validate_layout(layout).ok());
  KvLayout bad = layout;
  bad.head_dim = 0;
  EXPECT_TRUE(contains(validate_layout(bad).message(), "head_dim"));
  bad = layout;
  bad.head_dim = kMaxHeadDim + 1;
  EXPECT_FALSE(validate_layout(bad).ok());
  bad = layout;
  bad.n_window_tokens = 0;
  EXPECT_TRUE(contains(validate_layout(bad).message(), "n_window_tokens"));
  bad = layout;
  bad.n_sink_tokens = -1;
  EXPECT_TRUE(contains(validate_layout(bad).message(), "n_sink_tokens"));
  bad = layout;
  bad.elem_bytes = 4;
  EXPECT_TRUE(contains(validate_layout(bad).message(), "elem_bytes"));
  bad = layout;
  bad.blocks = BlockMap();
  EXPECT_FALSE(validate_layout(bad).ok());
}

}  // namespace
}  // namespace kvgate::kvstore
