#!/usr/bin/env bash
# Recalibrates the KV compression of the default model and writes the gate
# side file that is committed under gates/ (see docs/calibration.md).
# Needs the model (scripts/fetch-model.sh), the calibration texts
# (scripts/fetch-eval-data.sh) and a built kvgate (scripts/setup.sh).
# Takes about 20 minutes on 2 cores. Extra arguments go to kvgate calibrate.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"
scripts/fetch-model.sh
scripts/fetch-eval-data.sh
mkdir -p gates
build/kvgate calibrate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --texts eval-data/calib \
  --out gates/SmolLM2-135M-Instruct.Q4_1.gate.gguf "$@"
scripts/fetch-model.sh  # installs the new side file next to the model
