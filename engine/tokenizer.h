// Byte-level BPE tokenizer (GPT-2 style), token for token equal to llama.cpp.
//
// Built from a TokenizerSpec, a plain struct filled from GGUF metadata by
// tokenizer_spec_from_gguf() (or by hand in tests), so the tokenizer itself does
// not depend on the file format.
//
// Encoding follows llama.cpp's llama_tokenize():
//  1. special tokens are cut out of the text first (longest token text first;
//     control tokens only when parse_special, user-defined tokens always);
//  2. each remaining fragment is decoded as UTF-8 (invalid bytes become U+FFFD)
//     and split into pieces by the model's pre-tokenizer (tokenizer.ggml.pre);
//  3. each piece is mapped to GPT-2's byte alphabet and merged by BPE: the
//     adjacent pair with the lowest merge rank first, the leftmost on ties.
//
// Thread safety: a Tokenizer is immutable once created; all const methods may
// be called from any thread. Copies are cheap and share the vocabulary.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kvgate::engine {

class GgufFile;

// Everything the tokenizer needs, as stored in GGUF metadata.
struct TokenizerSpec {
  std::string model;                // tokenizer.ggml.model: only "gpt2" (byte-level BPE)
  std::string pre;                  // tokenizer.ggml.pre: "smollm", "gpt-2", "llama-bpe", ...
  std::vector<std::string> tokens;  // GPT-2 byte-alphabet strings, index = token id
  std::vector<int32_t>
      token_types;  // GGUF token types (1 normal, 3 control, ...); empty = all normal
  std::vector<std::string> merges;                             // "left right", in rank order
  int32_t bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;  // -1: none
  bool add_bos = false;                                        // tokenizer.ggml.add_bos_token
  std::string chat_template;  // tokenizer.chat_template, may be empty
};

// Reads the tokenizer.* keys. NOT_FOUND names a missing required key;
// UNIMPLEMENTED names a tokenizer model other than "gpt2". An absent
// add_bos_token takes llama.cpp's default for the pre-tokenizer.
Result<TokenizerSpec> tokenizer_spec_from_gguf(const GgufFile& file);

class Tokenizer {
 public:
  // Validates the spec: token ids in range, token types known, every merge of
  // the form "a b" with a, b and ab all in the vocabulary, a supported
  // pre-tokenizer (UNIMPLEMENTED otherwise).
  static Result<Tokenizer> create(TokenizerSpec spec);

  // Token ids for `text`, as llama_tokenize(text, add_special, parse_special).
  // add_special: prepend BOS if the model asks for it (spec.add_bos); models
  //   with add_bos_token=false (SmolLM2) get no BOS either way, as in llama.cpp.
  // parse_special: "<|im_start|>" in the text becomes the control token;
  //   otherwise it is tokenized as plain text. Never fails: any byte string is
  //   accepted.
  std::vector<int32_t> encode(std::string_view text, bool add_special, bool parse_special) const;

  // Raw bytes of one token (may be part of a UTF-8 character). Control and
  // unknown tokens give "" unless render_special; an id out of range gives "".
  std::string token_to_piece(int32_t id) const { return token_to_piece(id, false); }
  std::string token_to_piece(int32_t id, bool render_special) const;

  // Concatenated pieces, as llama_detokenize(remove_special=false): for models
  // whose pre-tokenizer asks for it (not SmolLM2), spaces before punctuation
  // and contractions are cleaned up as HF's clean_up_tokenization_spaces does.
  // Ids out of range contribute nothing. The result may be invalid UTF-8 when
  // the ids are; see StreamDecoder.
  std::string decode(std::span<const int32_t> ids, bool render_special = false) const;

  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t vocab_size() const;
  // End of generation: eos, plus the tokens llama.cpp recognizes by their text
  // ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", FIM pad/repo/file-separator
  // names, ...). SmolLM2: {0 <|endoftext|>, 2 <|im_end|>, 4 <reponame>}.
  bool is_eog(int32_t id) const;
  bool is_control(int32_t id) const;
  // Id of the token whose (byte-alphabet) text is exactly `text`; -1 if none.
  int32_t token_id(std::string_view text) const;
  const std::string& chat_template() const;

 private:
  struct Impl;  // defined in tokenizer.cpp
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Streaming-safe decoding for token-by-token output: push() returns only whole,
// well-formed UTF-8 characters and holds back an incomplete one until the
// bytes that finish it arrive. Bytes that can never become well-formed UTF-8
// are replaced by U+FFFD, so everything returned is valid UTF-8 (unlike
// Tokenizer::decode, which returns the raw bytes). For valid text the
// concatenation of all push() results and flush() equals decode(ids), except
// for the space clean-up some pre-tokenizers apply in decode() (not SmolLM2's).
// Not thread-safe: one decoder per sequence, owned by one thread.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool render_special = false)
      : tokenizer_(tokenizer), render_special_(render_special) {}

  std::string push(int32_t id);
  // The held-back bytes of an unfinished character, as U+FFFD; resets the decoder.
  std::string flush();

 private:
  Tokenizer tokenizer_;  // a cheap shared copy: the decoder may outlive the caller's
  bool render_special_;
  std::string pending_;  // bytes of an incomplete UTF-8 character
};

}  // namespace kvgate::engine
