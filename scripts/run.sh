#!/usr/bin/env bash
# Installs everything and starts the product: JupyterLab with the compute-queue extension and,
# when a Docker engine answers, its local worker on queue `local`.
# Extra arguments go to `jupyter lab` (e.g. scripts/run.sh --port 8890).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/install.sh"
cd "$ROOT"
# As root this installs and starts the Docker engine; otherwise it says what to run. Without an
# engine JupyterLab still starts, as a queue host without a local worker.
bash "$ROOT/scripts/docker.sh" || log "no Docker engine: JupyterLab starts without a local worker"
log "starting JupyterLab in $ROOT/notebooks"
mkdir -p notebooks
# Jupyter refuses to start as root unless told: the first command must just work (CI and
# containers are root), so as root it says --allow-root itself.
AS_ROOT=()
if [ "$(id -u)" = 0 ]; then AS_ROOT=(--allow-root); fi
exec "$VENV/bin/jupyter" lab --notebook-dir="$ROOT/notebooks" "${AS_ROOT[@]}" "$@"
