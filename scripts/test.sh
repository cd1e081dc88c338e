#!/usr/bin/env bash
# Runs the whole test suite: makes sure packages, model and build are in
# place (scripts/setup.sh --no-run). Then, where the CUDA toolkit is
# installed, the CUDA leg: the CUDA backend is compiled (-DKVGATE_CUDA=ON,
# in ${build}-cuda) so it cannot rot, and its `gpu` tests run — on a
# machine without a GPU they skip, saying so. Last, every ctest test of the
# main build (so the summary that ends the output is the whole suite's).
# Extra arguments go to ctest (e.g. -L unit, -R tokenizer).
# KVGATE_CUDA_LEG=0 skips the CUDA leg.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KVGATE_BUILD_DIR:-${root}/build}"
jobs="${KVGATE_JOBS:-2}"
"${root}/scripts/setup.sh" --no-run

nvcc="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
if [[ "${KVGATE_CUDA_LEG:-1}" != "0" && -x "${nvcc}" ]]; then
  cuda_build="${build}-cuda"
  echo "test: CUDA leg in ${cuda_build} (compile the CUDA backend; gpu tests run where a GPU is)"
  # NCCL (tensor parallelism's collective) where its header is installed.
  nccl=OFF
  targets=(kvgate_engine_cuda kvgate_engine_cuda_forward cuda_conformance_test cuda_forward_test
           cuda_gate_test staging_cuda_test cuda_prefill_test kvgate_engine_cuda_bench
           engine_cuda_bench_json_test kvgate_engine_cuda_pages device_page_pool_test
           kvgate_compressed_decode_bench kvgate_decode kvgate_prefill cuda_compressed_decode_test)
  if [[ -f /usr/local/cuda/include/nccl.h || -f /usr/include/nccl.h ]]; then
    nccl=ON
    targets+=(kvgate_engine_tp_nccl cuda_tp_test kvgate_transport_nccl nccl_comm_link_test)
  fi
  # Configured every time (seconds when nothing changed) so an option added
  # here reaches a build directory made before it.
  cmake -S "${root}" -B "${cuda_build}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DKVGATE_CUDA=ON -DKVGATE_NCCL="${nccl}" -DCMAKE_CUDA_COMPILER="${nvcc}" >/dev/null
  cmake --build "${cuda_build}" -j "${jobs}" --target "${targets[@]}"
  # The gpu tests, and the unit tests that exist only in a CUDA build.
  (cd "${cuda_build}" && ctest --output-on-failure --timeout 600 -L gpu &&
     ctest --output-on-failure --timeout 600 -R '^EngineCudaBenchJson\.')
else
  echo "test: CUDA leg skipped (no ${nvcc}, or KVGATE_CUDA_LEG=0)"
fi

echo "test: the main suite in ${build}"
(cd "${build}" && ctest --output-on-failure --timeout 600 -j "${jobs}" "$@")
