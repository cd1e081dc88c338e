#include "kvstore/block_map.h"

#include <algorithm>
#include <charconv>
#include <utility>

namespace kvgate::kvstore {
namespace {

// Far beyond any real model; keeps a bad config from asking for huge tables.
constexpr int64_t kMaxLayers = 1 << 12;
constexpr int64_t kMaxKvHeads = 1 << 12;

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  return s;
}

Result<int64_t> parse_int(std::string_view s, std::string_view what) {
  s = trim(s);
  int64_t v = 0;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || ptr != s.data() + s.size()) {
    return invalid_argument("block map: bad " + std::string(what) + " '" + std::string(s) + "'");
  }
  return v;
}

}  // namespace

Result<BlockMap> BlockMap::create(int64_t n_layers, std::vector<std::vector<LayerBlock>> per_head) {
  if (n_layers < 1 || n_layers > kMaxLayers) {
    return invalid_argument("block map: n_layers " + std::to_string(n_layers) + " not in [1, " +
                            std::to_string(kMaxLayers) + "]");
  }
  const int64_t n_heads = static_cast<int64_t>(per_head.size());
  if (n_heads < 1 || n_heads > kMaxKvHeads) {
    return invalid_argument("block map: n_kv_heads " + std::to_string(n_heads) + " not in [1, " +
                            std::to_string(kMaxKvHeads) + "]");
  }
  BlockMap m;
  m.n_layers_ = n_layers;
  m.head_offset_.assign(1, 0);
  m.block_of_layer_.assign(n_heads * n_layers, -1);
  for (int64_t h = 0; h < n_heads; ++h) {
    const std::string head = "block map: head " + std::to_string(h) + ": ";
    int64_t next = 0;  // first layer not yet covered
    for (size_t b = 0; b < per_head[h].size(); ++b) {
      const LayerBlock& blk = per_head[h][b];
      const std::string which = "block " + std::to_string(b) + " (layers " +
                                std::to_string(blk.first_layer) + "-" +
                                std::to_string(int64_t{blk.first_layer} + blk.n_layers - 1) + ")";
      if (blk.n_layers < 1) return invalid_argument(head + which + " is empty");
      if (blk.first_layer < 0 || int64_t{blk.first_layer} + blk.n_layers > n_layers) {
        return invalid_argument(head + which + " is out of range [0, " + std::to_string(n_layers) +
                                ")");
      }
      if (blk.first_layer > next) {
        return invalid_argument(head + "gap: layers " + std::to_string(next) + "-" +
                                std::to_string(blk.first_layer - 1) + " are in no block");
      }
      if (blk.first_layer < next) {
        return invalid_argument(head + which + " overlaps the previous block (layer " +
                                std::to_string(blk.first_layer) + ")");
      }
      for (int32_t l = blk.first_layer; l < blk.end_layer(); ++l) {
        m.block_of_layer_[h * n_layers + l] = static_cast<int32_t>(b);
      }
      m.blocks_.push_back(blk);
      m.slot_head_.push_back(static_cast<int32_t>(h));
      next = blk.end_layer();
    }
    if (next != n_layers) {
      return invalid_argument(head + "gap: layers " + std::to_string(next) + "-" +
                              std::to_string(n_layers - 1) + " are in no block");
    }
    m.head_offset_.push_back(static_cast<int64_t>(m.blocks_.size()));
  }
  return m;
}

Result<BlockMap> BlockMap::dense(int64_t n_layers, int64_t n_kv_heads) {
  return uniform(n_layers, n_kv_heads, 1);
}

Result<BlockMap> BlockMap::uniform(int64_t n_layers, int64_t n_kv_heads, int64_t g) {
  if (g < 1) return invalid_argument("block map: block size " + std::to_string(g) + " < 1");
  if (n_layers < 1 || n_layers > kMaxLayers || n_kv_heads < 1 || n_kv_heads > kMaxKvHeads) {
    return invalid_argument("block map: bad shape n_layers " + std::to_string(n_layers) +
                            ", n_kv_heads " + std::to_string(n_kv_heads));
  }
  std::vector<LayerBlock> blocks;
  for (int64_t l = 0; l < n_layers; l += g) {
    blocks.push_back({static_cast<int32_t>(l), static_cast<int32_t>(std::min(g, n_layers - l))});
  }
  return create(n_layers, std::vector<std::vector<LayerBlock>>(n_kv_heads, blocks));
}

std::string BlockMap::to_string() const {
  std::string out;
  for (int64_t h = 0; h < n_kv_heads(); ++h) {
    out += "h" + std::to_string(h) + ":";
    for (int64_t b = 0; b < n_blocks(h); ++b) {
      const LayerBlock& blk = block(h, b);
      out += b == 0 ? " " : ",";
      out += std::to_string(blk.first_layer);
      if (blk.n_layers > 1) out += "-" + std::to_string(blk.end_layer() - 1);
    }
    out += "\n";
  }
  return out;
}

Result<BlockMap> BlockMap::parse(std::string_view text, int64_t n_layers) {
  std::vector<std::vector<LayerBlock>> per_head;
  size_t line_no = 0;
  while (!text.empty()) {
    const size_t end = text.find_first_of("\n;");
    std::string_view line = trim(text.substr(0, end));
    text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    ++line_no;
    if (line.empty()) continue;
    const std::string where = "block map line " + std::to_string(line_no) + ": ";
    const size_t colon = line.find(':');
    std::string_view tag = trim(line.substr(0, colon));
    if (colon == std::string_view::npos || tag.size() < 2 || tag.front() != 'h') {
      return invalid_argument(where + "expected 'h<head>: <blocks>', got '" + std::string(line) +
                              "'");
    }
    KVGATE_ASSIGN_OR_RETURN(const int64_t head, parse_int(tag.substr(1), "head index"));
    if (head != static_cast<int64_t>(per_head.size())) {
      return invalid_argument(where + "head " + std::to_string(head) + " out of order (expected h" +
                              std::to_string(per_head.size()) + ")");
    }
    if (head >= kMaxKvHeads) return invalid_argument(where + "too many heads");
    std::vector<LayerBlock>& blocks = per_head.emplace_back();
    std::string_view rest = line.substr(colon + 1);
    while (true) {
      const size_t comma = rest.find(',');
      const std::string_view item = trim(rest.substr(0, comma));
      const size_t dash = item.find('-');
      KVGATE_ASSIGN_OR_RETURN(const int64_t first, parse_int(item.substr(0, dash), "layer"));
      int64_t last = first;
      if (dash != std::string_view::npos) {
        KVGATE_ASSIGN_OR_RETURN(last, parse_int(item.substr(dash + 1), "layer"));
      }
      if (first < 0 || last < first || last >= kMaxLayers) {
        return invalid_argument(where + "bad layer range '" + std::string(item) + "'");
      }
      blocks.push_back({static_cast<int32_t>(first), static_cast<int32_t>(last - first + 1)});
      if (comma == std::string_view::npos) break;
      rest = rest.substr(comma + 1);
    }
  }
  return create(n_layers, std::move(per_head));
}

}  // namespace kvgate::kvstore
