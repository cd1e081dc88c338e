// Unicode support for the byte-level BPE tokenizer.
//
// Everything here exists to reproduce llama.cpp's tokenization exactly, so it
// follows llama.cpp's conventions rather than the strictest reading of the
// standards:
//  - character classes come from Unicode 15.1 (the version of llama.cpp's own
//    tables), reduced to the three questions the pre-tokenizers ask: letter
//    (\p{L}), number (\p{N}), white space (the White_Space property);
//  - lenient UTF-8 decoding turns each byte that does not start a well-formed
//    sequence into U+FFFD and accepts overlong forms and surrogates;
//  - the pre-tokenizer splits are hand-written equivalents of the regexes,
//    with the corner cases of llama.cpp's own hand-written versions.
//
// All functions are pure and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvgate::engine::unicode {

inline constexpr uint32_t kReplacementChar = 0xFFFD;

bool is_letter(uint32_t cpt);      // General Category L*
bool is_number(uint32_t cpt);      // General Category N*
bool is_whitespace(uint32_t cpt);  // White_Space property

// Decodes UTF-8 as llama.cpp does: a byte that does not start a complete
// sequence (stray continuation byte, truncated sequence, 0xF8..0xFF) becomes
// U+FFFD and decoding resumes at the next byte. Overlong forms, surrogates and
// 4-byte forms above U+10FFFF are decoded arithmetically, not rejected.
std::vector<uint32_t> decode_utf8_lenient(std::string_view text);

// Appends the UTF-8 form of `cpt`; a value above U+10FFFF (only produced by
// decode_utf8_lenient from 0xF5..0xF7 lead bytes) is written as U+FFFD.
void append_utf8(uint32_t cpt, std::string& out);

// Strict UTF-8 (RFC 3629: no overlongs, no surrogates, at most U+10FFFF).
// Returns the length of the well-formed character starting at text[0]; 0 when
// text[0] can never start one (it becomes U+FFFD); and -1 when `text` is a
// proper prefix of a well-formed character (wait for more bytes).
int strict_utf8_char_length(std::string_view text);

// GPT-2's byte-level alphabet: every byte maps to one printable codepoint so
// that token strings never contain raw control bytes or spaces.
uint32_t byte_to_gpt2_codepoint(uint8_t byte);
// Inverse of byte_to_gpt2_codepoint; -1 for a codepoint outside the alphabet.
int gpt2_codepoint_to_byte(uint32_t cpt);

// One pass of a pre-tokenizer. A pass refines a split of the text: it cuts
// each piece it is given further, never joining pieces.
enum class SplitPass {
  kEachNumber,  // \p{N} isolated: every number codepoint is a piece of its own
  kGpt2,        // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kLlama3,      // (?i:'s|'t|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
                //   \s*[\r\n]+|\s+(?!\S)|\s+
  kQwen2,       // as kLlama3 with \p{N} instead of \p{N}{1,3}
};

// Applies `pass` to each piece of `cpts` described by `piece_lengths`
// (codepoint counts that add up to cpts.size()) and appends the refined
// lengths to `out` (which is cleared first). No zero lengths are produced.
void split_pieces(SplitPass pass, std::span<const uint32_t> cpts,
                  std::span<const uint32_t> piece_lengths, std::vector<uint32_t>& out);

}  // namespace kvgate::engine::unicode
