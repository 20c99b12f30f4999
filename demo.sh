#!/usr/bin/env bash
# Command 1: the main job end to end on the embedded default (see README).
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
exec "${TCM_VENV:-.venv}/bin/python" -m imagesets build "$@"
