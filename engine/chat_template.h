// Chat templates: turn a list of chat messages into the prompt text a model
// was trained on.
//
// Models ship a Jinja template (tokenizer.chat_template). Rather than embed a
// Jinja interpreter, we recognize the template families we support and render
// them directly, byte for byte as the Jinja template would. Supported today:
// ChatML (recognized by its <|im_start|> / <|im_end|> markers), including a
// default system prompt written into the template as a literal
// '<|im_start|>system\n...<|im_end|>' (SmolLM2's "You are a helpful AI
// assistant named SmolLM, trained by Hugging Face"), which is inserted when the
// first message is not a system message.
//
// Message content is copied verbatim: text such as "<|im_end|>" inside it is
// not escaped (as with the Jinja template), so callers that tokenize the
// result with parse_special must decide whether user text may contain it.
//
// Thread safety: ChatTemplate is immutable; apply() may run on any thread.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "common/status.h"

namespace kvgate::engine {

class Tokenizer;

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

class ChatTemplate {
 public:
  // Recognizes the template family; UNIMPLEMENTED (quoting the start of the
  // template) for one we cannot render. Parse once, at model load.
  static Result<ChatTemplate> parse(std::string_view template_text);

  // INVALID_ARGUMENT naming the message and role for a role other than
  // system/user/assistant. add_generation_prompt appends the opening of the
  // assistant's turn.
  Result<std::string> apply(std::span<const ChatMessage> messages,
                            bool add_generation_prompt) const;

  // The system prompt inserted before a conversation that does not start with
  // one, if the template has one.
  const std::optional<std::string>& default_system_prompt() const { return default_system_; }

 private:
  ChatTemplate() = default;
  std::optional<std::string> default_system_;
};

// One-shot helpers: parse then apply.
Result<std::string> apply_chat_template(std::string_view template_text,
                                        std::span<const ChatMessage> messages,
                                        bool add_generation_prompt);
// Uses the template the model file ships (Tokenizer::chat_template()).
Result<std::string> apply_chat_template(const Tokenizer& tokenizer,
                                        std::span<const ChatMessage> messages,
                                        bool add_generation_prompt);

}  // namespace kvgate::engine
