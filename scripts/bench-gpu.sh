#!/usr/bin/env bash
# The GPU engine benchmark (kvgate issue 5, item 6; docs/gpu-bench.md): on
# one CUDA machine, kvgate's CUDA engine and llama.cpp's CUDA build on the
# same GPU and the same GGUF files, SmolLM2-135M (Q4_1) and a synthetic model
# with Llama-3-8B shapes (random F16 weights), in one run, then one table of
# kvgate / llama.cpp. No network needed when the llama.cpp source is given
# (--sdist or --src-tar) or already extracted in .llama-cpp/.
#
#   scripts/bench-gpu.sh [--out DIR] [--sdist FILE | --src-tar FILE]
#       [--arch 90] [--jobs N] [--models smollm2,llama3-8b]
#       [--peak-tflops T --peak-gbps G] [--reps N] [--gen 128]
#       [--decode-context 512] [--prefill 512,4096] [--synthetic FILE]
#       [--smollm2 FILE]
#       [--skip-build] [--kvgate-bin DIR] [--llama-bin DIR]
#
#   --out DIR         results (default out/gpu-bench-<UTC time>): kvgate_<model>.json,
#                     llama_cpp_<model>.json, summary.json, table.txt, logs
#   --sdist/--src-tar the llama.cpp source (scripts/build-llama-cpp-cuda.sh)
#   --peak-*          the GPU's dense FP16 tensor peak and memory bandwidth;
#                     default from nvidia-smi's GPU name (H100 SXM/PCIe/NVL,
#                     H200, A100), else H100 SXM with a warning
#   --synthetic FILE  the Llama-3-8B-shaped GGUF (default
#                     .llama-cpp/models/llama3-8b-synthetic-f16.gguf; made
#                     once, 16 GB, reused)
#   --smollm2 FILE    default models/SmolLM2-135M-Instruct.Q4_1.gguf
#   --skip-build      use binaries built before; --kvgate-bin / --llama-bin
#                     name their folders (default build-cuda-bench and
#                     .llama-cpp/build-cuda/bin)
#
# Exit status: 0 when every step ran (whatever the ratios), 1 otherwise.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${root}/out/gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)"
src_args=()
arch=90
jobs="$(nproc)"
models="smollm2,llama3-8b"
peak_tflops=""
peak_gbps=""
reps=5
gen=128
decode_context=512
prefill=512,4096
synthetic="${root}/.llama-cpp/models/llama3-8b-synthetic-f16.gguf"
smollm2="${root}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
skip_build=0
bk="${root}/build-cuda-bench"
llama_bin="${root}/.llama-cpp/build-cuda/bin"

say() { echo "bench-gpu: $*" >&2; }
die() { say "error: $*"; exit 1; }

while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --sdist|--src-tar) src_args=("$1" "$2"); shift 2 ;;
    --arch) arch="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    --peak-tflops) peak_tflops="$2"; shift 2 ;;
    --peak-gbps) peak_gbps="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --gen) gen="$2"; shift 2 ;;
    --decode-context) decode_context="$2"; shift 2 ;;
    --prefill) prefill="$2"; shift 2 ;;
    --synthetic) synthetic="$2"; shift 2 ;;
    --smollm2) smollm2="$2"; shift 2 ;;
    --skip-build) skip_build=1; shift ;;
    --kvgate-bin) bk="$2"; shift 2 ;;
    --llama-bin) llama_bin="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

# ---- the machine ----
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this benchmark needs a CUDA GPU"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
[[ -n "${gpu}" ]] || die "nvidia-smi lists no GPU"
for t in cmake python3; do command -v "${t}" >/dev/null || die "${t} not found"; done
mkdir -p "${out}" || die "cannot create ${out}"
out="$(cd "${out}" && pwd)"
say "GPU: ${gpu}; results in ${out}"
nvidia-smi > "${out}/nvidia-smi.txt" 2>&1 || true

# Dense FP16/BF16 tensor peak (no sparsity) and memory bandwidth, from the
# vendors' data sheets.
if [[ -z "${peak_tflops}" || -z "${peak_gbps}" ]]; then
  case "${gpu}" in
    *H200*) dt=989; dg=4800 ;;
    *H100*NVL*) dt=835; dg=3900 ;;
    *H100*PCIe*) dt=756; dg=2000 ;;
    *H100*) dt=989; dg=3350 ;;
    *A100*80GB*PCIe*) dt=312; dg=1935 ;;
    *A100*80GB*) dt=312; dg=2039 ;;
    *A100*) dt=312; dg=1555 ;;
    *) dt=989; dg=3350; say "warning: unknown GPU '${gpu}': H100 SXM peaks; pass --peak-tflops/--peak-gbps" ;;
  esac
  peak_tflops="${peak_tflops:-${dt}}"
  peak_gbps="${peak_gbps:-${dg}}"
fi
say "peaks: ${peak_tflops} TFLOP/s, ${peak_gbps} GB/s"

failed=()
step() {  # step NAME LOG CMD...: runs CMD with output to LOG, records a failure
  local name="$1" logf="$2"; shift 2
  say "${name} (log: ${logf})"
  local t0; t0=$(date +%s)
  if "$@" > >(tee "${logf}") 2> >(tee "${logf}.err" >&2); then
    say "${name}: done in $(( $(date +%s) - t0 )) s"
    return 0
  fi
  say "${name}: FAILED (see ${logf}.err)"
  failed+=("${name}")
  return 1
}

# ---- 1. builds ----
bench_bin="${bk}/kvgate_engine_cuda_bench"
synth_bin="${bk}/kvgate_make_synthetic_gguf"
if ((!skip_build)); then
  gen_flag=()
  command -v ninja >/dev/null && gen_flag=(-G Ninja)
  if [[ ! -f "${bk}/CMakeCache.txt" ]]; then
    step "configure kvgate (CUDA arch ${arch})" "${out}/kvgate-configure.log" \
      cmake -S "${root}" -B "${bk}" "${gen_flag[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DKVGATE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${arch}" -DKVGATE_TESTS=OFF \
        -DKVGATE_UCX=OFF || die "kvgate configure failed"
  fi
  step "build kvgate_engine_cuda_bench" "${out}/kvgate-build.log" \
    cmake --build "${bk}" --parallel "${jobs}" --target kvgate_engine_cuda_bench \
      kvgate_make_synthetic_gguf kvgate_compressed_decode_bench || die "kvgate build failed"
  step "build llama.cpp (CUDA arch ${arch})" "${out}/llama-cpp-build.log" \
    "${root}/scripts/build-llama-cpp-cuda.sh" "${src_args[@]}" --arch "${arch}" --jobs "${jobs}" ||
    die "llama.cpp build failed"
fi
for b in "${bench_bin}" "${synth_bin}" "${llama_bin}/llama-bench" "${llama_bin}/llama-batched-bench"; do
  [[ -x "${b}" ]] || die "missing ${b} (run without --skip-build)"
done

# ---- 2. models ----
if [[ ",${models}," == *",llama3-8b,"* && ! -s "${synthetic}" ]]; then
  mkdir -p "$(dirname "${synthetic}")"
  step "write the synthetic Llama-3-8B GGUF (16 GB)" "${out}/synthetic.log" \
    "${synth_bin}" --shape llama3-8b --out "${synthetic}" || die "cannot write ${synthetic}"
fi

# ---- 3. both engines, model by model ----
kv_args=(--prefill "${prefill}" --decode-context "${decode_context}" --decode-steps "${gen}"
         --repeats "${reps}" --peak-tflops "${peak_tflops}" --peak-gbps "${peak_gbps}")
peer_args=(--bin-dir "${llama_bin}" --prefill "${prefill}" --gen "${gen}"
           --decode-context "${decode_context}" --reps "${reps}")
kv_json=()
peers=()
IFS=, read -r -a model_list <<< "${models}"
for m in "${model_list[@]}"; do
  case "${m}" in
    smollm2) file="${smollm2}" ;;
    llama3-8b) file="${synthetic}" ;;
    *) say "unknown model '${m}' (smollm2, llama3-8b)"; failed+=("model ${m}"); continue ;;
  esac
  if [[ ! -s "${file}" ]]; then
    say "missing ${file}"; failed+=("model ${m}"); continue
  fi
  if step "kvgate ${m}" "${out}/kvgate_${m}.log" "${bench_bin}" --model-file "${file}" \
      --name "${m}" --json "${out}/kvgate_${m}.json" "${kv_args[@]}"; then
    kv_json+=("${out}/kvgate_${m}.json")
  fi
  if step "llama.cpp ${m}" "${out}/llama_cpp_${m}.log" python3 "${root}/bench/llama_cpp_cuda_peer.py" \
      --model "${file}" --out "${out}/llama_cpp_${m}.json" "${peer_args[@]}"; then
    peers+=("${m}=${out}/llama_cpp_${m}.json")
  fi
done

# ---- 3b. compressed decode: dense vs gate+pod steps at 16k, batch 1/8/64 ----
# (issue 5's third target; also kvgate's batched decode, which
# kvgate_engine_cuda_bench does not run). Logged, not in the table.
cd_bin="${bk}/kvgate_compressed_decode_bench"
for m in "${model_list[@]}"; do
  case "${m}" in
    smollm2) file="${smollm2}"; gate_args=() ;;
    llama3-8b) file="${synthetic}"; gate_args=() ;;
    *) continue ;;
  esac
  [[ -s "${file}" && -x "${cd_bin}" ]] || continue
  # SmolLM2's calibrated gates where setup.sh made them; else a random gate.
  [[ "${m}" == smollm2 && -s "${file%.gguf}.gate.gguf" ]] && gate_args=(--gate "${file%.gguf}.gate.gguf")
  step "compressed decode ${m}" "${out}/compressed_decode_${m}.log" "${cd_bin}" --model "${file}" \
    "${gate_args[@]}" --context 16384 --batch 1,8,64 --steps 32 --peak-gbps "${peak_gbps}" || true
done

# ---- 4. the table ----
if ((${#kv_json[@]} + ${#peers[@]})); then
  python3 "${root}/tools/gpu_bench_table.py" --kvgate "${kv_json[@]}" --llama "${peers[@]}" \
    --peak-tflops "${peak_tflops}" --peak-gbps "${peak_gbps}" \
    --out "${out}/summary.json" | tee "${out}/table.txt" || failed+=("table")
else
  say "no results from either engine: no table"
fi
if ((${#failed[@]})); then
  say "failed steps: ${failed[*]}"
  exit 1
fi
say "results in ${out} (table.txt, summary.json)"
