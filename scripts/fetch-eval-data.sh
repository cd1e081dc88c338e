#!/usr/bin/env bash
# Fetch the evaluation and calibration corpus into eval-data/ (ignored by git):
# Jane Austen's six novels (public domain), as shipped by the Debian package
# r-cran-janeaustenr (MIT). The package stores each novel as an R character
# vector in a lazy-load database; a small reader below (no R needed) turns
# each one into plain UTF-8 text, one line per line of the book, and every
# file is checked against its SHA-256. Safe to run again: verified files are
# left alone.
#
#   eval-data/calib/  Emma, Mansfield Park, Northanger Abbey, Sense and Sensibility
#   eval-data/eval/   Pride and Prejudice, Persuasion
#
# The two splits share no book (docs/eval.md). Needs apt-get (the .deb is
# downloaded, not installed) and python3.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${KVGATE_EVAL_DATA:-${root}/eval-data}"
package="r-cran-janeaustenr"

# split/name  sha256
want=(
  "calib/emma.txt 7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe"
  "calib/mansfieldpark.txt 98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9"
  "calib/northangerabbey.txt 51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed"
  "calib/sensesensibility.txt 105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09"
  "eval/prideprejudice.txt dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d"
  "eval/persuasion.txt 8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a"
)

verify_all() {
  local dir="$1" entry
  for entry in "${want[@]}"; do
    set -- ${entry}
    [[ -f "${dir}/$1" ]] || return 1
    echo "$2  ${dir}/$1" | sha256sum --check --status || return 1
  done
}

if verify_all "${out}"; then
  echo "fetch-eval-data: ${out} present and verified"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
echo "fetch-eval-data: downloading the Debian package ${package}"
# apt-get download needs the package lists; fetch them once if they are missing.
if ! (cd "${tmp}" && apt-get download -qq "${package}" 2>/dev/null); then
  sudo_cmd=()
  [[ "$(id -u)" -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  (cd "${tmp}" && apt-get download -qq "${package}")
fi
deb="$(ls "${tmp}"/${package}_*.deb)"
dpkg-deb -x "${deb}" "${tmp}/root"
db="$(find "${tmp}/root" -path '*/janeaustenr/data/Rdata.rdx' | head -n1)"
if [[ -z "${db}" ]]; then
  echo "fetch-eval-data: data/Rdata.rdx not found in ${deb}" >&2
  exit 1
fi

# Reads R's lazy-load database (Rdata.rdx index, Rdata.rdb zlib chunks of
# XDR-serialized objects) far enough for named character vectors.
python3 - "${db%.rdx}" "${tmp}/text" <<'PY'
import gzip, os, struct, sys, zlib

class Unserializer:
    """Minimal reader of R's XDR serialization (format 2 and 3)."""
    NIL, REF, LIST_TYPES = 254, 255, (2, 6, 239, 240)

    def __init__(self, data):
        self.b, self.p, self.refs = data, 0, []

    def int(self):
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def run(self):
        if self.b[:2] != b"X\n":
            sys.exit("fetch-eval-data: not an XDR serialization")
        self.p = 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()  # length of the native encoding's name, then the name
            self.p += n
        return self.item()

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (self.NIL, 253, 252, 251, 250, 242, 241):
            return None
        if t == self.REF:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == 1:  # symbol
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if t in self.LIST_TYPES:  # pairlist: [attr] [tag] car cdr...
            out = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out.append((tag[1] if tag else None, self.item()))
                flags = self.int()
                t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if t == self.NIL:
                    return out
                if t not in self.LIST_TYPES:
                    sys.exit(f"fetch-eval-data: unexpected SEXP type {t} in a pairlist")
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.p:self.p + n].decode("utf-8")
            self.p += n
            return s
        if t in (10, 13):  # logical, integer
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # double
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t in (16, 19, 20):  # character vector, list
            v = [self.item() for _ in range(self.length())]
        else:
            sys.exit(f"fetch-eval-data: unsupported SEXP type {t}")
        if has_attr:
            names = dict(self.item()).get("names")
            if names and len(names) == len(v):
                return dict(zip(names, v))
        return v

base, out = sys.argv[1:]
with open(base + ".rdx", "rb") as f:
    index = Unserializer(gzip.decompress(f.read())).run()
with open(base + ".rdb", "rb") as f:
    db = f.read()
os.makedirs(out, exist_ok=True)
for name, (offset, size) in index["variables"].items():
    chunk = db[offset:offset + size]
    lines = Unserializer(zlib.decompress(chunk[4:])).run()  # 4-byte length, then zlib
    if not isinstance(lines, list) or not all(x is None or isinstance(x, str) for x in lines):
        continue
    with open(os.path.join(out, name + ".txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(x or "" for x in lines) + "\n")
PY

mkdir -p "${out}/calib" "${out}/eval"
for entry in "${want[@]}"; do
  set -- ${entry}
  src="${tmp}/text/$(basename "$1")"
  if [[ ! -f "${src}" ]]; then
    echo "fetch-eval-data: $(basename "$1" .txt) not found in ${deb}" >&2
    exit 1
  fi
  if ! echo "$2  ${src}" | sha256sum --check --status; then
    echo "fetch-eval-data: SHA-256 mismatch for $1 (expected $2); the package changed" >&2
    exit 1
  fi
  cp "${src}" "${out}/$1"
done
verify_all "${out}"
echo "fetch-eval-data: ${out}/calib and ${out}/eval verified"
