#!/usr/bin/env bash
# The whole test suite: installs what it needs, then lint, types and tests.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_jobs.py -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/install.sh"
cd "$ROOT"

log "ruff"
"$VENV/bin/ruff" check jupyter_compute_queue tests
"$VENV/bin/ruff" format --check jupyter_compute_queue tests
log "mypy --strict"
"$VENV/bin/mypy"
log "pytest"
"$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-auto}" "$@"
