// Tokenizer, pre-tokenizer splits, stream decoding and chat templates.
//
// The golden tests compare with llama.cpp's own output on SmolLM2
// (tests/data/golden_tokens.json, written by tools/make_golden_tokens.py);
// they skip when the model file is absent. The rest use small synthetic
// vocabularies and need no model.
#include "engine/tokenizer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/chat_template.h"
#include "engine/gguf.h"
#include "engine/unicode.h"

namespace kvgate::engine {
namespace {

using nlohmann::json;

constexpr char kSmolSystem[] =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n";

bool is_valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const int len = unicode::strict_utf8_char_length(s.substr(i));
    if (len <= 0) return false;
    i += len;
  }
  return true;
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

std::string case_text(const json& c) {
  return c.contains("text") ? c["text"].get<std::string>() : from_hex(c["text_hex"]);
}

// The SmolLM2 tokenizer, loaded once for all tests (nullptr without the model).
const Tokenizer* smol_tokenizer() {
  static const std::unique_ptr<Tokenizer> tok = []() -> std::unique_ptr<Tokenizer> {
    if (!std::filesystem::exists(KVGATE_TEST_MODEL)) return nullptr;
    auto file = GgufFile::open(KVGATE_TEST_MODEL);
    EXPECT_TRUE(file.ok()) << file.status().to_string();
    if (!file.ok()) return nullptr;
    auto spec = tokenizer_spec_from_gguf(*file);
    EXPECT_TRUE(spec.ok()) << spec.status().to_string();
    if (!spec.ok()) return nullptr;
    auto t = Tokenizer::create(std::move(spec).value());
    EXPECT_TRUE(t.ok()) << t.status().to_string();
    return t.ok() ? std::make_unique<Tokenizer>(std::move(t).value()) : nullptr;
  }();
  return tok.get();
}

const json& golden() {
  static const json g = [] {
    std::ifstream in(std::string(KVGATE_TEST_DATA) + "/golden_tokens.json");
    EXPECT_TRUE(in.good()) << "missing tests/data/golden_tokens.json";
    return in.good() ? json::parse(in) : json::object();
  }();
  return g;
}

#define REQUIRE_MODEL()                                                          \
  const Tokenizer* tok_ptr = smol_tokenizer();                                   \
  if (tok_ptr == nullptr) GTEST_SKIP() << "model not found: " KVGATE_TEST_MODEL; \
  const Tokenizer& tok = *tok_ptr

// ---- golden comparisons with llama.cpp ----

TEST(TokenizerGolden, SpecFromGguf) {
  REQUIRE_MODEL();
  auto file = GgufFile::open(KVGATE_TEST_MODEL);
  ASSERT_TRUE(file.ok());
  auto spec = tokenizer_spec_from_gguf(*file);
  ASSERT_TRUE(spec.ok()) << spec.status().to_string();
  EXPECT_EQ(spec->model, "gpt2");
  EXPECT_EQ(spec->pre, "smollm");
  EXPECT_EQ(spec->tokens.size(), 49152u);
  EXPECT_EQ(spec->token_types.size(), 49152u);
  EXPECT_EQ(spec->merges.size(), 48900u);
  EXPECT_EQ(spec->bos_id, 1);
  EXPECT_EQ(spec->eos_id, 2);
  EXPECT_EQ(spec->unk_id, 0);
  EXPECT_EQ(spec->pad_id, 2);
  EXPECT_FALSE(spec->add_bos);
  EXPECT_NE(spec->chat_template.find("<|im_start|>"), std::string::npos);
  EXPECT_EQ(tok.vocab_size(), 49152);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.token_id("<|im_end|>"), 2);
  EXPECT_EQ(tok.token_id("no such token"), -1);
}

TEST(TokenizerGolden, EncodeMatchesLlamaCpp) {
  REQUIRE_MODEL();
  const json& cases = golden()["encode"];
  ASSERT_GE(cases.size(), 60u);
  for (const json& c : cases) {
    const std::string text = case_text(c);
    SCOPED_TRACE("text: " + c.dump());
    EXPECT_EQ(tok.encode(text, c["add_bos"], c["parse_special"]),
              c["ids"].get<std::vector<int32_t>>());
  }
}

TEST(TokenizerGolden, DecodeMatchesLlamaCpp) {
  REQUIRE_MODEL();
  const json& cases = golden()["decode"];
  ASSERT_FALSE(cases.empty());
  for (const json& c : cases) {
    SCOPED_TRACE("case: " + c.dump());
    EXPECT_EQ(tok.decode(c["ids"].get<std::vector<int32_t>>(), c["render_special"]), case_text(c));
  }
}

TEST(TokenizerGolden, EndOfGenerationIds) {
  REQUIRE_MODEL();
  std::vector<int32_t> eog;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (tok.is_eog(id)) eog.push_back(id);
  }
  EXPECT_EQ(eog, golden()["eog_ids"].get<std::vector<int32_t>>());
  EXPECT_FALSE(tok.is_eog(-1));
  EXPECT_FALSE(tok.is_eog(tok.vocab_size()));
}

TEST(TokenizerGolden, DecodeInvertsEncodeForValidUtf8) {
  REQUIRE_MODEL();
  for (const json& c : golden()["encode"]) {
    const std::string text = case_text(c);
    if (!is_valid_utf8(text)) continue;
    SCOPED_TRACE("text: " + c.dump());
    EXPECT_EQ(tok.decode(tok.encode(text, false, false)), text);
    EXPECT_EQ(tok.decode(tok.encode(text, false, true), /*render_special=*/true), text);
  }
}

TEST(TokenizerGolden, ControlTokensRenderOnlyOnRequest) {
  REQUIRE_MODEL();
  EXPECT_EQ(tok.token_to_piece(1), "");
  EXPECT_EQ(tok.token_to_piece(1, true), "<|im_start|>");
  EXPECT_TRUE(tok.is_control(1));
  EXPECT_FALSE(tok.is_control(905));
  EXPECT_EQ(tok.token_to_piece(905), " world");
  EXPECT_EQ(tok.token_to_piece(-5), "");
  EXPECT_EQ(tok.token_to_piece(tok.vocab_size()), "");
}

TEST(TokenizerGolden, StreamDecoderEmitsOnlyWholeCharacters) {
  REQUIRE_MODEL();
  const std::string texts[] = {"👨‍👩‍👧‍👦", "Hello 👋 world 🌍! 日本語のテキスト",
                               "café ñ 🇫🇷"};
  for (const std::string& text : texts) {
    const std::vector<int32_t> ids = tok.encode(text, false, false);
    StreamDecoder stream(tok);
    std::string streamed;
    bool saw_held_back = false;
    for (const int32_t id : ids) {
      const std::string out = stream.push(id);
      EXPECT_TRUE(is_valid_utf8(out)) << text;
      if (out.empty()) saw_held_back = true;
      streamed += out;
    }
    streamed += stream.flush();
    EXPECT_EQ(streamed, tok.decode(ids));
    EXPECT_EQ(streamed, text);
    EXPECT_TRUE(saw_held_back) << "no token ended inside a character: " << text;
  }
}

TEST(TokenizerGolden, EncodingIsFast) {
  REQUIRE_MODEL();
  std::string text;
  for (const json& c : golden()["encode"]) text += case_text(c);
  while (text.size() < (1u << 20)) text += text;
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok.encode(text, false, false);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GT(ids.size(), text.size() / 8);
  // About 0.1 s on one core; the bound leaves room for sanitizers and busy CI.
  EXPECT_LT(seconds, 5.0) << text.size() << " bytes";
}

// ---- chat templates ----

TEST(ChatTemplate, SmolLm2TemplateFromModel) {
  REQUIRE_MODEL();
  const std::vector<ChatMessage> user = {{"user", "Hi there"}};
  auto with_prompt = apply_chat_template(tok, user, true);
  ASSERT_TRUE(with_prompt.ok()) << with_prompt.status().to_string();
  EXPECT_EQ(*with_prompt, std::string(kSmolSystem) +
                              "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
  auto without_prompt = apply_chat_template(tok, user, false);
  ASSERT_TRUE(without_prompt.ok());
  EXPECT_EQ(*without_prompt, std::string(kSmolSystem) + "<|im_start|>user\nHi there<|im_end|>\n");

  const std::vector<ChatMessage> sys_user = {{"system", "Be brief."}, {"user", "2+2?"}};
  auto with_system = apply_chat_template(tok, sys_user, true);
  ASSERT_TRUE(with_system.ok());
  EXPECT_EQ(*with_system,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n");
  auto with_system_no_prompt = apply_chat_template(tok, sys_user, false);
  ASSERT_TRUE(with_system_no_prompt.ok());
  EXPECT_EQ(*with_system_no_prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n");
}

TEST(ChatTemplate, ConversationWithAssistantTurns) {
  const std::string tmpl =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
      "{{ '<|im_start|>assistant\\n' }}{% endif %}";
  auto t = ChatTemplate::parse(tmpl);
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(t->default_system_prompt().has_value());
  const std::vector<ChatMessage> msgs = {{"user", "a"}, {"assistant", "b"}, {"user", "c"}};
  auto out = t->apply(msgs, true);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out,
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
            "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n");
  auto empty = t->apply({}, false);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, "");
}

TEST(ChatTemplate, DefaultSystemPromptWithEscapedNewline) {
  // Templates stored with "\n" escapes inside the Jinja literals, not newlines.
  const std::string tmpl =
      "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Bob.<|im_end|>\\n' "
      "}}{% endif %}{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
      "'<|im_end|>\\n'}}{% endfor %}";
  auto t = ChatTemplate::parse(tmpl);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(t->default_system_prompt().has_value());
  EXPECT_EQ(*t->default_system_prompt(), "You are Bob.");
  const std::vector<ChatMessage> msgs = {{"user", "hi"}};
  EXPECT_EQ(*t->apply(msgs, false),
            "<|im_start|>system\nYou are Bob.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
}

TEST(ChatTemplate, SystemFromMessageIsNotADefault) {
  const std::string tmpl =
      "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}";
  auto t = ChatTemplate::parse(tmpl);
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(t->default_system_prompt().has_value());
}

TEST(ChatTemplate, Errors) {
  auto unknown = ChatTemplate::parse("{{ bos_token }}[INST] {{ message }} [/INST]");
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(unknown.status().message().find("[INST]"), std::string::npos);

  auto t = ChatTemplate::parse("<|im_start|>{{x}}<|im_end|>");
  ASSERT_TRUE(t.ok());
  const std::vector<ChatMessage> msgs = {{"user", "a"}, {"tool", "b"}};
  auto bad_role = t->apply(msgs, true);
  ASSERT_FALSE(bad_role.ok());
  EXPECT_EQ(bad_role.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad_role.status().message().find("'tool'"), std::string::npos);
}

// ---- synthetic vocabularies (no model needed) ----

std::string gpt2_text(std::string_view bytes) {
  std::string out;
  for (const char b : bytes) {
    unicode::append_utf8(unicode::byte_to_gpt2_codepoint(static_cast<uint8_t>(b)), out);
  }
  return out;
}

// All 256 byte tokens (id = byte value), then `extra` (raw bytes, stored in the
// byte alphabet) and `merges` (raw bytes "left right").
TokenizerSpec byte_spec(const std::vector<std::string>& extra,
                        const std::vector<std::pair<std::string, std::string>>& merges,
                        std::string pre = "smollm") {
  TokenizerSpec spec;
  spec.model = "gpt2";
  spec.pre = std::move(pre);
  for (int b = 0; b < 256; ++b)
    spec.tokens.push_back(gpt2_text(std::string(1, static_cast<char>(b))));
  for (const std::string& t : extra) spec.tokens.push_back(gpt2_text(t));
  for (const auto& [l, r] : merges) spec.merges.push_back(gpt2_text(l) + " " + gpt2_text(r));
  return spec;
}

Tokenizer make(TokenizerSpec spec) {
  auto t = Tokenizer::create(std::move(spec));
  EXPECT_TRUE(t.ok()) << t.status().to_string();
  return std::move(t).value();
}

std::vector<int32_t> bytes_of(std::string_view s) {
  return std::vector<int32_t>(reinterpret_cast<const uint8_t*>(s.data()),
                              reinterpret_cast<const uint8_t*>(s.data()) + s.size());
}

TEST(TokenizerSynthetic, MergesByRankThenLeftmost) {
  // ids: 256 "ab", 257 "bc", 258 "aa"
  const Tokenizer tok = make(byte_spec({"ab", "bc", "aa"}, {{"b", "c"}, {"a", "b"}, {"a", "a"}}));
  EXPECT_EQ(tok.encode("abc", false, false), (std::vector<int32_t>{'a', 257}));  // "bc" ranks first
  EXPECT_EQ(tok.encode("ab", false, false), (std::vector<int32_t>{256}));
  EXPECT_EQ(tok.encode("aaa", false, false), (std::vector<int32_t>{258, 'a'}));  // leftmost pair
  EXPECT_EQ(tok.encode("aaaa", false, false), (std::vector<int32_t>{258, 258}));
  EXPECT_EQ(tok.decode(tok.encode("abcaaab", false, false)), "abcaaab");
}

TEST(TokenizerSynthetic, MergesStayInsidePieces) {
  // " b" may merge (one piece); "a " may not (a piece ends after "a");
  // "12" may not under smollm (each digit is its own piece).
  const Tokenizer tok = make(byte_spec({"a ", " b", "12"}, {{"a", " "}, {" ", "b"}, {"1", "2"}}));
  EXPECT_EQ(tok.encode("a b", false, false), (std::vector<int32_t>{'a', 257}));
  EXPECT_EQ(tok.encode("12", false, false), (std::vector<int32_t>{'1', '2'}));
  const Tokenizer gpt2 =
      make(byte_spec({"a ", " b", "12"}, {{"a", " "}, {" ", "b"}, {"1", "2"}}, "gpt-2"));
  EXPECT_EQ(gpt2.encode("12", false, false), (std::vector<int32_t>{258}));
}

TEST(TokenizerSynthetic, InvalidUtf8BecomesReplacementCharacter) {
  const Tokenizer tok = make(byte_spec({}, {}));
  EXPECT_EQ(tok.encode("a\xff", false, false), (std::vector<int32_t>{'a', 0xEF, 0xBF, 0xBD}));
  EXPECT_EQ(tok.encode("", true, true), std::vector<int32_t>{});
}

TEST(TokenizerSynthetic, SpecialTokens) {
  TokenizerSpec spec = byte_spec({}, {});
  spec.tokens.push_back("<ctl>");   // 256, control
  spec.tokens.push_back("<user>");  // 257, user-defined
  spec.tokens.push_back("<ctl>x");  // 258, control, longer: matched first
  spec.token_types.assign(spec.tokens.size(), 1);
  spec.token_types[256] = 3;
  spec.token_types[257] = 4;
  spec.token_types[258] = 3;
  spec.bos_id = 256;
  spec.eos_id = 256;
  spec.add_bos = true;
  const Tokenizer tok = make(spec);
  EXPECT_EQ(tok.encode("a<ctl>b", false, true), (std::vector<int32_t>{'a', 256, 'b'}));
  EXPECT_EQ(tok.encode("a<ctl>b", false, false), bytes_of("a<ctl>b"));
  // User-defined tokens are matched even without parse_special, as in llama.cpp.
  EXPECT_EQ(tok.encode("<user><user>", false, false), (std::vector<int32_t>{257, 257}));
  EXPECT_EQ(tok.encode("<ctl>x<ctl>", false, true), (std::vector<int32_t>{258, 256}));
  EXPECT_EQ(tok.encode("z", true, false), (std::vector<int32_t>{256, 'z'}));
  EXPECT_EQ(tok.decode(std::vector<int32_t>{256, 'z', 257}), "z<user>");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{256, 'z'}, true), "<ctl>z");
  EXPECT_TRUE(tok.is_eog(256));
  EXPECT_FALSE(tok.is_eog(257));
}

TEST(TokenizerSynthetic, EndOfGenerationByText) {
  TokenizerSpec spec = byte_spec({}, {});
  spec.tokens.push_back("<|im_end|>");  // normal in the file: made control and EOG
  const Tokenizer tok = make(spec);
  EXPECT_TRUE(tok.is_eog(256));
  EXPECT_TRUE(tok.is_control(256));
  EXPECT_EQ(tok.token_to_piece(256), "");
}

TEST(TokenizerSynthetic, CleanSpacesForGpt2Decoding) {
  const Tokenizer gpt2 = make(byte_spec({}, {}, "gpt-2"));
  EXPECT_EQ(gpt2.decode(bytes_of("Hi , you ' re here . It 's ok ' x ' !")),
            "Hi, you're here. It's ok'x '!");
  const Tokenizer smol = make(byte_spec({}, {}));
  EXPECT_EQ(smol.decode(bytes_of("Hi , you")), "Hi , you");
}

TEST(TokenizerSynthetic, StreamDecoderReplacesInvalidBytes) {
  const Tokenizer tok = make(byte_spec({}, {}));
  StreamDecoder stream(tok);
  EXPECT_EQ(stream.push(0xE2), "");
  EXPECT_EQ(stream.push(0x82), "");
  EXPECT_EQ(stream.push(0xAC), "\xE2\x82\xAC");  // €
  EXPECT_EQ(stream.push(0xFF), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.push(0xF0), "");
  EXPECT_EQ(stream.push('a'),
            "\xEF\xBF\xBD"
            "a");
  EXPECT_EQ(stream.push(0xC3), "");
  EXPECT_EQ(stream.flush(), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.flush(), "");
}

TEST(TokenizerSynthetic, BadSpecs) {
  auto expect_error = [](TokenizerSpec spec, StatusCode code, std::string_view needle) {
    auto t = Tokenizer::create(std::move(spec));
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), code) << t.status().to_string();
    EXPECT_NE(t.status().message().find(needle), std::string::npos) << t.status().to_string();
  };
  TokenizerSpec unknown_left = byte_spec({}, {});
  unknown_left.merges.push_back("xyz a");
  expect_error(unknown_left, StatusCode::kInvalidArgument, "unknown token 'xyz'");

  TokenizerSpec not_in_vocab = byte_spec({}, {{"a", "b"}});
  expect_error(not_in_vocab, StatusCode::kInvalidArgument, "not in the vocabulary");

  TokenizerSpec malformed = byte_spec({}, {});
  malformed.merges.push_back("ab");
  expect_error(malformed, StatusCode::kInvalidArgument, "'left right'");

  TokenizerSpec bad_bos = byte_spec({}, {});
  bad_bos.bos_id = 256;
  expect_error(bad_bos, StatusCode::kOutOfRange, "bos id 256");

  TokenizerSpec bad_eos = byte_spec({}, {});
  bad_eos.eos_id = -7;
  expect_error(bad_eos, StatusCode::kOutOfRange, "eos id -7");

  TokenizerSpec no_bos = byte_spec({}, {});
  no_bos.add_bos = true;
  expect_error(no_bos, StatusCode::kInvalidArgument, "no bos");

  TokenizerSpec bad_types = byte_spec({}, {});
  bad_types.token_types = {1, 1};
  expect_error(bad_types, StatusCode::kInvalidArgument, "token types");

  TokenizerSpec bad_type = byte_spec({}, {});
  bad_type.token_types.assign(256, 1);
  bad_type.token_types[7] = 9;
  expect_error(bad_type, StatusCode::kInvalidArgument, "unknown type 9");

  TokenizerSpec spm = byte_spec({}, {});
  spm.model = "llama";
  expect_error(spm, StatusCode::kUnimplemented, "'llama'");

  expect_error(byte_spec({}, {}, "tekken"), StatusCode::kUnimplemented, "'tekken'");

  TokenizerSpec empty;
  empty.model = "gpt2";
  empty.pre = "smollm";
  expect_error(empty, StatusCode::kInvalidArgument, "vocabulary size 0");
}

// ---- pre-tokenizer splits ----

std::vector<std::string> split(unicode::SplitPass pass, std::string_view text,
                               std::vector<uint32_t> lengths = {}) {
  const std::vector<uint32_t> cpts = unicode::decode_utf8_lenient(text);
  if (lengths.empty()) lengths = {static_cast<uint32_t>(cpts.size())};
  std::vector<uint32_t> out;
  unicode::split_pieces(pass, cpts, lengths, out);
  std::vector<std::string> pieces;
  size_t begin = 0;
  for (const uint32_t len : out) {
    std::string s;
    for (size_t k = begin; k < begin + len; ++k) unicode::append_utf8(cpts[k], s);
    pieces.push_back(s);
    begin += len;
  }
  return pieces;
}

using Pieces = std::vector<std::string>;
using unicode::SplitPass;

TEST(PreTokenizerSplit, Gpt2) {
  EXPECT_EQ(split(SplitPass::kGpt2, "Hello world"), (Pieces{"Hello", " world"}));
  EXPECT_EQ(split(SplitPass::kGpt2, "I'm don't"), (Pieces{"I", "'m", " don", "'t"}));
  EXPECT_EQ(split(SplitPass::kGpt2, "I'M"), (Pieces{"I", "'", "M"}));  // case-sensitive
  EXPECT_EQ(split(SplitPass::kGpt2, "a   b"), (Pieces{"a", "  ", " b"}));
  EXPECT_EQ(split(SplitPass::kGpt2, "a\n\nb"), (Pieces{"a", "\n", "\n", "b"}));
  EXPECT_EQ(split(SplitPass::kGpt2, "x  "), (Pieces{"x", "  "}));
  EXPECT_EQ(split(SplitPass::kGpt2, " 123 ?!"), (Pieces{" 123", " ?!"}));
  EXPECT_EQ(split(SplitPass::kGpt2, "café"), (Pieces{"café"}));
  // Only a plain space joins the word after it.
  EXPECT_EQ(split(SplitPass::kGpt2, "a\u00a0\u00a0b"), (Pieces{"a", "\u00a0", "\u00a0", "b"}));
  EXPECT_EQ(split(SplitPass::kGpt2, "hi😀😀"), (Pieces{"hi", "😀😀"}));
  // Pieces given by an earlier pass are never joined.
  EXPECT_EQ(split(SplitPass::kGpt2, "ab cd", {3, 2}), (Pieces{"ab", " ", "cd"}));
}

TEST(PreTokenizerSplit, EachNumber) {
  EXPECT_EQ(split(SplitPass::kEachNumber, "a12 ½x"), (Pieces{"a", "1", "2", " ", "½", "x"}));
  EXPECT_EQ(split(SplitPass::kEachNumber, "no digits"), (Pieces{"no digits"}));
}

TEST(PreTokenizerSplit, Llama3AndQwen2) {
  EXPECT_EQ(split(SplitPass::kLlama3, "1234567"), (Pieces{"123", "456", "7"}));
  EXPECT_EQ(split(SplitPass::kQwen2, "123"), (Pieces{"1", "2", "3"}));
  EXPECT_EQ(split(SplitPass::kLlama3, "I'M ok"), (Pieces{"I", "'M", " ok"}));  // case-folded
  EXPECT_EQ(split(SplitPass::kLlama3, "x \n\n y"), (Pieces{"x", " \n\n", " y"}));
  EXPECT_EQ(split(SplitPass::kLlama3, "(hello)\n"), (Pieces{"(hello", ")\n"}));
  EXPECT_EQ(split(SplitPass::kLlama3, "\tword"), (Pieces{"\tword"}));
}

TEST(Unicode, Classes) {
  EXPECT_TRUE(unicode::is_letter('a'));
  EXPECT_TRUE(unicode::is_letter(0x4E2D));   // 中
  EXPECT_TRUE(unicode::is_letter(0x2EBF0));  // CJK extension I, new in Unicode 15.1
  EXPECT_FALSE(unicode::is_letter(0x0301));  // combining acute: a mark
  EXPECT_TRUE(unicode::is_number(0x00BD));   // ½
  EXPECT_TRUE(unicode::is_number(0x0663));   // Arabic-Indic three
  EXPECT_FALSE(unicode::is_number('x'));
  EXPECT_TRUE(unicode::is_whitespace(0x85));
  EXPECT_TRUE(unicode::is_whitespace(0x3000));
  EXPECT_FALSE(unicode::is_whitespace(0x200B));  // zero-width space is not White_Space
  EXPECT_FALSE(unicode::is_letter(0x110000));
}

TEST(Unicode, LenientDecodingAndGpt2Alphabet) {
  EXPECT_EQ(unicode::decode_utf8_lenient("a\xC3\xA9\xFF\xE2\x82"),
            (std::vector<uint32_t>{'a', 0xE9, 0xFFFD, 0xFFFD, 0xFFFD}));
  EXPECT_EQ(unicode::decode_utf8_lenient("\xC0\x80"), (std::vector<uint32_t>{0}));  // overlong
  EXPECT_EQ(unicode::byte_to_gpt2_codepoint(' '), 0x120u);                          // Ġ
  EXPECT_EQ(unicode::byte_to_gpt2_codepoint('\n'), 0x10Au);                         // Ċ
  EXPECT_EQ(unicode::byte_to_gpt2_codepoint('A'), static_cast<uint32_t>('A'));
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ(unicode::gpt2_codepoint_to_byte(unicode::byte_to_gpt2_codepoint(b)), b);
  }
  EXPECT_EQ(unicode::gpt2_codepoint_to_byte(0x4E2D), -1);
  EXPECT_EQ(unicode::strict_utf8_char_length("\xED\xA0\x80"), 0);  // surrogate
  EXPECT_EQ(unicode::strict_utf8_char_length("\xF0\x9F"), -1);     // unfinished
}

// ---- GGUF glue on hand-made files ----

class MiniGguf {
 public:
  MiniGguf& str(std::string_view key, std::string_view value) {
    kv(key, 8);
    put_str(value);
    return *this;
  }
  MiniGguf& strs(std::string_view key, const std::vector<std::string>& values) {
    kv(key, 9);
    put<uint32_t>(8);
    put<uint64_t>(values.size());
    for (const auto& v : values) put_str(v);
    return *this;
  }
  MiniGguf& u32(std::string_view key, uint32_t value) {
    kv(key, 4);
    put<uint32_t>(value);
    return *this;
  }
  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> out = {'G', 'G', 'U', 'F'};
    auto add = [&](auto v) {
      const auto* p = reinterpret_cast<const uint8_t*>(&v);
      out.insert(out.end(), p, p + sizeof(v));
    };
    add(uint32_t{3});
    add(uint64_t{0});  // tensors
    add(n_kv_);
    out.insert(out.end(), body_.begin(), body_.end());
    return out;
  }

 private:
  template <typename T>
  void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    body_.insert(body_.end(), p, p + sizeof(v));
  }
  void put_str(std::string_view s) {
    put<uint64_t>(s.size());
    body_.insert(body_.end(), s.begin(), s.end());
  }
  void kv(std::string_view key, uint32_t type) {
    ++n_kv_;
    put_str(key);
    put<uint32_t>(type);
  }
  uint64_t n_kv_ = 0;
  std::vector<uint8_t> body_;
};

TEST(TokenizerSpecFromGguf, ReadsKeysAndReportsProblems) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(gpt2_text(std::string(1, static_cast<char>(b))));
  {
    const std::vector<uint8_t> data = MiniGguf()
                                          .str("tokenizer.ggml.model", "gpt2")
                                          .str("tokenizer.ggml.pre", "llama-bpe")
                                          .strs("tokenizer.ggml.tokens", tokens)
                                          .strs("tokenizer.ggml.merges", {})
                                          .u32("tokenizer.ggml.bos_token_id", 5)
                                          .bytes();
    auto file = GgufFile::from_memory(data.data(), data.size());
    ASSERT_TRUE(file.ok()) << file.status().to_string();
    auto spec = tokenizer_spec_from_gguf(*file);
    ASSERT_TRUE(spec.ok()) << spec.status().to_string();
    EXPECT_EQ(spec->pre, "llama-bpe");
    EXPECT_EQ(spec->bos_id, 5);
    EXPECT_EQ(spec->eos_id, -1);
    EXPECT_TRUE(spec->add_bos);  // llama.cpp's default for llama3-style vocabularies
    auto tok = Tokenizer::create(std::move(spec).value());
    ASSERT_TRUE(tok.ok()) << tok.status().to_string();
    EXPECT_EQ(tok->encode("hi", true, false), (std::vector<int32_t>{5, 'h', 'i'}));
  }
  {
    const std::vector<uint8_t> data = MiniGguf().str("tokenizer.ggml.model", "llama").bytes();
    auto file = GgufFile::from_memory(data.data(), data.size());
    ASSERT_TRUE(file.ok());
    auto spec = tokenizer_spec_from_gguf(*file);
    ASSERT_FALSE(spec.ok());
    EXPECT_EQ(spec.status().code(), StatusCode::kUnimplemented);
  }
  {
    const std::vector<uint8_t> data = MiniGguf().str("tokenizer.ggml.model", "gpt2").bytes();
    auto file = GgufFile::from_memory(data.data(), data.size());
    ASSERT_TRUE(file.ok());
    auto spec = tokenizer_spec_from_gguf(*file);
    ASSERT_FALSE(spec.ok());
    EXPECT_EQ(spec.status().code(), StatusCode::kNotFound);
    EXPECT_NE(spec.status().message().find("tokenizer.ggml.tokens"), std::string::npos)
        << spec.status().to_string();
  }
  {
    const std::vector<uint8_t> data = MiniGguf()
                                          .str("tokenizer.ggml.model", "gpt2")
                                          .str("tokenizer.ggml.pre", "smollm")
                                          .strs("tokenizer.ggml.tokens", tokens)
                                          .strs("tokenizer.ggml.merges", {})
                                          .u32("tokenizer.ggml.eos_token_id", 999)
                                          .bytes();
    auto file = GgufFile::from_memory(data.data(), data.size());
    ASSERT_TRUE(file.ok());
    auto spec = tokenizer_spec_from_gguf(*file);
    ASSERT_FALSE(spec.ok());
    EXPECT_EQ(spec.status().code(), StatusCode::kOutOfRange);
  }
}

}  // namespace
}  // namespace kvgate::engine
