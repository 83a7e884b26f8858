#!/usr/bin/env bash
# Installs everything and starts the product: JupyterLab with the compute-queue extension.
# Extra arguments go to `jupyter lab` (e.g. scripts/run.sh --port 8890).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/install.sh"
cd "$ROOT"
log "starting JupyterLab in $ROOT/notebooks"
mkdir -p notebooks
exec "$VENV/bin/jupyter" lab --notebook-dir="$ROOT/notebooks" "$@"
