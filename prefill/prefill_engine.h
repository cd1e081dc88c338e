// PrefillEngine: the prefill node's engine thread (docs/cluster.md step 4).
// It takes a batch of queued jobs at a time (up to max_batch_jobs /
// max_batch_tokens; a job whose policy ranks tokens by attention
// statistics runs alone) and runs ONE layer-major full-attention prefill of
// all their prompts (engine::prefill_compressed_batch). Each job's
// compressed cache is built block by block in a page pool of the decode
// node's page size, and each block's wire segment is shipped over the
// transport as soon as its last layer is computed — the transfer overlaps
// the rest of the prefill — as long as it fits the grant. When the finished
// image outgrew the grant, the engine asks the decode node to Extend (the
// transfer may already be under way: the receive grows in place) and ships
// the rest; never a truncation. On the transfer's OK event the
// TransferManifest goes on the decode node's control connection. After the
// shared prefill the jobs are finished one after the other (first token,
// extend, remaining segments, manifest).
//
// Ownership and threads: run() is the body of the engine thread, which owns
// the CpuForward, the Transport (every transport call is made here) and the
// page pools. Control messages leave through ControlLinks (implemented by
// PrefillNode on its io_context; every call is non-blocking and
// thread-safe); work arrives through the JobQueue.
//
// Failures of a job become Error{request, code} to the coordinator that
// sent it (through ControlLinks::reply) and never touch the other jobs of
// its batch: deadline (job.deadline_in from receipt; a transfer that starts
// during the prefill is bounded by the job's deadline, one that starts
// after it by transport.transfer_deadline) kDeadlineExceeded; extend
// refused kResourceExhausted "needs X bytes, granted Y: <reason>"; decode
// node unreachable kUnavailable; a failed transfer the transport's code. A
// cancelled job (Cancel from the coordinator) ends quietly. The node keeps
// serving after any of them.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/control_protocol.h"
#include "common/status.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/page_pool.h"
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
  int64_t max_batch_jobs = 8;        // prefill.max_batch_jobs
  int64_t max_batch_tokens = 16384;  // prefill.max_batch_tokens
};

// The compute a PrefillEngine drives: the model's shapes and one batch
// prefill with engine::prefill_compressed_batch's contract — on a
// CpuForward (cpu()), or on the GPU (prefill_node.cpp, engine.backend
// cuda: engine::cuda::prefill_compressed_batch_cuda). `run` is called on
// the engine thread only.
struct PrefillCompute {
  using BatchFn = std::function<Result<std::vector<Result<engine::CompressedPrefill>>>(
      std::span<engine::CompressedPrefillJob> jobs,
      const std::function<Status(int64_t layer)>& on_layer)>;
  engine::LlamaConfig config;
  BatchFn run;
  // `forward` must outlive the engine.
  static PrefillCompute cpu(engine::CpuForward& forward);
};

class PrefillEngine {
 public:
  // Everything is borrowed and must outlive the engine; `transport` is
  // owned by the thread that calls run() from then on.
  PrefillEngine(PrefillCompute compute, transport::Transport& transport, JobQueue& queue,
                ControlLinks& links, PrefillMetrics& metrics, EngineSettings settings);
  ~PrefillEngine();

  // Runs jobs until the queue is closed; a job running then is aborted
  // (its transfer cancelled and waited for). Blocks.
  void run();

 private:
  struct JobRun;
  void run_batch(std::vector<QueuedJob>& jobs);
  // Before the prefill: deadline, connections. False: the job failed.
  bool start(JobRun& run);
  // A wire segment of `run` was built: stage it (copy, checksum) and ship
  // what fits the grant.
  Status stage_segment(JobRun& run, std::span<const kvstore::PageId> pages,
                       const kvstore::PagePool& pool);
  void ship_ready(JobRun& run);
  // Between layers: transport progress, messages, cancels, held segments.
  Status between_layers();
  // After the prefill: first token, extend, the rest of the image, the
  // transfer's event, the manifest.
  Status complete(JobRun& run, kvstore::CompressedKvCache& cache, double prefill_s);
  void end_job(JobRun& run, const Status& s);
  // Gives up on a transfer that may still read `run`'s staging buffers.
  void abandon_transfer(JobRun& run);
  Result<transport::PeerId> peer_for(const control::Bytes& address);
  // Waits (progressing the transport, reading messages) until `ready`
  // holds. kCancelled on Cancel, kUnavailable on shutdown,
  // kDeadlineExceeded (naming `what`) past `deadline`.
  template <typename Ready>
  Status wait_for(const JobRun& run, Ready ready, Clock::time_point deadline, const char* what);
  void pump();
  void drain_messages();
  Status wait_decode_link(const JobRun& run, Clock::time_point deadline);
  Status extend(JobRun& run, int64_t needed_bytes);

  PrefillCompute compute_;
  transport::Transport& transport_;
  JobQueue& queue_;
  ControlLinks& links_;
  PrefillMetrics& metrics_;
  EngineSettings settings_;
  std::map<control::Bytes, transport::PeerId> peers_;  // decode transport address -> peer
  std::vector<transport::TransferEvent> events_;       // progress() output, not yet consumed
  // The running jobs, for routing the decode nodes' answers.
  std::map<RequestId, JobRun*> active_;
  bool in_prefill_ = false;  // segments shipped now overlap later layers' compute
  Clock::time_point pass_end_;  // the end of the last prefill pass
  // Staging buffers of transfers abandoned before their event (a transport
  // that never reported, a job failed mid-transfer): kept until the event
  // arrives, never freed early.
  std::map<std::pair<uint64_t, uint64_t>, std::vector<std::vector<std::byte>>> orphaned_;
};

}  // namespace kvgate::prefill
