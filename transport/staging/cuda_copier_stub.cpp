// create_cuda_copier in a build without CUDA (KVGATE_CUDA off).
#include "transport/staging/cuda_copier.h"

namespace kvgate::transport::staging {

Result<std::unique_ptr<DeviceCopier>> create_cuda_copier(uint32_t) {
  return unimplemented("kvgate was built without CUDA (KVGATE_CUDA=OFF): no CUDA copier");
}

}  // namespace kvgate::transport::staging
