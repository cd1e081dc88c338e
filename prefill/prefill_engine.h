// PrefillEngine: the prefill node's engine thread (docs/cluster.md step 4).
// One job at a time: full-attention prefill with the policy's observers,
// the first token sampled from the last logits, the compressed cache built
// in a page pool of the decode node's page size, its wire image checked
// against the grant (Extend to the decode node when it outgrew it — never a
// truncation), shipped segment by segment from a staging buffer over the
// transport, and on the transfer's OK event the TransferManifest sent on
// the decode node's control connection.
//
// Ownership and threads: run() is the body of the engine thread, which owns
// the CpuForward, the Transport (every transport call is made here) and the
// page pools. Control messages leave through ControlLinks (implemented by
// PrefillNode on its io_context; every call is non-blocking and
// thread-safe); work arrives through the JobQueue.
//
// Failures of a job become Error{request, code} to the coordinator that
// sent it (through ControlLinks::reply): deadline (job.deadline_in from
// receipt, transport.transfer_deadline from the start of the transfer)
// kDeadlineExceeded; extend refused kResourceExhausted "needs X bytes,
// granted Y: <reason>"; decode node unreachable kUnavailable; a failed
// transfer the transport's code. A cancelled job (Cancel from the
// coordinator) ends quietly. The node keeps serving after any of them.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/control_protocol.h"
#include "common/status.h"
#include "engine/model.h"
#include "prefill/job_queue.h"
#include "prefill/metrics.h"
#include "transport/transport.h"

namespace kvgate::prefill {

// The node's control-plane side, as the engine sees it.
class ControlLinks {
 public:
  virtual ~ControlLinks() = default;
  // Sends `message` to the coordinator the job came from.
  virtual void reply(const QueuedJob& job, const control::Message& message) = 0;
  // Starts opening the control connection to the decode node at `address`
  // ("host:port") unless it is open or opening.
  virtual void open_decode(const std::string& address) = 0;
  // OK once open; kInProgress while opening; else why it is not open.
  virtual Status decode_state(const std::string& address) = 0;
  // Queues `message` on that connection; UNAVAILABLE when it is not open.
  virtual Status send_decode(const std::string& address, const control::Message& message) = 0;
};

struct EngineSettings {
  int64_t page_bytes = 0;  // decode.page_tokens * head_dim * 2
  std::chrono::milliseconds transfer_deadline{10000};
  std::chrono::milliseconds quiesce_timeout{5000};  // the transport's
};

class PrefillEngine {
 public:
  // Everything is borrowed and must outlive the engine; `transport` is
  // owned by the thread that calls run() from then on.
  PrefillEngine(engine::CpuForward& forward, transport::Transport& transport, JobQueue& queue,
                ControlLinks& links, PrefillMetrics& metrics, EngineSettings settings);
  ~PrefillEngine();

  // Runs jobs until the queue is closed; a job running then is aborted
  // (its transfer cancelled and waited for). Blocks.
  void run();

 private:
  void handle(QueuedJob& job);
  Status process(QueuedJob& job, JobFailure& cause);
  Result<transport::PeerId> peer_for(const control::Bytes& address);
  // Waits (progressing the transport, reading messages) until `ready`
  // holds. kCancelled on Cancel, kUnavailable on shutdown,
  // kDeadlineExceeded (naming `what`) past `deadline`.
  template <typename Ready>
  Status wait_for(Ready ready, Clock::time_point deadline, const char* what);
  void pump();
  void drain_messages();
  Status wait_decode_link(const QueuedJob& job, Clock::time_point deadline);
  Status extend(QueuedJob& job, int64_t needed_bytes, uint64_t& granted_bytes,
                control::Bytes& grant, JobFailure& cause);

  engine::CpuForward& forward_;
  transport::Transport& transport_;
  JobQueue& queue_;
  ControlLinks& links_;
  PrefillMetrics& metrics_;
  EngineSettings settings_;
  std::vector<float> logits_;
  std::map<control::Bytes, transport::PeerId> peers_;  // decode transport address -> peer
  std::vector<transport::TransferEvent> events_;       // progress() output, not yet consumed
  // The running job's answers from its decode node.
  RequestId current_;
  std::optional<control::ExtendResult> extend_result_;
  std::optional<Status> decode_error_;
  // Staging buffers of transfers abandoned before their event (a transport
  // that never reported): kept until the event arrives, never freed early.
  std::map<std::pair<uint64_t, uint64_t>, std::vector<std::byte>> orphaned_;
};

}  // namespace kvgate::prefill
