#!/usr/bin/env bash
# Command 2: set up and run the whole test suite (lint, unit, integration, end-to-end).
# Extra arguments go to pytest, e.g. ./test.sh -k calibrate -x
set -euo pipefail
cd "$(dirname "$0")"

scripts/bootstrap.sh train,dev
venv=${TCM_VENV:-.venv}
scripts/install_prometheus.sh
scripts/install_fonts.sh  # the novel set's fonts: its tests must not skip
scripts/install_node_client.sh  # the Node.js client of docs/SERVER.md, run by its test
export TCM_TEST_CACHE_DIR=${TCM_TEST_CACHE_DIR:-$PWD/.cache/test-glyphs}
# Everything the tests need is installed above, so a skip here would hide a gap: fail on it.
export TCM_TEST_NO_SKIPS=1

"$venv/bin/ruff" check .
# pytest exits 5 when it collected no test: set -e turns that into a failure too.
"$venv/bin/python" -m pytest "$@"
