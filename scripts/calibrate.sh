#!/usr/bin/env bash
# Calibrates the KV compression of the default model and writes its gate
# side file next to the model (models/, ignored by git), where the gate
# policies look for it (see docs/calibration.md). scripts/setup.sh runs this
# when the file is missing. Needs a built kvgate. About 30 minutes on 2
# cores. Extra arguments go to kvgate calibrate (e.g. --out FILE).
#
# The texts: the four calibration novels (eval-data/calib) plus retrieval
# episodes made from them by scripts/make-retrieval-texts.py (a fact, prose,
# a question about it), written with the novels to eval-data/calib-mix/, and
# retrieval probes for the layer grouping and the threshold fit
# (eval-data/grouping-probes.txt, --grouping-probes). docs/eval.md has what
# they change.
#
#   --novels-only   (first argument) the novels alone, no episodes or probes
#                   (the calibration of sessions 2-4).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"
build="${KVGATE_BUILD_DIR:-${root}/build}"
scripts/fetch-model.sh
scripts/fetch-eval-data.sh
texts=eval-data/calib
if [[ "${1:-}" == "--novels-only" ]]; then
  shift
else
  texts=eval-data/calib-mix
  rm -rf "${texts}"
  mkdir -p "${texts}"
  cp eval-data/calib/*.txt "${texts}/"
  python3 scripts/make-retrieval-texts.py eval-data/calib "${texts}/retrieval-episodes.txt" \
    --probes eval-data/grouping-probes.txt
  set -- --grouping-probes eval-data/grouping-probes.txt "$@"
fi
"${build}/kvgate" calibrate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --texts "${texts}" \
  --out models/SmolLM2-135M-Instruct.Q4_1.gate.gguf "$@"
