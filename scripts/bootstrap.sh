#!/usr/bin/env bash
# Create ./.venv (or $TCM_VENV) and install the project with the extras in $1
# (comma-separated, e.g. "train,dev"). Re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${TCM_VENV:-.venv}
extras=${1:-}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.installed-${extras:-base}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip >&2
if [[ ",$extras," == *",train,"* ]]; then
  # The CPU wheel of this exact release is what CI machines carry; asking for it
  # first keeps the resolver from fetching a multi-GB CUDA build.
  echo "bootstrap: installing torch==2.13.0 (CPU)" >&2
  "${pip[@]}" torch==2.13.0 >&2
fi
echo "bootstrap: installing tcm-retrieval${extras:+[$extras]}" >&2
"${pip[@]}" -e ".${extras:+[$extras]}" >&2
touch "$stamp"
