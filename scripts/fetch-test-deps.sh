#!/usr/bin/env bash
# Python packages the integration tests use, installed into the ignored
# folder .pydeps/ (no virtualenv needed, the system's packages untouched):
# the official `openai` client, which tests/integration/openai_client.py
# drives against a running cluster. Safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="${root}/.pydeps"
if PYTHONPATH="${deps}" python3 -c "import openai" 2>/dev/null; then
  echo "fetch-test-deps: openai client present in ${deps}"
  exit 0
fi
echo "fetch-test-deps: installing the openai client into ${deps}"
python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
  --target "${deps}" "openai>=1.30,<4" 2>&1 | grep -v "Running pip as the 'root' user" || true
PYTHONPATH="${deps}" python3 -c "import openai; print('fetch-test-deps: openai', openai.__version__)"
