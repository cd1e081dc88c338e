#!/usr/bin/env bash
# Builds llama.cpp's llama-bench (and llama-batched-bench) with the CUDA
# backend from the llama.cpp source vendored in the llama-cpp-python sdist,
# the peer of kvgate's CUDA engine benchmark (docs/gpu-bench.md).
#
#   scripts/build-llama-cpp-cuda.sh [--sdist FILE | --src-tar FILE] [--arch 90]
#       [--jobs N] [--cpu] [--configure-only] [--targets "llama-bench ..."]
#       [--out DIR] [--pack FILE]
#
#   --sdist FILE     llama_cpp_python-0.3.36.tar.gz; without it (and without
#                    --src-tar) the script looks in $KVGATE_LLAMA_SDIST,
#                    .llama-cpp/sdist/ and /tmp/lcpp/, then runs
#                    pip download --no-binary :all: --no-deps
#                    llama-cpp-python==0.3.36 into .llama-cpp/sdist/ (network).
#   --src-tar FILE   a trimmed source tarball made by --pack (no network, and
#                    small enough to carry to a GPU machine).
#   --pack FILE      after extracting, write the trimmed llama.cpp source
#                    (no models, docs, UI, tests) to FILE and stop.
#   --arch A         CMAKE_CUDA_ARCHITECTURES (default 90: H100/H200).
#   --cpu            a CPU-only build (GGML_CUDA off) into .llama-cpp/build-cpu.
#   --configure-only stop after cmake.
#   --targets T      ninja/make targets (default "llama-bench llama-batched-bench").
#   --out DIR        work folder (default <repo>/.llama-cpp, git-ignored).
#
# Binaries land in DIR/build-cuda/bin (or build-cpu/bin). Progress lines on
# stderr start with "build-llama-cpp:". Re-running reuses the extracted source
# and the build folder (incremental).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version=0.3.36
sdist=""
src_tar=""
pack=""
arch=90
jobs="$(nproc)"
cuda=1
configure_only=0
targets="llama-bench llama-batched-bench"
out="${root}/.llama-cpp"

say() { echo "build-llama-cpp: $*" >&2; }
die() { say "error: $*"; exit 1; }

while (($#)); do
  case "$1" in
    --sdist) sdist="$2"; shift 2 ;;
    --src-tar) src_tar="$2"; shift 2 ;;
    --pack) pack="$2"; shift 2 ;;
    --arch) arch="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --cpu) cuda=0; shift ;;
    --configure-only) configure_only=1; shift ;;
    --targets) targets="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

mkdir -p "${out}"
out="$(cd "${out}" && pwd)"
src="${out}/src/llama.cpp"
stamp="${out}/src/.extracted"

# ---- 1. the source ----
if [[ -n "${src_tar}" ]]; then
  [[ -f "${src_tar}" ]] || die "--src-tar ${src_tar}: no such file"
  if [[ ! -f "${stamp}" || "$(cat "${stamp}")" != "tar:$(basename "${src_tar}")" ]]; then
    say "extracting ${src_tar}"
    rm -rf "${out}/src"; mkdir -p "${out}/src"
    tar xzf "${src_tar}" -C "${out}/src"
    [[ -f "${src}/CMakeLists.txt" ]] || die "${src_tar} holds no llama.cpp/CMakeLists.txt"
    echo "tar:$(basename "${src_tar}")" > "${stamp}"
  fi
else
  if [[ -z "${sdist}" ]]; then
    for cand in "${KVGATE_LLAMA_SDIST:-}" "${out}/sdist/llama_cpp_python-${version}.tar.gz" \
                "/tmp/lcpp/llama_cpp_python-${version}.tar.gz"; do
      if [[ -n "${cand}" && -f "${cand}" ]]; then sdist="${cand}"; break; fi
    done
  fi
  if [[ -z "${sdist}" ]]; then
    say "downloading the llama-cpp-python ${version} sdist into ${out}/sdist (network)"
    mkdir -p "${out}/sdist"
    python3 -m pip download --no-binary :all: --no-deps --no-build-isolation \
      -d "${out}/sdist" "llama-cpp-python==${version}" >&2 ||
      die "pip download failed; pass --sdist FILE or --src-tar FILE"
    found=("${out}"/sdist/llama_cpp_python-*.tar.gz)
    sdist="${found[0]}"
  fi
  [[ -f "${sdist}" ]] || die "--sdist ${sdist}: no such file"
  if [[ ! -f "${stamp}" || "$(cat "${stamp}")" != "sdist:$(basename "${sdist}")" ]]; then
    say "extracting vendor/llama.cpp from ${sdist}"
    rm -rf "${out}/src"; mkdir -p "${out}/src"
    # Members are llama_cpp_python-<version>/vendor/llama.cpp/...
    tar xzf "${sdist}" -C "${out}/src" --strip-components=2 --wildcards '*/vendor/llama.cpp/*'
    [[ -f "${src}/CMakeLists.txt" ]] || die "${sdist} holds no vendor/llama.cpp"
    echo "sdist:$(basename "${sdist}")" > "${stamp}"
  fi
fi

if [[ -n "${pack}" ]]; then
  say "packing the trimmed source into ${pack}"
  tar czf "${pack}" -C "${out}/src" \
    --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/media \
    --exclude=llama.cpp/benches --exclude=llama.cpp/tools/ui --exclude=llama.cpp/tools/server \
    --exclude=llama.cpp/examples --exclude=llama.cpp/tests --exclude=.git llama.cpp
  say "wrote ${pack} ($(du -h "${pack}" | cut -f1))"
  exit 0
fi

# ---- 2. configure ----
if ((cuda)); then
  build="${out}/build-cuda"
  nvcc="${CUDACXX:-}"
  [[ -z "${nvcc}" ]] && nvcc="$(command -v nvcc || true)"
  [[ -z "${nvcc}" && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
  [[ -n "${nvcc}" ]] || die "no nvcc (install the CUDA toolkit or set CUDACXX)"
  say "nvcc: ${nvcc} ($("${nvcc}" --version | tail -1))"
  backend=(-DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER="${nvcc}" -DCMAKE_CUDA_ARCHITECTURES="${arch}"
           -DGGML_CUDA_NCCL=OFF)
else
  build="${out}/build-cpu"
  backend=(-DGGML_CUDA=OFF)
fi
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
if [[ ! -f "${build}/CMakeCache.txt" ]]; then
  say "configuring ${build} ($( ((cuda)) && echo "CUDA arch ${arch}" || echo CPU))"
  cmake -S "${src}" -B "${build}" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    "${backend[@]}" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_UI=OFF >"${build}.configure.log" 2>&1 ||
    { tail -30 "${build}.configure.log" >&2; die "cmake configure failed (${build}.configure.log)"; }
  grep -E "CUDA Toolkit|Using CUDA|CUDA_ARCH|Found CUDAToolkit|ggml version" \
    "${build}.configure.log" | sed 's/^/build-llama-cpp:   /' >&2 || true
fi
((configure_only)) && { say "configured ${build}"; exit 0; }

# ---- 3. build ----
say "building ${targets} with ${jobs} jobs (the CUDA kernels take minutes)"
t0=$(date +%s)
# shellcheck disable=SC2086
cmake --build "${build}" --parallel "${jobs}" --target ${targets}
say "built in $(( $(date +%s) - t0 )) s:"
for t in ${targets}; do
  [[ -x "${build}/bin/${t}" ]] || die "missing ${build}/bin/${t}"
  say "  ${build}/bin/${t}"
done
