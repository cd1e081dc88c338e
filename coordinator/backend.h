// The interface between the HTTP front end and whatever runs a request.
//
// The front end (coordinator/http_server.h) parses, validates, tokenizes and
// admits a request, then hands a GenerationRequest to a Backend with a
// GenerationSink that receives the output. Two implementations:
//   - LocalBackend (coordinator/local_backend.h): the CPU engine in-process,
//     one request at a time (`kvgate serve`, tests);
//   - the placement/control-plane backend (later): reserves bytes on a decode
//     node, sends the prefill job, relays tokens (DESIGN.md §1, §7).
//
// Sink contract (what a Backend promises, what the server relies on):
//   - submit() never calls the sink inline; if it returns non-ok the sink is
//     never called at all.
//   - Otherwise the sink receives, in order and never concurrently (calls may
//     come from different backend threads, but one at a time):
//       on_started()        at most once, when the request leaves the
//                           backend's queue (placed / prefill begins);
//       on_tokens(...)      zero or more times;
//       on_done(...) XOR on_error(...)   exactly once, always last.
//     after cancel(id) the terminal call still comes (usually
//     on_error(kCancelled)), so the caller can always release what it holds.
//   - Sink methods must not block: they run on the backend's engine thread.
//     The server's sink only records timings and posts to the connection's
//     strand.
//
// Status mapping of submit() and on_error() to HTTP (coordinator/README.md):
//   kInvalidArgument, kOutOfRange, kUnimplemented -> 400
//   kNotFound                                    -> 404
//   kResourceExhausted  (a queue is full, retry later)        -> 429
//   kUnavailable, kDeadlineExceeded, kFailedPrecondition
//                       (no capacity / no ready node in time)  -> 503
//   kCancelled          (the client went away)                 -> no response
//   anything else                                             -> 500
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/control_protocol.h"
#include "common/status.h"
#include "engine/sampler.h"

namespace kvgate::coordinator {

// A request ready to run: the prompt is already tokenized (with the chat
// template applied) and every field has been checked by the front end.
struct GenerationRequest {
  RequestId id;
  std::string model;                   // served model name
  std::vector<int32_t> prompt_tokens;  // non-empty
  int32_t max_tokens = 0;              // >= 1; prompt + max_tokens <= the model context
  engine::SamplingParams sampling;     // validated
  std::vector<std::string> stop;       // stop strings (not included in the output)
  bool ignore_eos = false;
};

struct GenerationUsage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

struct GenerationResult {
  std::string finish_reason;  // "stop" (EOS or a stop string) or "length"
  GenerationUsage usage;
};

class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  virtual void on_started() = 0;
  // `text`: newly releasable completion text (valid UTF-8; may be empty when
  // a token completes no character or may begin a stop string). `n_tokens`:
  // tokens generated since the last call (0 for a final flush of held text).
  virtual void on_tokens(std::string_view text, int32_t n_tokens) = 0;
  virtual void on_done(const GenerationResult& result) = 0;
  virtual void on_error(const Status& status) = 0;
};

struct BackendHealth {
  bool ready = false;
  std::string reason;  // why not ready ("" when ready)
};

struct BackendModel {
  std::string name;
  int64_t context_tokens = 0;
};

// Thread safety: every method may be called from any thread (the server's
// I/O threads) and must not block on compute.
class Backend {
 public:
  virtual ~Backend() = default;
  // Queues the request; the sink gets its output (contract above).
  virtual Status submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink) = 0;
  // Stops a request early (client disconnect). Unknown or finished ids are
  // ignored. Never blocks.
  virtual void cancel(RequestId id) = 0;
  virtual BackendHealth health() const = 0;
  virtual std::vector<BackendModel> models() const = 0;
};

}  // namespace kvgate::coordinator
