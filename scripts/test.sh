#!/usr/bin/env bash
# Runs the whole test suite: makes sure packages, model and build are in
# place (scripts/setup.sh --no-run), then runs every ctest test.
# Extra arguments go to ctest (e.g. -L unit, -R tokenizer).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${KVGATE_BUILD_DIR:-${root}/build}"
"${root}/scripts/setup.sh" --no-run
cd "${build}"
ctest --output-on-failure --timeout 600 -j "${KVGATE_JOBS:-2}" "$@"
