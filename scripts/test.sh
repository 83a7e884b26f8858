#!/usr/bin/env bash
# The whole test suite: installs what it needs, then lint, types and tests.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/model/test_jobs.py -x).
set -euo pipefail
INSTALL_TEST_PACKAGES=1 # also Chromium, for the browser tests (tests/browser)
source "$(dirname "${BASH_SOURCE[0]}")/install.sh"
cd "$ROOT"

log "ruff"
"$VENV/bin/ruff" check jupyter_compute_queue tests
"$VENV/bin/ruff" format --check jupyter_compute_queue tests
log "mypy --strict"
"$VENV/bin/mypy"
log "layering (lint-imports: the contracts in pyproject.toml, docs/design.md \"Layout\")"
"$VENV/bin/lint-imports" --no-cache
# --- Docker engine and test images (scripts/docker.sh, scripts/test-images.sh) ---
# As root they install and start what is missing; otherwise they say what to run, and the
# Docker tests skip (under CI=true a missing engine or image fails the run instead).
is_ci() { case "${CI:-}" in [Tt]rue | TRUE | 1 | [Yy]es) return 0 ;; esac; return 1; }
if [ "$(id -u)" = 0 ] || docker info >/dev/null 2>&1; then
  if ! bash "$ROOT/scripts/docker.sh"; then
    is_ci && exit 1
    log "Docker tests will be skipped: no Docker engine answers (see above)"
  elif ! bash "$ROOT/scripts/test-images.sh"; then
    is_ci && exit 1
    log "Docker tests will be skipped: the test images could not be built (see above)"
  fi
else
  bash "$ROOT/scripts/docker.sh" || true # not root, no engine: it prints what to run
  log "Docker tests will be skipped: no Docker engine answers and this is not root"
fi
# --- end Docker ---
log "pytest"
# loadgroup: the browser tests (xdist_group "browser") share one worker, one JupyterLab and one
# Chromium; every other test is spread as usual.
"$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-auto}" --dist loadgroup "$@"
