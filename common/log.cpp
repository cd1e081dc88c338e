#include "common/log.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <memory>
#include <mutex>

namespace kvgate::log {

namespace detail {
std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
}

namespace {

// What configure() set. Replaced whole, read through a shared_ptr copy, so a
// line being formatted never sees half of a reconfiguration.
struct Setup {
  LogFormat format = LogFormat::kText;
  std::string role = "-";
  std::string node = "-";
};

std::mutex g_setup_mutex;
std::shared_ptr<const Setup> g_setup = std::make_shared<const Setup>();

// Held while a line is written, so lines never interleave.
std::mutex g_output_mutex;
std::function<void(std::string_view)> g_sink;

std::shared_ptr<const Setup> current_setup() {
  std::lock_guard<std::mutex> lock(g_setup_mutex);
  return g_setup;
}

std::string_view upper_level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace:
      return "TRACE";
    case LogLevel::kDebug:
      return "DEBUG";
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kWarn:
      return "WARN";
    case LogLevel::kError:
      return "ERROR";
  }
  return "?";
}

// Length of the valid UTF-8 sequence at s[i], or 0 when the bytes there are
// not one (overlong forms, surrogates and code points past U+10FFFF
// included).
size_t utf8_sequence_length(std::string_view s, size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  size_t n = 0;
  uint32_t cp = 0;
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    cp = b0 & 0x0F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    cp = b0 & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3F);
  }
  if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
      (cp >= 0xD800 && cp <= 0xDFFF)) {
    return 0;
  }
  return n;
}

// JSON string body: quotes, backslashes and control characters escaped,
// invalid UTF-8 bytes replaced by U+FFFD.
void append_escaped(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const size_t n = utf8_sequence_length(s, i);
      if (n == 0) {
        out += "\xEF\xBF\xBD";
        ++i;
      } else {
        out.append(s.substr(i, n));
        i += n;
      }
      continue;
    }
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20 || c == 0x7F) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 0xF];
        } else {
          out += static_cast<char>(c);
        }
    }
    ++i;
  }
}

void append_json_string(std::string& out, std::string_view s) {
  out += '"';
  append_escaped(out, s);
  out += '"';
}

// Text mode: bare when unambiguous, else a JSON string.
void append_text_value(std::string& out, std::string_view s) {
  bool bare = !s.empty();
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c <= 0x20 || c == 0x7F || c == '"' || c == '=' || c == '\\' || c >= 0x80) {
      bare = false;
      break;
    }
  }
  if (bare) {
    out.append(s);
  } else {
    append_json_string(out, s);
  }
}

// The message in text mode stays on one line: control characters escaped,
// spaces kept.
void append_text_message(std::string& out, std::string_view s) {
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7F) {
      std::string_view one(&ch, 1);
      append_escaped(out, one);
    } else {
      out += ch;
    }
  }
}

template <typename T>
void append_number(std::string& out, T value) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof(buf), value);
  out.append(buf, r.ptr);
}

void append_double(std::string& out, double v, bool json) {
  if (std::isfinite(v)) {
    append_number(out, v);
    return;
  }
  // JSON has no NaN or infinity: a string keeps the information.
  const char* word = std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");
  if (json) {
    append_json_string(out, word);
  } else {
    out += word;
  }
}

void append_timestamp(std::string& out, std::chrono::system_clock::time_point now) {
  using namespace std::chrono;
  const auto ms = duration_cast<milliseconds>(now.time_since_epoch()).count();
  const time_t seconds = static_cast<time_t>(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
  const int millis = static_cast<int>(ms - static_cast<int64_t>(seconds) * 1000);
  std::tm tm{};
  gmtime_r(&seconds, &tm);
  char buf[40];
  const int n =
      std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                    tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, millis);
  if (n > 0) out.append(buf, static_cast<size_t>(std::min(n, static_cast<int>(sizeof(buf) - 1))));
}

void append_value(std::string& out, const Field::Value& value, bool json) {
  struct Visitor {
    std::string& out;
    bool json;
    void operator()(std::string_view s) const {
      if (json) {
        append_json_string(out, s);
      } else {
        append_text_value(out, s);
      }
    }
    void operator()(int64_t v) const { append_number(out, v); }
    void operator()(uint64_t v) const { append_number(out, v); }
    void operator()(double v) const { append_double(out, v, json); }
    void operator()(bool v) const { out += v ? "true" : "false"; }
    void operator()(const Status* s) const {
      const std::string text = s == nullptr ? std::string("OK") : s->to_string();
      (*this)(std::string_view(text));
    }
  };
  std::visit(Visitor{out, json}, value);
}

void format_into(std::string& out, const Setup& setup, LogLevel level, std::string_view message,
                 Fields fields, std::chrono::system_clock::time_point now) {
  if (setup.format == LogFormat::kJson) {
    out += "{\"ts\":\"";
    append_timestamp(out, now);
    out += "\",\"level\":";
    append_json_string(out, level_name(level));
    out += ",\"role\":";
    append_json_string(out, setup.role);
    out += ",\"node\":";
    append_json_string(out, setup.node);
    out += ",\"msg\":";
    append_json_string(out, message);
    for (const Field& f : fields) {
      out += ',';
      append_json_string(out, f.key());
      out += ':';
      append_value(out, f.value(), /*json=*/true);
    }
    out += '}';
    return;
  }
  append_timestamp(out, now);
  out += ' ';
  out += upper_level_name(level);
  out += ' ';
  append_text_value(out, setup.role);
  out += ' ';
  append_text_value(out, setup.node);
  out += ' ';
  append_text_message(out, message);
  for (const Field& f : fields) {
    out += ' ';
    append_text_message(out, f.key());
    out += '=';
    append_value(out, f.value(), /*json=*/false);
  }
}

void write_stderr(std::string_view line) {
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    const ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // nowhere left to report it
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace

std::string_view level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace:
      return "trace";
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
  }
  return "?";
}

void configure(const LoggingConfig& config, std::string_view role, std::string_view node) {
  auto setup = std::make_shared<Setup>();
  setup->format = config.format;
  setup->role = role.empty() ? "-" : std::string(role);
  setup->node = node.empty() ? "-" : std::string(node);
  {
    std::lock_guard<std::mutex> lock(g_setup_mutex);
    g_setup = std::move(setup);
  }
  set_level(config.level);
}

void set_level(LogLevel level) {
  detail::g_min_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

void set_sink(std::function<void(std::string_view)> sink) {
  std::lock_guard<std::mutex> lock(g_output_mutex);
  g_sink = std::move(sink);
}

std::string format_line(LogLevel level, std::string_view message, Fields fields,
                        std::chrono::system_clock::time_point now) {
  std::string out;
  format_into(out, *current_setup(), level, message, fields, now);
  return out;
}

void write(LogLevel level, std::string_view message, Fields fields) {
  if (!enabled(level)) return;
  const auto now = std::chrono::system_clock::now();
  // Reused per thread: logging does not allocate once lines stop growing.
  thread_local std::string line;
  line.clear();
  format_into(line, *current_setup(), level, message, fields, now);
  std::lock_guard<std::mutex> lock(g_output_mutex);
  if (g_sink) {
    g_sink(line);
    return;
  }
  line += '\n';
  write_stderr(line);
}

}  // namespace kvgate::log
