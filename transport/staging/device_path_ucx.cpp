// query_ucx_memory_types with UCX (built when KVGATE_HAVE_UCX).
#include <ucp/api/ucp.h>

#include "transport/staging/device_path.h"
#include "transport/ucx/ucx_context.h"

namespace kvgate::transport::staging {

static_assert(kUcsMemoryTypeHost == UCS_MEMORY_TYPE_HOST);
static_assert(kUcsMemoryTypeCuda == UCS_MEMORY_TYPE_CUDA);
static_assert(kUcsMemoryTypeCudaManaged == UCS_MEMORY_TYPE_CUDA_MANAGED);
static_assert(kUcsMemoryTypeRocm == UCS_MEMORY_TYPE_ROCM);
static_assert(kUcsMemoryTypeRocmManaged == UCS_MEMORY_TYPE_ROCM_MANAGED);

Result<UcxMemoryTypes> query_ucx_memory_types(const TransportConfig& config) {
  // The transport's own context set-up, so the answer reflects the same
  // UCX_TLS / net devices / defaults its transfers will run with.
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<UcxContext> ctx,
                          UcxContext::create(config, nullptr, 0));
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucs_status_t st = ucp_context_query(ctx->context(), &attr); st != UCS_OK)
    return ucx_status(st, "ucp_context_query(memory types)");
  UcxMemoryTypes out;
  out.ucx_version = ucp_get_version_string();
  out.memory_types = attr.memory_types;
  return out;
}

}  // namespace kvgate::transport::staging
