#!/usr/bin/env bash
# Makes sure a Docker engine answers, for the worker and the Docker tests.
#
#   bash scripts/docker.sh      # or: source scripts/docker.sh (then cq_docker_ensure runs once)
#
# If `docker info` already works it only checks the Debian packages the tests use and returns.
# As root it installs what is missing from Debian (docker.io, busybox-static, docker-registry)
# and starts `dockerd` detached (there is no systemd here), logging to $CQ_DOCKERD_LOG.
# Not root: it prints the exact commands to run and returns non-zero when no engine answers.
# Safe to run again; quick when the engine already runs. Never sets DOCKER_BUILDKIT.

# Debian packages: the engine, plus what scripts/test-images.sh and the registry tests need.
CQ_DOCKER_PACKAGES=(docker.io busybox-static docker-registry)
CQ_DOCKERD_LOG="${CQ_DOCKERD_LOG:-/tmp/jupyter-compute-queue/dockerd.log}"
CQ_DOCKERD_TIMEOUT="${CQ_DOCKERD_TIMEOUT:-30}"

cq_docker_log() { printf '\033[1m[docker]\033[0m %s\n' "$*" >&2; }

# True when an engine answers (within 10 s, so a hung socket does not hang the caller).
cq_docker_answers() {
  command -v docker >/dev/null 2>&1 &&
    timeout 10 docker info --format '{{.ServerVersion}}' >/dev/null 2>&1
}

cq_docker_missing_packages() {
  local pkg missing=()
  for pkg in "${CQ_DOCKER_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$pkg")
  done
  echo "${missing[@]:-}"
}

# apt-get install as root; one `apt-get update` and a retry when the lists are missing or stale.
cq_docker_apt_install() {
  local t0=$SECONDS
  cq_docker_log "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a NEEDRESTART_SUSPEND=1
  local apt=(apt-get -y -qq -o DPkg::Lock::Timeout=300 install --no-install-recommends)
  if ! "${apt[@]}" "$@" >/dev/null 2>&1; then
    apt-get -qq -o DPkg::Lock::Timeout=300 update
    "${apt[@]}" "$@" >/dev/null
  fi
  cq_docker_log "installed in $((SECONDS - t0)) s"
}

cq_docker_start_dockerd() {
  local log="$CQ_DOCKERD_LOG" deadline t0
  t0=$(date +%s.%N)
  mkdir -p "$(dirname "$log")"
  cq_docker_log "starting dockerd (log: $log)"
  # Detached from this shell and its terminal, so it outlives the script and CI steps.
  setsid nohup dockerd >"$log" 2>&1 </dev/null &
  deadline=$((SECONDS + CQ_DOCKERD_TIMEOUT))
  until cq_docker_answers; do
    if ((SECONDS >= deadline)); then
      cq_docker_log "dockerd did not answer within ${CQ_DOCKERD_TIMEOUT} s; the end of $log:"
      tail -n 30 "$log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
  cq_docker_log "dockerd answers after $(
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
}

cq_docker_ensure() {
  local missing t0
  t0=$(date +%s.%N)
  missing="$(command -v dpkg-query >/dev/null && cq_docker_missing_packages || true)"
  if cq_docker_answers; then
    if [ -n "$missing" ]; then
      if [ "$(id -u)" = 0 ]; then
        # shellcheck disable=SC2086
        cq_docker_apt_install $missing || return 1
      else
        cq_docker_log "the engine answers, but the Docker tests also need: $missing"
        cq_docker_log "install them with:  sudo apt-get install -y --no-install-recommends $missing"
      fi
    fi
    return 0
  fi

  if [ "$(id -u)" != 0 ]; then
    cq_docker_explain "$missing"
    return 1
  fi
  if [ -n "$missing" ]; then
    if ! command -v apt-get >/dev/null; then
      cq_docker_log "not a Debian system: install ${CQ_DOCKER_PACKAGES[*]} (or equivalents) by hand"
      command -v dockerd >/dev/null || return 1
    else
      # shellcheck disable=SC2086
      cq_docker_apt_install $missing || return 1
    fi
  fi
  # The package's init script may have started an engine already; start one only if not.
  (
    # One starter at a time: a second dockerd on the same socket would fail.
    flock -w "$((CQ_DOCKERD_TIMEOUT + 10))" 9 || true
    cq_docker_answers || cq_docker_start_dockerd
  ) 9>"/tmp/jupyter-compute-queue-dockerd.lock" || return 1
  cq_docker_log "engine $(docker info --format '{{.ServerVersion}}') answers ($(
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s)"
}

# Not root and no engine: say exactly why and what to run.
cq_docker_explain() {
  local missing="$1" err
  if command -v docker >/dev/null; then
    err="$(timeout 10 docker info 2>&1 >/dev/null | tail -n 1 || true)"
  else
    err="no docker command"
  fi
  cq_docker_log "no Docker engine answers${err:+: $err}"
  if [ -n "$missing" ]; then
    cq_docker_log "install the Debian packages:  sudo apt-get install -y --no-install-recommends $missing"
  fi
  if [[ "$err" == *"connect: permission denied"* ]]; then
    cq_docker_log "the engine runs, but you may not use its socket: either run as root, or"
    cq_docker_log "  sudo usermod -aG docker $(id -un)   # then log out and in again"
  else
    cq_docker_log "start the engine:  sudo systemctl start docker   (with systemd), or without it:"
    cq_docker_log "  sudo sh -c 'setsid nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null &'"
    cq_docker_log "and to use it without sudo:  sudo usermod -aG docker $(id -un)   (log in again)"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -uo pipefail
  cq_docker_ensure
  exit $?
else
  cq_docker_ensure
fi
