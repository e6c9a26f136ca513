#!/usr/bin/env bash
# Install edge-vlm and its models from this kit, offline: no package index, no compiler.
#
#   bash install.sh [--prefix DIR] [--python PYTHON] [--no-self-check]
#
# DIR is the venv to create (default: ~/.local/share/edge-vlm/venv, or
# ~/Library/Application Support/edge-vlm/venv on macOS). The installer checks the kit
# (kit.json against this machine, every file against SHA256SUMS) before it creates
# anything, then installs the wheels with pip --no-index, imports the models into the
# model store and asks the shipped model about a sample image.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kit_pythons="@PYTHONS@"   # the Python versions this kit has wheels for

python=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || { echo "install: error: --python needs a path" >&2; exit 2; }
              python="$2"; shift 2 ;;
    --python=*) python="${1#--python=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

version_of() {  # prints X.Y of a Python 3, nothing if it does not run
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2]) if sys.version_info[0] == 3 else None' \
    2>/dev/null || true
}

if [ -z "$python" ]; then
  # A Python the kit was built for, else the first Python 3 found (install.py then says
  # which version the kit needs).
  for v in $kit_pythons; do
    for c in "python$v" python3 python; do
      command -v "$c" >/dev/null 2>&1 || continue
      if [ "$(version_of "$c")" = "$v" ]; then python="$c"; break 2; fi
    done
  done
  if [ -z "$python" ]; then
    for c in python3 python; do
      if [ -n "$(version_of "$c")" ]; then python="$c"; break; fi
    done
  fi
  if [ -z "$python" ]; then
    echo "install: error: no Python 3 found; this kit needs Python $kit_pythons (pass --python PATH)" >&2
    exit 2
  fi
elif [ -z "$(version_of "$python")" ]; then
  echo "install: error: --python $python does not run as Python 3" >&2
  exit 2
fi

exec "$python" "$here/install.py" ${args[@]+"${args[@]}"}
