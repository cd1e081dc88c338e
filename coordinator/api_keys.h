// API keys of the HTTP API (`Authorization: Bearer KEY`).
//
// Loaded once at start-up from coordinator.api_keys_file: one key per line,
// surrounding whitespace trimmed, blank lines and lines starting with '#'
// ignored. Immutable afterwards; check() may run on any thread.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kvgate::coordinator {

class ApiKeys {
 public:
  // NOT_FOUND when the file cannot be read, INVALID_ARGUMENT when it holds
  // no key or a key with whitespace inside; messages name the file (never a key).
  static Result<ApiKeys> load_file(const std::string& path);
  // Same rules, from text (tests, or keys from elsewhere).
  static Result<ApiKeys> parse(std::string_view text, const std::string& source_name);

  enum class Check { kOk, kMissing, kWrong };
  // `authorization`: the Authorization header value ("" when absent). The
  // comparison takes the same time whichever key, and whichever byte, differs.
  Check check(std::string_view authorization) const;
  size_t size() const { return keys_.size(); }

 private:
  std::vector<std::string> keys_;
};

// Constant-time equality of two byte strings (time depends only on the
// lengths of both, never on where they differ).
bool constant_time_equal(std::string_view a, std::string_view b);

}  // namespace kvgate::coordinator
