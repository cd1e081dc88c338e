// BlockMap: per KV head, a partition of the layers into consecutive blocks
// (DESIGN.md §4, PoD). Every layer of a block attends to distant tokens with
// the keys of the block's lowest layer, its *base*; values stay per layer.
//
// Heads may be partitioned differently (ragged): calibration groups layers
// per KV head. The (head, block) pairs are numbered head-major into *slots*
// (slot = offset(h) + b); every per-(block, head) array in kvstore — gate
// flags, retained-token counts, budgets — is indexed by slot.
//
// Immutable after construction; safe to share between threads.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kvgate::kvstore {

// Layers [first_layer, first_layer + n_layers) of one KV head.
struct LayerBlock {
  int32_t first_layer = 0;  // the base layer
  int32_t n_layers = 1;     // g, the block size

  int32_t base_layer() const { return first_layer; }
  int32_t end_layer() const { return first_layer + n_layers; }
  bool operator==(const LayerBlock&) const = default;
};

class BlockMap {
 public:
  // An empty map (no layers, no heads): a placeholder for a value to be
  // assigned; validate_layout() rejects it.
  BlockMap() = default;

  // Validates that, for every head, the blocks are in increasing order and
  // cover [0, n_layers) with no gap, overlap or empty block. Errors name the
  // head and the offending layer.
  static Result<BlockMap> create(int64_t n_layers, std::vector<std::vector<LayerBlock>> per_head);

  // Every block has size 1 (no key sharing): the layout of a dense cache.
  static Result<BlockMap> dense(int64_t n_layers, int64_t n_kv_heads);
  // Blocks of g layers for every head; the last block is shorter when g does
  // not divide n_layers.
  static Result<BlockMap> uniform(int64_t n_layers, int64_t n_kv_heads, int64_t g);

  // Parses the text form written by to_string(): one line per head,
  // "h<i>: <a>-<b>,<c>,..." (a single number is a block of one layer).
  // Lines may also be separated by ';'. Heads must appear in order 0, 1, ...
  static Result<BlockMap> parse(std::string_view text, int64_t n_layers);
  // "h0: 0-3,4-7\nh1: 0,1-7\n"
  std::string to_string() const;

  int64_t n_layers() const { return n_layers_; }
  int64_t n_kv_heads() const { return static_cast<int64_t>(head_offset_.size()) - 1; }
  // Total (head, block) pairs: the length of every per-slot array.
  int64_t n_slots() const { return head_offset_.back(); }

  // Unchecked accessors: h in [0, n_kv_heads()), b in [0, n_blocks(h)),
  // layer in [0, n_layers()). Callers validate request-derived indices first.
  int64_t n_blocks(int64_t h) const { return head_offset_[h + 1] - head_offset_[h]; }
  int64_t slot(int64_t h, int64_t b) const { return head_offset_[h] + b; }
  const LayerBlock& block(int64_t h, int64_t b) const { return blocks_[slot(h, b)]; }
  const LayerBlock& slot_block(int64_t slot) const { return blocks_[slot]; }
  // The head a slot belongs to.
  int64_t slot_head(int64_t slot) const { return slot_head_[slot]; }
  // Index (within head h) of the block holding `layer`.
  int64_t block_index(int64_t layer, int64_t h) const {
    return block_of_layer_[h * n_layers_ + layer];
  }
  int64_t slot_of_layer(int64_t layer, int64_t h) const { return slot(h, block_index(layer, h)); }
  int64_t base_layer(int64_t layer, int64_t h) const {
    return block(h, block_index(layer, h)).first_layer;
  }

  bool operator==(const BlockMap& o) const {
    return n_layers_ == o.n_layers_ && head_offset_ == o.head_offset_ && blocks_ == o.blocks_;
  }

 private:
  int64_t n_layers_ = 0;
  std::vector<int64_t> head_offset_ = {0};  // n_kv_heads + 1 prefix sums of block counts
  std::vector<LayerBlock> blocks_;          // by slot
  std::vector<int32_t> slot_head_;          // by slot
  std::vector<int32_t> block_of_layer_;     // [h][layer] -> block index within h
};

}  // namespace kvgate::kvstore
