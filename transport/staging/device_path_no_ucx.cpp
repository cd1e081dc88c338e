// query_ucx_memory_types without UCX (built when KVGATE_HAVE_UCX is 0).
#include "transport/staging/device_path.h"

namespace kvgate::transport::staging {

Result<UcxMemoryTypes> query_ucx_memory_types(const TransportConfig&) {
  return unimplemented("kvgate was built without UCX");
}

}  // namespace kvgate::transport::staging
