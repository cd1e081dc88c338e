// Chat templates: see chat_template.h.
#include "engine/chat_template.h"

#include "engine/tokenizer.h"

namespace kvgate::engine {
namespace {

constexpr std::string_view kImStart = "<|im_start|>";
constexpr std::string_view kImEnd = "<|im_end|>";

// Reads a Jinja string literal's body starting at `pos` (just after the
// opening quote) up to `stop`; nullopt if the literal closes first, i.e. the
// text is not a constant (for example '...system\n' + messages[0]['content']).
std::optional<std::string> read_literal_until(std::string_view text, size_t pos, char quote,
                                              std::string_view stop) {
  std::string out;
  while (pos < text.size()) {
    if (text.substr(pos, stop.size()) == stop) return out;
    const char c = text[pos];
    if (c == quote) return std::nullopt;
    if (c == '\\' && pos + 1 < text.size()) {
      const char e = text[pos + 1];
      out += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
      pos += 2;
      continue;
    }
    out += c;
    ++pos;
  }
  return std::nullopt;
}

// Finds a literal '<|im_start|>system\n<prompt><|im_end|>' in the template.
std::optional<std::string> find_default_system_prompt(std::string_view text) {
  const std::string head = std::string(kImStart) + "system";
  for (size_t at = text.find(head); at != std::string_view::npos; at = text.find(head, at + 1)) {
    // The quote that opened the literal holding the marker.
    const size_t quote_pos = text.find_last_of("'\"", at);
    if (quote_pos == std::string_view::npos) continue;
    size_t pos = at + head.size();
    if (text.substr(pos, 1) == "\n") {
      pos += 1;
    } else if (text.substr(pos, 2) == "\\n") {
      pos += 2;
    } else {
      continue;
    }
    auto prompt = read_literal_until(text, pos, text[quote_pos], kImEnd);
    if (prompt) return prompt;
  }
  return std::nullopt;
}

void append_turn(std::string& out, std::string_view role, std::string_view content) {
  out += kImStart;
  out += role;
  out += '\n';
  out += content;
  out += kImEnd;
  out += '\n';
}

}  // namespace

Result<ChatTemplate> ChatTemplate::parse(std::string_view template_text) {
  if (template_text.find(kImStart) == std::string_view::npos ||
      template_text.find(kImEnd) == std::string_view::npos) {
    constexpr size_t kQuoteChars = 80;
    std::string quoted(template_text.substr(0, kQuoteChars));
    if (template_text.size() > kQuoteChars) quoted += "...";
    return unimplemented("chat template not recognized (only ChatML is supported): '" + quoted +
                         "'");
  }
  ChatTemplate t;
  t.default_system_ = find_default_system_prompt(template_text);
  return t;
}

Result<std::string> ChatTemplate::apply(std::span<const ChatMessage> messages,
                                        bool add_generation_prompt) const {
  size_t size = 0;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant") {
      return invalid_argument("chat message " + std::to_string(i) + " has role '" + role +
                              "' (expected system, user or assistant)");
    }
    size += role.size() + messages[i].content.size() + 32;
  }
  std::string out;
  out.reserve(size + 64);
  if (default_system_ && !messages.empty() && messages[0].role != "system") {
    append_turn(out, "system", *default_system_);
  }
  for (const ChatMessage& m : messages) append_turn(out, m.role, m.content);
  if (add_generation_prompt) {
    out += kImStart;
    out += "assistant\n";
  }
  return out;
}

Result<std::string> apply_chat_template(std::string_view template_text,
                                        std::span<const ChatMessage> messages,
                                        bool add_generation_prompt) {
  KVGATE_ASSIGN_OR_RETURN(const ChatTemplate t, ChatTemplate::parse(template_text));
  return t.apply(messages, add_generation_prompt);
}

Result<std::string> apply_chat_template(const Tokenizer& tokenizer,
                                        std::span<const ChatMessage> messages,
                                        bool add_generation_prompt) {
  return apply_chat_template(tokenizer.chat_template(), messages, add_generation_prompt);
}

}  // namespace kvgate::engine
