// Status and Result<T>: the one error scheme of kvgate.
//
// Fallible functions return Status or Result<T> (shaped like std::expected).
// Codes tell retryable conditions (kUnavailable, kDeadlineExceeded,
// kResourceExhausted) from fatal ones (kInvalidArgument, kDataLoss, ...).
// Exceptions thrown by libraries are caught where they are called and turned
// into a Status there; asserts guard only our own invariants.
#pragma once

#include <cassert>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace kvgate {

enum class StatusCode {
  kOk = 0,
  kInProgress,          // not an error: the operation continues asynchronously
  kInvalidArgument,     // bad input from a user, request, file or config
  kNotFound,            // a named thing (file, tensor, key) does not exist
  kOutOfRange,          // an index, offset or size past a limit
  kDataLoss,            // corrupted or truncated data (bad checksum, bad file)
  kUnimplemented,       // valid but not supported (unknown architecture, type)
  kResourceExhausted,   // a pool, queue or budget is full (retryable)
  kUnavailable,         // a peer is down or unreachable (retryable)
  kDeadlineExceeded,    // a deadline passed (retryable)
  kCancelled,           // the caller gave up
  kPermissionDenied,    // authentication or authorization failed
  kFailedPrecondition,  // the system is not in a state to do this
  kInternal,            // a bug of ours
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: message"
  std::string to_string() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status out_of_range(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status data_loss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status resource_exhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status failed_precondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }

// Result<T>: either a value or a non-ok Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT: implicit by design
    assert(!std::get<Status>(v_).ok() && "Result constructed from an ok Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return ok(); }

  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace kvgate

// Propagate a non-ok Status from an expression returning Status.
#define KVGATE_RETURN_IF_ERROR(expr)            \
  do {                                          \
    ::kvgate::Status kvgate_status_ = (expr);   \
    if (!kvgate_status_.ok()) return kvgate_status_; \
  } while (0)

#define KVGATE_CONCAT_INNER(a, b) a##b
#define KVGATE_CONCAT(a, b) KVGATE_CONCAT_INNER(a, b)
// Assign the value of a Result<T> expression to `lhs`, or return its Status.
#define KVGATE_ASSIGN_OR_RETURN(lhs, expr) \
  KVGATE_ASSIGN_OR_RETURN_IMPL(KVGATE_CONCAT(kvgate_result_, __LINE__), lhs, expr)
#define KVGATE_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()
