#include "transport/staging/device_path.h"

#include "common/log.h"

namespace kvgate::transport::staging {

std::string_view device_transfer_path_name(DeviceTransferPath path) {
  switch (path) {
    case DeviceTransferPath::kUcxCudaMemory:
      return "ucx-cuda-memory";
    case DeviceTransferPath::kStagedPinnedHost:
      return "staged-pinned-host";
  }
  return "unknown";
}

std::string memory_types_string(uint64_t memory_types) {
  static constexpr const char* kNames[] = {"host", "cuda", "cuda-managed", "rocm", "rocm-managed"};
  std::string out = "{";
  for (int i = 0; i < 64; ++i) {
    if ((memory_types & (uint64_t{1} << i)) == 0) continue;
    if (out.size() > 1) out += ", ";
    out += i < 5 ? std::string(kNames[i]) : "type" + std::to_string(i);
  }
  return out + "}";
}

DeviceTransferChoice choose_device_transfer_path(TransportKind kind,
                                                 const Result<UcxMemoryTypes>& ucx) {
  DeviceTransferChoice c;
  c.path = DeviceTransferPath::kStagedPinnedHost;
  if (kind != TransportKind::kUcx) {
    c.reason = "transport '" + std::string(kind == TransportKind::kLoopback ? "loopback" : "nccl") +
               "' is not ucx: KV is staged through pinned host buffers";
    return c;
  }
  if (!ucx.ok()) {
    c.reason = "cannot ask UCX for its memory types (" + ucx.status().to_string() +
               "): KV is staged through pinned host buffers";
    return c;
  }
  const uint64_t types = ucx->memory_types;
  const std::string listed = memory_types_string(types);
  if ((types & (uint64_t{1} << kUcsMemoryTypeCuda)) != 0) {
    c.path = DeviceTransferPath::kUcxCudaMemory;
    c.reason = "UCX " + ucx->ucx_version + " supports CUDA memory (memory types " + listed +
               "): KV moves from and to device pages directly";
    return c;
  }
  c.reason = "UCX " + ucx->ucx_version + " supports memory types " + listed +
             ", not CUDA (built without CUDA support, or its cuda transports are not "
             "enabled): KV is staged through pinned host buffers";
  return c;
}

DeviceTransferChoice choose_device_transfer_path(const TransportConfig& config) {
  if (config.kind != TransportKind::kUcx)
    return choose_device_transfer_path(config.kind,
                                       Result<UcxMemoryTypes>(unimplemented("not ucx")));
  return choose_device_transfer_path(config.kind, query_ucx_memory_types(config));
}

void log_device_transfer_path(const DeviceTransferChoice& choice) {
  log::info("device KV transfer", {{"path", device_transfer_path_name(choice.path)},
                                   {"reason", choice.reason}});
}

}  // namespace kvgate::transport::staging
