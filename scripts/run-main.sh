#!/usr/bin/env bash
# The main job on the embedded default: the whole disaggregated cluster of
# configs/local.yaml (coordinator, prefill node, decode node; KV compressed
# with gate+pod and shipped over UCX) as separate processes, one chat
# request through its OpenAI-compatible API, then it keeps serving at
# http://127.0.0.1:8000/v1 until Ctrl-C.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KVGATE_BUILD_DIR:-${root}/build}"
exec "${build}/kvgate" up "${root}/configs/local.yaml" \
  --request "Explain in two sentences why the sky is blue." --max-tokens 96 "$@"
