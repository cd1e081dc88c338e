// How KV leaves (and reaches) device memory: straight through UCX when the
// UCX build can move CUDA memory, else staged through pinned host buffers
// (StagedSender / StagedReceiver). Decided once at start-up and logged, so
// an operator reading a node's log knows which path its transfers take and
// why (README.md).
//
// Pure functions apart from query_ucx_memory_types (which creates and
// destroys a UCP context, ~tens of ms) and the logging; any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/config.h"
#include "common/status.h"

namespace kvgate::transport::staging {

enum class DeviceTransferPath : uint8_t {
  kUcxCudaMemory,     // UCX moves the device pages itself (CUDA memory registered)
  kStagedPinnedHost,  // device ⇄ pinned host copies overlapped with the sends
};

// "ucx-cuda-memory", "staged-pinned-host".
std::string_view device_transfer_path_name(DeviceTransferPath path);

struct DeviceTransferChoice {
  DeviceTransferPath path = DeviceTransferPath::kStagedPinnedHost;
  std::string reason;  // one line, says why
};

// What a UCP context says about memory types.
struct UcxMemoryTypes {
  std::string ucx_version;    // "1.13.1"
  uint64_t memory_types = 0;  // ucp_context_attr_t::memory_types: bit i = ucs_memory_type_t i
};

// Bit indexes of ucs_memory_type_t (ucs/memory/memory_type.h), repeated
// here so that the decision builds without UCX.
inline constexpr int kUcsMemoryTypeHost = 0;
inline constexpr int kUcsMemoryTypeCuda = 1;
inline constexpr int kUcsMemoryTypeCudaManaged = 2;
inline constexpr int kUcsMemoryTypeRocm = 3;
inline constexpr int kUcsMemoryTypeRocmManaged = 4;

// "{host, cuda}" for a memory_types mask.
std::string memory_types_string(uint64_t memory_types);

// Creates a UCP context the way the ucx transport does (config.ucx_tls and
// ucx_net_devices applied, kvgate's UCX defaults) and asks it
// ucp_context_query(UCP_ATTR_FIELD_MEMORY_TYPES). UNIMPLEMENTED when kvgate
// was built without UCX; UCX's errors as kUnavailable/kInternal.
Result<UcxMemoryTypes> query_ucx_memory_types(const TransportConfig& config);

// The decision: kUcxCudaMemory only for the ucx transport whose context
// lists UCS_MEMORY_TYPE_CUDA; otherwise staged, with the reason (another
// transport kind, no UCX in this build, the query's error, or the memory
// types UCX does list).
DeviceTransferChoice choose_device_transfer_path(TransportKind kind,
                                                 const Result<UcxMemoryTypes>& ucx);
// Queries UCX (only for kind ucx) and decides.
DeviceTransferChoice choose_device_transfer_path(const TransportConfig& config);

// One info line: "device KV transfer path=staged-pinned-host reason=...".
void log_device_transfer_path(const DeviceTransferChoice& choice);

}  // namespace kvgate::transport::staging
