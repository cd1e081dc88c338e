#include "coordinator/api_keys.h"

#include <fstream>
#include <sstream>

namespace kvgate::coordinator {

namespace {

std::string_view trim(std::string_view s) {
  const char* ws = " \t\r\n\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  const size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

}  // namespace

bool constant_time_equal(std::string_view a, std::string_view b) {
  // Walk the longer length; bytes past the end of the shorter compare
  // against 0 and the length difference is folded in.
  const size_t n = a.size() > b.size() ? a.size() : b.size();
  volatile unsigned char diff = static_cast<unsigned char>(a.size() != b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff = diff | static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

Result<ApiKeys> ApiKeys::parse(std::string_view text, const std::string& source_name) {
  ApiKeys out;
  size_t line_no = 0;
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    ++line_no;
    line = trim(line);
    if (line.empty() || line.front() == '#') continue;
    if (line.find_first_of(" \t") != std::string_view::npos) {
      return invalid_argument("API key file " + source_name + ": line " + std::to_string(line_no) +
                              " holds whitespace inside a key (one key per line)");
    }
    out.keys_.emplace_back(line);
  }
  if (out.keys_.empty()) {
    return invalid_argument("API key file " + source_name +
                            " holds no key (one per line; '#' starts a comment); set "
                            "coordinator.auth: disabled to run without keys");
  }
  return out;
}

Result<ApiKeys> ApiKeys::load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("API key file " + path + " (coordinator.api_keys_file) cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return not_found("API key file " + path + ": read error");
  return parse(ss.str(), path);
}

ApiKeys::Check ApiKeys::check(std::string_view authorization) const {
  authorization = trim(authorization);
  if (authorization.empty()) return Check::kMissing;
  constexpr std::string_view kScheme = "Bearer ";
  // The scheme is case-insensitive (RFC 7235).
  auto scheme_matches = [&](size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if ((authorization[i] | 0x20) != (kScheme[i] | 0x20)) return false;
    }
    return true;
  };
  const size_t word = kScheme.size() - 1;  // "Bearer" alone (trimmed): no key
  if (authorization.size() == word && scheme_matches(word)) return Check::kMissing;
  if (authorization.size() < kScheme.size() || !scheme_matches(kScheme.size())) {
    return Check::kWrong;
  }
  const std::string_view key = trim(authorization.substr(kScheme.size()));
  if (key.empty()) return Check::kMissing;
  bool match = false;
  for (const std::string& k : keys_) match |= constant_time_equal(key, k);  // no early exit
  return match ? Check::kOk : Check::kWrong;
}

}  // namespace kvgate::coordinator
