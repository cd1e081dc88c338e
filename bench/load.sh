#!/usr/bin/env bash
# End-to-end load on this machine: the disaggregated cluster of a config
# (`kvgate up`: coordinator, prefill and decode processes, KV over UCX)
# against a single colocated node with the same model and policy
# (`kvgate serve`), the same load (`kvgate bench load`) on each, in one run.
# Writes out/load/{cluster,colocated}.json, a table and a plot.
#
#   bench/load.sh [configs/local.yaml] [extra `kvgate bench load` options]
#   e.g. bench/load.sh configs/local.yaml --concurrency 1,2,4,8 --requests 24
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KVGATE_BUILD_DIR:-${root}/build}"
config="${1:-${root}/configs/local.yaml}"
shift || true
out="${root}/out/load"
mkdir -p "${out}"
kvgate="${build}/kvgate"
# The config's coordinator.listen and model.served_name (configs/local.yaml's
# by default); set URL / MODEL for another config.
url="${URL:-127.0.0.1:8000}"
model="${MODEL:-SmolLM2-135M-Instruct}"

wait_for_line() {  # file pattern seconds
  for _ in $(seq 1 $(( $3 * 5 ))); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "load: timed out waiting for '$2' in $1" >&2
  cat "$1" >&2
  return 1
}

extra=("$@")

echo "load: disaggregated cluster (${config})"
"${kvgate}" up "${config}" >"${out}/up.log" 2>&1 &
up_pid=$!
trap 'kill -INT ${up_pid} 2>/dev/null || true' EXIT
wait_for_line "${out}/up.log" "cluster up at" 300
"${kvgate}" bench load --url "${url}" --model "${model}" --label cluster --out "${out}/cluster.json" "${extra[@]}"
kill -INT "${up_pid}"
wait "${up_pid}" || true
trap - EXIT

echo "load: colocated node (kvgate serve, same model and policy)"
"${kvgate}" serve --config "${config}" --node coordinator >"${out}/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -TERM ${serve_pid} 2>/dev/null || true' EXIT
wait_for_line "${out}/serve.log" "http://" 300
"${kvgate}" bench load --url "${url}" --model "${model}" --label colocated --out "${out}/colocated.json" "${extra[@]}"
kill -TERM "${serve_pid}"
wait "${serve_pid}" || true
trap - EXIT

python3 "${root}/tools/plot_load.py" "${out}/cluster.json" "${out}/colocated.json" \
  --table "${out}/load.md" --plot "${out}/load.png"
