#!/usr/bin/env bash
# Calibrates the KV compression of the default model and writes its gate
# side file next to the model (models/, ignored by git), where the gate
# policies look for it (see docs/calibration.md). scripts/setup.sh runs this
# when the file is missing. Needs a built kvgate. About 20 minutes on 2
# cores. Extra arguments go to kvgate calibrate.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"
build="${KVGATE_BUILD_DIR:-${root}/build}"
scripts/fetch-model.sh
scripts/fetch-eval-data.sh
"${build}/kvgate" calibrate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --texts eval-data/calib \
  --out models/SmolLM2-135M-Instruct.Q4_1.gate.gguf "$@"
