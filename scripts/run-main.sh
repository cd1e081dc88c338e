#!/usr/bin/env bash
# The main job on the embedded default: a chat completion from SmolLM2 on the CPU engine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KVGATE_BUILD_DIR:-${root}/build}"
exec "${build}/kvgate" generate --model "${root}/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --chat --prompt "Explain in two sentences why the sky is blue." --max-tokens 96
