#!/usr/bin/env bash
# Command 1: the main job end to end on the embedded default (see README).
#   ./demo.sh                 calibrate, serve, enrol, query, report live FAR (CPU, a few minutes)
#   ./demo.sh --prometheus    ... with a real Prometheus scraping the server
#   ./demo.sh --compare       ... after training a baseline and a TCM model side by side
# Every flag goes to `python -m demo` (see `./demo.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"

extras=""
for arg in "$@"; do
  case "$arg" in --train | --compare) extras="train" ;; esac
done
scripts/bootstrap.sh "$extras"
exec "${TCM_VENV:-.venv}/bin/python" -m demo "$@"
