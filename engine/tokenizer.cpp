// Byte-level BPE tokenizer: see tokenizer.h.
//
// Where llama.cpp has a quirk that decides token ids (which tokens count as
// special, how invalid UTF-8 is read, how a piece whose BPE result is not in the
// vocabulary falls back to single bytes), this file reproduces it on purpose;
// each such place says so.
#include "engine/tokenizer.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <unordered_map>

#include "engine/gguf.h"
#include "engine/unicode.h"

namespace kvgate::engine {
namespace {

using unicode::SplitPass;

// Token attributes as llama.cpp derives them from GGUF token types.
enum TokenAttr : uint8_t {
  kAttrUndefined = 0,
  kAttrNormal = 1 << 0,
  kAttrUnknown = 1 << 1,
  kAttrControl = 1 << 2,
  kAttrUserDefined = 1 << 3,
  kAttrUnused = 1 << 4,
  kAttrByte = 1 << 5,
};

std::optional<uint8_t> attr_from_token_type(int64_t type) {
  switch (type) {  // GGUF / llama_token_type numbering
    case 0:
      return kAttrUndefined;
    case 1:
      return kAttrNormal;
    case 2:
      return kAttrUnknown;
    case 3:
      return kAttrControl;
    case 4:
      return kAttrUserDefined;
    case 5:
      return kAttrUnused;
    case 6:
      return kAttrByte;
    default:
      return std::nullopt;
  }
}

// Token texts llama.cpp recognizes (llama-vocab.cpp, load): all of them become
// control tokens even when the file says otherwise; the kEogTexts ones also
// end generation. SmolLM2's "<reponame>" is one of the FIM repo names, so its EOG
// set is {0, 2, 4}; a Qwen2 vocabulary's normal "</s>" is made control and EOG.
// Not modelled: llama.cpp's exceptions for gpt-oss ("<|end|>" next to
// "<|return|>"/"<|call|>") and gemma4/plamo ("</s>"), whose pre-tokenizers
// are not supported here anyway.
constexpr std::string_view kEogTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
    "_<EOT>", "[EOT]", "<|end_of_text|>", "<end_of_utterance>",
    "<\uFF5Cend\u2581of\u2581sentence\uFF5C>", "</s>", "[EOS]", "<eos>", "[e~[",
    // FIM pad, repo and file separator.
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
    "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"};
// FIM prefix, suffix and middle: control, not EOG.
constexpr std::string_view kFimTexts[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",    "<\uFF5Cfim\u2581begin\uFF5C>",
    "<PRE>",          "\u2581<PRE>",  "<|code_prefix|>", "<|prefix|>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",    "<\uFF5Cfim\u2581hole\uFF5C>",
    "<SUF>",          "\u2581<SUF>",  "<|code_suffix|>", "<|suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>",    "<\uFF5Cfim\u2581end\uFF5C>",
    "<MID>",          "\u2581<MID>",  "<|code_middle|>", "<|middle|>"};

// The pre-tokenizers of llama.cpp that this file implements, by the name
// stored in tokenizer.ggml.pre, with the flags llama.cpp attaches to them.
struct PreTokenizer {
  std::string_view name;
  std::array<SplitPass, 2> passes;
  int n_passes;
  bool ignore_merges;  // a piece that is a whole token is not run through BPE
  bool clean_spaces;   // decode() removes spaces before punctuation/contractions
  bool default_add_bos;
};
constexpr PreTokenizer kPreTokenizers[] = {
    {"smollm", {SplitPass::kEachNumber, SplitPass::kGpt2}, 2, false, false, false},
    {"starcoder", {SplitPass::kEachNumber, SplitPass::kGpt2}, 2, false, true, false},
    {"refact", {SplitPass::kEachNumber, SplitPass::kGpt2}, 2, false, true, false},
    {"codeshell", {SplitPass::kEachNumber, SplitPass::kGpt2}, 2, false, true, false},
    {"command-r", {SplitPass::kEachNumber, SplitPass::kGpt2}, 2, false, false, false},
    {"gpt-2", {SplitPass::kGpt2}, 1, false, true, false},
    {"phi-2", {SplitPass::kGpt2}, 1, false, true, false},
    {"mpt", {SplitPass::kGpt2}, 1, false, true, false},
    {"olmo", {SplitPass::kGpt2}, 1, false, true, false},
    {"llama3", {SplitPass::kLlama3}, 1, true, true, true},
    {"llama-v3", {SplitPass::kLlama3}, 1, true, true, true},
    {"llama-bpe", {SplitPass::kLlama3}, 1, true, true, true},
    {"dbrx", {SplitPass::kLlama3}, 1, false, true, false},
    {"smaug-bpe", {SplitPass::kLlama3}, 1, false, true, false},
    {"qwen2", {SplitPass::kQwen2}, 1, false, false, false},
    {"deepseek-r1-qwen", {SplitPass::kQwen2}, 1, false, false, false},
    {"stablelm2", {SplitPass::kQwen2}, 1, false, true, false},
};

const PreTokenizer* find_pre_tokenizer(std::string_view name) {
  for (const auto& p : kPreTokenizers) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

struct MergeRule {
  int32_t rank;
  int32_t result;  // id of the merged token
};

// (left id, right id) -> merge rule, open addressing with linear probing: the
// lookup is the innermost step of BPE, and std::unordered_map's bucket chains
// made it most of the encoding time.
class MergeTable {
 public:
  void reserve(size_t n) {
    size_t capacity = 16;
    while (capacity < 2 * n) capacity *= 2;
    slots_.assign(capacity, Slot{kEmpty, {}});
    mask_ = capacity - 1;
  }
  // Keeps the first rule for a pair (llama.cpp keeps the first rank too).
  void insert(int32_t left, int32_t right, MergeRule rule) {
    const uint64_t key = pair_key(left, right);
    for (size_t i = hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return;
      if (slots_[i].key == kEmpty) {
        slots_[i] = {key, rule};
        return;
      }
    }
  }
  const MergeRule* find(int32_t left, int32_t right) const {
    const uint64_t key = pair_key(left, right);
    for (size_t i = hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].rule;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // ids are >= 0: no pair has this key
  struct Slot {
    uint64_t key;
    MergeRule rule;
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  size_t hash(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ull) >> 32 & mask_; }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

std::string gpt2_encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char b : bytes) {
    unicode::append_utf8(unicode::byte_to_gpt2_codepoint(static_cast<uint8_t>(b)), out);
  }
  return out;
}

// llama_decode_text: the bytes a normal token stands for. A character outside
// the byte alphabet is kept visible as llama.cpp writes it.
std::string gpt2_decode(std::string_view text) {
  std::string out;
  for (const uint32_t cpt : unicode::decode_utf8_lenient(text)) {
    const int byte = unicode::gpt2_codepoint_to_byte(cpt);
    if (byte >= 0) {
      out.push_back(static_cast<char>(byte));
      continue;
    }
    std::string utf8;
    unicode::append_utf8(cpt, utf8);
    out += "[UNK_BYTE_0x";
    for (const char c : utf8) {
      char hex[3];
      std::snprintf(hex, sizeof(hex), "%02x", static_cast<uint8_t>(c));
      out += hex;
    }
    out.append(text);
    out += "]";
  }
  return out;
}

// A byte token's text is "<0xXX>" (llama.cpp reads characters 3 and 4 as hex).
std::string byte_token_piece(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return "";
  unsigned value = 0;
  if (std::sscanf(std::string(text.substr(3, 2)).c_str(), "%2x", &value) != 1) return "";
  return std::string(1, static_cast<char>(value));
}

// HF's clean_up_tokenization_spaces as llama_detokenize does it, in three
// in-place passes over `text` (the passes read characters they have already
// rewritten, so they are kept in this exact form).
void clean_up_spaces(std::string& text) {
  auto pass = [&](auto&& step) {
    const size_t n = text.size();
    size_t total = n ? 1 : 0;
    for (size_t i = 1; i < n; ++i) step(i, n, total);
    text.resize(total);
  };
  // " ?", " !", " .", " ," lose the space.
  pass([&](size_t i, size_t, size_t& total) {
    const char x = text[i];
    if (text[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',')) --total;
    text[total++] = x;
  });
  // " ' " becomes "'".
  pass([&](size_t& i, size_t n, size_t& total) {
    const char x = text[i];
    if (x == '\'' && i + 1 < n && text[i - 1] == ' ' && text[i + 1] == ' ') {
      --total;
      text[++i] = '\0';
    }
    text[total++] = x;
  });
  // " 's", " 'm", " 're", " 've" lose the space.
  pass([&](size_t i, size_t n, size_t& total) {
    const char x = text[i];
    if (text[i - 1] == ' ' && x == '\'' && i + 1 < n) {
      const char x1 = text[i + 1];
      if (x1 == 's' || x1 == 'm') {
        --total;
      } else if (i + 2 < n) {
        const char x2 = text[i + 2];
        if ((x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e')) --total;
      }
    }
    text[total++] = x;
  });
}

// BPE working state for one piece: one symbol per byte (= per character of
// the byte alphabet), linked in a list; merging folds the right symbol into the
// left one. Reused across the pieces of one encode() call.
struct BpeScratch {
  struct Symbol {
    int32_t id;  // -1: the byte's character is not a token (never merges)
    int32_t prev, next;
    uint8_t byte;
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t result;             // id of the merged token
    int32_t left, right;        // symbol indices
    int32_t left_id, right_id;  // ids when queued: a change makes the candidate stale
  };
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
};

Status prefixed(const Status& s, std::string_view what) {
  return Status(s.code(), "tokenizer: " + std::string(what) + ": " + s.message());
}

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> texts;   // token strings as in the vocabulary
  std::vector<std::string> pieces;  // bytes each token decodes to (special ones rendered)
  std::vector<uint8_t> attrs;
  std::vector<uint8_t> eog;
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> text_to_id;
  MergeTable merges;
  std::array<int32_t, 256> byte_ids{};  // token of each byte's character, -1: none
  std::array<std::vector<int32_t>, 256> byte_fallback_ids;
  std::vector<int32_t> special_ids;  // cut out of the text first, longest text first
  const PreTokenizer* pre = nullptr;
  int32_t bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;
  bool add_bos = false;
  std::string chat_template;

  int32_t lookup(std::string_view text) const {
    const auto it = text_to_id.find(text);
    return it == text_to_id.end() ? -1 : it->second;
  }
  void encode_fragment(std::string_view text, std::vector<int32_t>& out) const;
  void encode_piece(std::string_view bytes, BpeScratch& scratch, std::vector<int32_t>& out) const;
};

Result<Tokenizer> Tokenizer::create(TokenizerSpec spec) {
  if (spec.model != "gpt2") {
    return unimplemented("tokenizer: model '" + spec.model +
                         "' is not supported (only 'gpt2', byte-level BPE)");
  }
  auto impl = std::make_shared<Impl>();
  impl->pre = find_pre_tokenizer(spec.pre);
  if (impl->pre == nullptr) {
    return unimplemented("tokenizer: pre-tokenizer '" + spec.pre + "' is not supported");
  }
  const size_t n = spec.tokens.size();
  if (n == 0 || n > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return invalid_argument("tokenizer: vocabulary size " + std::to_string(n) + " is invalid");
  }
  if (!spec.token_types.empty() && spec.token_types.size() != n) {
    return invalid_argument("tokenizer: " + std::to_string(spec.token_types.size()) +
                            " token types for " + std::to_string(n) + " tokens");
  }
  const std::pair<const char*, int32_t> ids[] = {
      {"bos", spec.bos_id}, {"eos", spec.eos_id}, {"unk", spec.unk_id}, {"pad", spec.pad_id}};
  for (const auto& [name, id] : ids) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return out_of_range("tokenizer: " + std::string(name) + " id " + std::to_string(id) +
                          " is outside the vocabulary of " + std::to_string(n) + " tokens");
    }
  }
  if (spec.add_bos && spec.bos_id < 0) {
    return invalid_argument("tokenizer: add_bos is set but there is no bos token");
  }

  impl->texts = std::move(spec.tokens);
  impl->attrs.resize(n, kAttrNormal);
  impl->eog.resize(n, 0);
  impl->text_to_id.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::string& text = impl->texts[i];
    if (text.empty()) text = "[EMPTY_" + std::to_string(i) + "]";  // as llama.cpp names it
    impl->text_to_id[text] = static_cast<int32_t>(i);              // a later duplicate wins
    if (!spec.token_types.empty()) {
      const auto attr = attr_from_token_type(spec.token_types[i]);
      if (!attr) {
        return invalid_argument("tokenizer: token " + std::to_string(i) + " has unknown type " +
                                std::to_string(spec.token_types[i]));
      }
      impl->attrs[i] = *attr;
    }
  }
  for (const std::string_view text : kEogTexts) {
    const int32_t id = impl->lookup(text);
    if (id < 0) continue;
    impl->attrs[id] |= kAttrControl;
    impl->eog[id] = 1;
  }
  for (const std::string_view text : kFimTexts) {
    const int32_t id = impl->lookup(text);
    if (id >= 0) impl->attrs[id] |= kAttrControl;
  }
  if (spec.eos_id >= 0) impl->eog[spec.eos_id] = 1;

  impl->merges.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const std::string& merge = spec.merges[rank];
    const size_t space = merge.find(' ', 1);  // the first part is never empty
    auto bad = [&](const std::string& why) {
      return invalid_argument("tokenizer: merge " + std::to_string(rank) + " '" + merge + "' " +
                              why);
    };
    if (space == std::string::npos) return bad("is not of the form 'left right'");
    const std::string_view left = std::string_view(merge).substr(0, space);
    const std::string_view right = std::string_view(merge).substr(space + 1);
    const int32_t left_id = impl->lookup(left);
    const int32_t right_id = impl->lookup(right);
    if (left_id < 0) return bad("names unknown token '" + std::string(left) + "'");
    if (right_id < 0) return bad("names unknown token '" + std::string(right) + "'");
    const int32_t result = impl->lookup(std::string(left) + std::string(right));
    if (result < 0) return bad("makes a token that is not in the vocabulary");
    if (rank > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
      return bad("rank too large");
    // The first occurrence of a pair keeps its rank, as in llama.cpp.
    impl->merges.insert(left_id, right_id, MergeRule{static_cast<int32_t>(rank), result});
  }

  for (int b = 0; b < 256; ++b) {
    const std::string encoded = gpt2_encode(std::string(1, static_cast<char>(b)));
    impl->byte_ids[b] = impl->lookup(encoded);
    // llama.cpp's fallback for a symbol missing from the vocabulary looks up
    // each byte of its encoded form as a one-byte token (usually none exists).
    for (const char c : encoded) {
      const int32_t id = impl->lookup(std::string(1, c));
      if (id >= 0) impl->byte_fallback_ids[b].push_back(id);
    }
  }

  impl->pieces.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t attr = impl->attrs[i];
    const std::string& text = impl->texts[i];
    if (attr & (kAttrUnknown | kAttrControl | kAttrUserDefined)) {
      impl->pieces[i] = text;
    } else if (attr & kAttrNormal) {
      impl->pieces[i] = gpt2_decode(text);
    } else if (attr & kAttrByte) {
      impl->pieces[i] = byte_token_piece(text);
    }  // unused and undefined tokens decode to nothing
    if (attr & (kAttrUnknown | kAttrControl | kAttrUserDefined)) {
      impl->special_ids.push_back(static_cast<int32_t>(i));
    }
  }
  std::stable_sort(impl->special_ids.begin(), impl->special_ids.end(), [&](int32_t a, int32_t b) {
    return impl->texts[a].size() > impl->texts[b].size();
  });

  impl->bos_id = spec.bos_id;
  impl->eos_id = spec.eos_id;
  impl->unk_id = spec.unk_id;
  impl->pad_id = spec.pad_id;
  impl->add_bos = spec.add_bos;
  impl->chat_template = std::move(spec.chat_template);
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special,
                                       bool parse_special) const {
  const Impl& impl = *impl_;
  std::vector<int32_t> out;
  if (add_special && impl.add_bos) out.push_back(impl.bos_id);
  if (text.empty()) return out;

  // Cut special tokens out of the text, one token at a time, longest first.
  struct Fragment {
    int32_t token;  // -1: raw text
    size_t begin, size;
  };
  std::vector<Fragment> fragments = {{-1, 0, text.size()}};
  std::vector<Fragment> next;
  for (const int32_t id : impl.special_ids) {
    if (!parse_special && (impl.attrs[id] & (kAttrControl | kAttrUnknown))) continue;
    const std::string& special = impl.texts[id];
    if (text.find(special) == std::string_view::npos) continue;
    next.clear();
    for (const Fragment& f : fragments) {
      if (f.token >= 0) {
        next.push_back(f);
        continue;
      }
      const size_t end = f.begin + f.size;
      size_t pos = f.begin;
      for (;;) {
        const size_t match = text.substr(0, end).find(special, pos);
        if (match == std::string_view::npos) break;
        if (match > pos) next.push_back({-1, pos, match - pos});
        next.push_back({id, match, special.size()});
        pos = match + special.size();
      }
      if (pos < end) next.push_back({-1, pos, end - pos});
    }
    fragments.swap(next);
  }

  for (const Fragment& f : fragments) {
    if (f.token >= 0) {
      out.push_back(f.token);
    } else {
      impl.encode_fragment(text.substr(f.begin, f.size), out);
    }
  }
  return out;
}

void Tokenizer::Impl::encode_fragment(std::string_view text, std::vector<int32_t>& out) const {
  const std::vector<uint32_t> cpts = unicode::decode_utf8_lenient(text);
  std::vector<uint32_t> lengths = {static_cast<uint32_t>(cpts.size())};
  std::vector<uint32_t> refined;
  for (int p = 0; p < pre->n_passes; ++p) {
    unicode::split_pieces(pre->passes[p], cpts, lengths, refined);
    lengths.swap(refined);
  }
  // Each piece is re-encoded from its codepoints, so invalid bytes reach BPE as
  // the three bytes of U+FFFD, as in llama.cpp.
  std::string bytes;
  BpeScratch scratch;
  size_t begin = 0;
  for (const uint32_t len : lengths) {
    bytes.clear();
    for (size_t k = begin; k < begin + len; ++k) unicode::append_utf8(cpts[k], bytes);
    encode_piece(bytes, scratch, out);
    begin += len;
  }
}

void Tokenizer::Impl::encode_piece(std::string_view bytes, BpeScratch& scratch,
                                   std::vector<int32_t>& out) const {
  if (pre->ignore_merges) {
    const int32_t whole = lookup(gpt2_encode(bytes));
    if (whole >= 0) {
      out.push_back(whole);
      return;
    }
  }
  using Candidate = BpeScratch::Candidate;
  using Symbol = BpeScratch::Symbol;
  const auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.left > b.left;  // lowest rank, then leftmost
  };
  const int32_t n = static_cast<int32_t>(bytes.size());
  std::vector<Symbol>& symbols = scratch.symbols;
  symbols.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    const auto b = static_cast<uint8_t>(bytes[i]);
    symbols[i] = {byte_ids[b], i - 1, i + 1 < n ? i + 1 : -1, b, true};
  }
  std::vector<Candidate>& heap = scratch.heap;
  heap.clear();
  const auto consider = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const int32_t l = symbols[left].id, r = symbols[right].id;
    if (l < 0 || r < 0) return;
    const MergeRule* rule = merges.find(l, r);
    if (rule == nullptr) return;
    heap.push_back({rule->rank, rule->result, left, right, l, r});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int32_t i = 1; i < n; ++i) consider(i - 1, i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Candidate c = heap.back();
    heap.pop_back();
    Symbol& left = symbols[c.left];
    Symbol& right = symbols[c.right];
    if (!left.alive || !right.alive || left.id != c.left_id || right.id != c.right_id) continue;
    left.id = c.result;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.left;
    consider(left.prev, c.left);
    consider(c.left, left.next);
  }
  for (int32_t i = 0; i >= 0 && i < n; i = symbols[i].next) {
    const Symbol& s = symbols[i];
    if (s.id >= 0) {
      out.push_back(s.id);
    } else {
      const auto& fallback = byte_fallback_ids[s.byte];
      out.insert(out.end(), fallback.begin(), fallback.end());
    }
  }
}

std::string Tokenizer::token_to_piece(int32_t id, bool render_special) const {
  const Impl& impl = *impl_;
  if (id < 0 || id >= vocab_size()) return "";
  if (!render_special && (impl.attrs[id] & (kAttrControl | kAttrUnknown))) return "";
  return impl.pieces[id];
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool render_special) const {
  std::string text;
  for (const int32_t id : ids) text += token_to_piece(id, render_special);
  if (impl_->pre->clean_spaces) clean_up_spaces(text);
  return text;
}

int32_t Tokenizer::bos_id() const {
  return impl_->bos_id;
}
int32_t Tokenizer::eos_id() const {
  return impl_->eos_id;
}
int32_t Tokenizer::vocab_size() const {
  return static_cast<int32_t>(impl_->texts.size());
}

bool Tokenizer::is_eog(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->eog[id] != 0;
}

bool Tokenizer::is_control(int32_t id) const {
  return id >= 0 && id < vocab_size() && (impl_->attrs[id] & kAttrControl) != 0;
}

int32_t Tokenizer::token_id(std::string_view text) const {
  return impl_->lookup(text);
}

const std::string& Tokenizer::chat_template() const {
  return impl_->chat_template;
}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tokenizer_.token_to_piece(id, render_special_);
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const int len = unicode::strict_utf8_char_length(std::string_view(pending_).substr(i));
    if (len < 0) break;  // an unfinished character: wait for the next token
    if (len == 0) {
      out += "\xEF\xBF\xBD";  // a byte that can never be valid: U+FFFD
      i += 1;
    } else {
      out.append(pending_, i, len);
      i += len;
    }
  }
  pending_.erase(0, i);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = pending_.empty() ? "" : "\xEF\xBF\xBD";
  pending_.clear();
  return out;
}

Result<TokenizerSpec> tokenizer_spec_from_gguf(const GgufFile& file) {
  TokenizerSpec spec;
  auto get_string = [&](std::string_view key, std::string& out) -> Status {
    auto value = file.get_string(key);
    if (!value.ok()) return prefixed(value.status(), key);
    out = std::string(*value);
    return Status();
  };
  KVGATE_RETURN_IF_ERROR(get_string("tokenizer.ggml.model", spec.model));
  if (spec.model != "gpt2") {
    return unimplemented("tokenizer: tokenizer.ggml.model '" + spec.model +
                         "' is not supported (only 'gpt2', byte-level BPE)");
  }
  // llama.cpp falls back to its 'default' pre-tokenizer, which we do not
  // implement: create() reports it as unsupported.
  spec.pre = "default";
  if (file.has("tokenizer.ggml.pre"))
    KVGATE_RETURN_IF_ERROR(get_string("tokenizer.ggml.pre", spec.pre));

  auto get_strings = [&](std::string_view key, std::vector<std::string>& out) -> Status {
    auto values = file.get_string_array(key);
    if (!values.ok()) return prefixed(values.status(), key);
    out.assign(values->begin(), values->end());
    return Status();
  };
  KVGATE_RETURN_IF_ERROR(get_strings("tokenizer.ggml.tokens", spec.tokens));
  KVGATE_RETURN_IF_ERROR(get_strings("tokenizer.ggml.merges", spec.merges));

  if (file.has("tokenizer.ggml.token_type")) {
    auto types = file.get_int_array("tokenizer.ggml.token_type");
    if (!types.ok()) return prefixed(types.status(), "tokenizer.ggml.token_type");
    spec.token_types.reserve(types->size());
    for (const int64_t t : *types) {
      if (!attr_from_token_type(t)) {
        return invalid_argument("tokenizer: tokenizer.ggml.token_type has unknown type " +
                                std::to_string(t));
      }
      spec.token_types.push_back(static_cast<int32_t>(t));
    }
  }

  const std::pair<std::string_view, int32_t*> ids[] = {
      {"tokenizer.ggml.bos_token_id", &spec.bos_id},
      {"tokenizer.ggml.eos_token_id", &spec.eos_id},
      {"tokenizer.ggml.unknown_token_id", &spec.unk_id},
      {"tokenizer.ggml.padding_token_id", &spec.pad_id},
  };
  for (const auto& [key, out] : ids) {
    if (!file.has(key)) continue;
    auto value = file.get_uint(key);
    if (!value.ok()) return prefixed(value.status(), key);
    if (*value >= spec.tokens.size()) {
      return out_of_range("tokenizer: " + std::string(key) + " = " + std::to_string(*value) +
                          " is outside the vocabulary of " + std::to_string(spec.tokens.size()) +
                          " tokens");
    }
    *out = static_cast<int32_t>(*value);
  }

  const PreTokenizer* pre = find_pre_tokenizer(spec.pre);
  spec.add_bos = pre != nullptr && pre->default_add_bos;
  if (file.has("tokenizer.ggml.add_bos_token")) {
    auto value = file.get_bool("tokenizer.ggml.add_bos_token");
    if (!value.ok()) return prefixed(value.status(), "tokenizer.ggml.add_bos_token");
    spec.add_bos = *value;
  }
  if (file.has("tokenizer.chat_template")) {
    KVGATE_RETURN_IF_ERROR(get_string("tokenizer.chat_template", spec.chat_template));
  }
  return spec;
}

}  // namespace kvgate::engine
