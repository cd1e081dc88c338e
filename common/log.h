// One line per event on stderr, with the process's role and node
// (DESIGN.md §8 "Logs").
//
//   log::configure(config.logging, "decode", config.cluster.node_name);  // once, in main
//   log::info("reserve granted", {{"request", id}, {"lease", lease}, {"bytes", n}});
//   log::warn("transfer failed", {{"request", id}, {"status", status}});
//
// Text (the default):
//   2025-01-31T12:00:00.123Z INFO decode decode-1 reserve granted request=42 lease=7 bytes=1024
// JSON (logging.format: json), one object per line:
//   {"ts":"2025-01-31T12:00:00.123Z","level":"info","role":"decode","node":"decode-1",
//    "msg":"reserve granted","request":42,"lease":7,"bytes":1024}
// Text values are quoted (JSON escapes) when they are empty or hold a space,
// '=', '"' or a control character; JSON strings are escaped and invalid
// UTF-8 becomes U+FFFD, so every line parses. Field keys should not be ts,
// level, role, node or msg.
//
// Threads: every function may be called from any thread. A line is built on
// the caller's thread and written with one write(2) under a lock, so lines
// never interleave. A call below the configured level costs one relaxed
// atomic load (and building its Field list, which never allocates: fields
// view their values, a Status is formatted only when the line is written).
// Nothing here throws on its own (an allocation failure aside) or blocks
// beyond that write.
#pragma once

#include <atomic>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <variant>

#include "common/config.h"
#include "common/status.h"

namespace kvgate::log {

// One key=value of a line. Views its value: build fields in the logging
// call itself (temporaries live until the call returns), never keep them.
class Field {
 public:
  using Value = std::variant<std::string_view, int64_t, uint64_t, double, bool, const Status*>;

  Field(std::string_view key, std::string_view value) : key_(key), value_(value) {}
  Field(std::string_view key, const char* value)
      : key_(key), value_(std::string_view(value == nullptr ? "" : value)) {}
  Field(std::string_view key, const std::string& value)
      : key_(key), value_(std::string_view(value)) {}
  Field(std::string_view key, bool value) : key_(key), value_(value) {}
  template <std::integral T>
  requires(!std::same_as<T, bool>) Field(std::string_view key, T value) : key_(key) {
    if constexpr (std::is_signed_v<T>) {
      value_ = static_cast<int64_t>(value);
    } else {
      value_ = static_cast<uint64_t>(value);
    }
  }
  template <std::floating_point T>
  Field(std::string_view key, T value) : key_(key), value_(static_cast<double>(value)) {}
  // "CODE: message" ("OK" when ok).
  Field(std::string_view key, const Status& status) : key_(key), value_(&status) {}
  // Strong ids (RequestId, NodeId, LeaseId): their number.
  template <typename Id>
  requires requires(const Id& id) {
    { id.value() } -> std::convertible_to<uint64_t>;
    { id.valid() } -> std::convertible_to<bool>;
  }
  Field(std::string_view key, const Id& id)
      : key_(key), value_(static_cast<uint64_t>(id.value())) {}
  // Durations in milliseconds (a number; say "_ms" in the key).
  template <typename Rep, typename Period>
  Field(std::string_view key, std::chrono::duration<Rep, Period> d)
      : key_(key), value_(std::chrono::duration<double, std::milli>(d).count()) {}

  std::string_view key() const { return key_; }
  const Value& value() const { return value_; }

 private:
  std::string_view key_;
  Value value_;
};

using Fields = std::initializer_list<Field>;

// Sets the level, format, role and node name of every later line. Meant to
// be called once at start-up (calling it again is safe: tests do).
// Until then: level info, text, role and node "-".
void configure(const LoggingConfig& config, std::string_view role, std::string_view node);
void set_level(LogLevel level);

// For tests: lines (without the newline) go to `sink` instead of stderr,
// called under the output lock; an empty function restores stderr.
void set_sink(std::function<void(std::string_view line)> sink);

namespace detail {
extern std::atomic<int> g_min_level;
}

inline bool enabled(LogLevel level) {
  return static_cast<int>(level) >= detail::g_min_level.load(std::memory_order_relaxed);
}

// Formats and writes one line if `level` is enabled.
void write(LogLevel level, std::string_view message, Fields fields = {});

// The line `write` would produce (no newline), with the current role, node
// and format, at time `now`. For tests and for callers that log elsewhere.
std::string format_line(LogLevel level, std::string_view message, Fields fields,
                        std::chrono::system_clock::time_point now);

// "trace", "debug", "info", "warn", "error".
std::string_view level_name(LogLevel level);

inline void trace(std::string_view message, Fields fields = {}) {
  if (enabled(LogLevel::kTrace)) write(LogLevel::kTrace, message, fields);
}
inline void debug(std::string_view message, Fields fields = {}) {
  if (enabled(LogLevel::kDebug)) write(LogLevel::kDebug, message, fields);
}
inline void info(std::string_view message, Fields fields = {}) {
  if (enabled(LogLevel::kInfo)) write(LogLevel::kInfo, message, fields);
}
inline void warn(std::string_view message, Fields fields = {}) {
  if (enabled(LogLevel::kWarn)) write(LogLevel::kWarn, message, fields);
}
inline void error(std::string_view message, Fields fields = {}) {
  if (enabled(LogLevel::kError)) write(LogLevel::kError, message, fields);
}

}  // namespace kvgate::log
