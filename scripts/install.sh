#!/usr/bin/env bash
# Installs what the product and its test suite need, on a fresh Debian machine or a developer's.
# As root it installs the Debian packages itself; otherwise it names the exact command to run.
# Sourced by run.sh and test.sh; safe to run again (every step is idempotent).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COMPUTE_QUEUE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

# Debian packages the product or the tests use. Extend this list, never install by hand.
DEBIAN_PACKAGES=(python3-venv)

log() { printf '\033[1m[install]\033[0m %s\n' "$*" >&2; }

missing_debian_packages() {
  local pkg missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  echo "${missing[@]:-}"
}

install_system() {
  command -v dpkg-query >/dev/null || { log "not a Debian system: install ${DEBIAN_PACKAGES[*]} by hand"; return; }
  local missing
  missing="$(missing_debian_packages)"
  [ -z "$missing" ] && return
  # A pyenv or other non-Debian Python brings its own venv module.
  if [ "$missing" = "python3-venv" ] && "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then return; fi
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: $missing"
    log "install them with:  sudo apt-get install -y --no-install-recommends $missing"
    exit 1
  fi
  log "apt-get install $missing"
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a NEEDRESTART_SUSPEND=1
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  [ -x "$VENV/bin/uv" ] || "$VENV/bin/pip" install -q uv
  log "installing the package and its test and lab extras into $VENV"
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" -q -e "$ROOT[test,lab]"
}

install_system
install_python
