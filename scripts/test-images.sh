#!/usr/bin/env bash
# Builds the Docker images the tests run, locally: no registry is needed (or reachable in CI).
#
#   cq-test/busybox:1   Debian's busybox-static: /bin/busybox, a symlink per applet, PATH=/bin
#   cq-test/python:1    Debian's python3 + dash + coreutils with their dependency closure
#
# Each image carries a label with a hash of its inputs (this script, the busybox binary, the apt
# package lists); an image whose label matches is kept, so a second run takes well under a second.
# Needs a Docker engine (scripts/docker.sh) and busybox-static; as root it runs `apt-get update`
# once when apt does not know python3 yet (a fresh machine). Never sets DOCKER_BUILDKIT.
set -euo pipefail

BUSYBOX_IMAGE="${CQ_TEST_BUSYBOX_IMAGE:-cq-test/busybox:1}"
PYTHON_IMAGE="${CQ_TEST_PYTHON_IMAGE:-cq-test/python:1}"
LABEL="org.jupyter-compute-queue.test-content"
# Debian packages whose dependency closure makes the Python image.
PYTHON_PACKAGES=(python3 dash coreutils)
# Byte-compiles the Python image's modules (run with /bin/sh inside the image's root).
COMPILE='exec /usr/bin/python3 -m compileall -q -j0 /usr/lib/python3 /usr/lib/python3.[0-9]*'
# Parts of the unpacked packages no test needs.
TAR_EXCLUDES=(--exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./usr/share/info
  --exclude=./usr/share/locale --exclude=./usr/share/lintian)

log() { printf '\033[1m[test-images]\033[0m %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }
sha() { sha256sum | cut -c1-64; }

is_root() { [ "$(id -u)" = 0 ]; }
SELF_HASH="$(sha <"${BASH_SOURCE[0]}")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cq-test-images.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# The id of an image, or nothing.
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }

# Removes the image a rebuild replaced, unless something still uses it.
drop_replaced() {
  local old="$1" name="$2"
  if [ -n "$old" ] && [ "$old" != "$(image_id "$name")" ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
}

# The content label of an image, or nothing when the image is missing or unlabelled.
image_label() {
  docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true
}

# /etc/passwd, /etc/group and a world-writable /tmp, so both root and any --user id work.
add_base_files() {
  local root="$1" shell="$2"
  mkdir -p "$root/etc" "$root/tmp" "$root/root"
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  printf '%s\n' "root:x:0:0:root:/root:$shell" \
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin" >"$root/etc/passwd"
  printf '%s\n' "root:x:0:" "nogroup:x:65534:" >"$root/etc/group"
}

# Imports the root folder as an image, owned by root whoever runs this script.
import_rootfs() {
  local root="$1" name="$2" content="$3" path="$4" cmd="$5" old
  old="$(image_id "$name")"
  tar --numeric-owner --owner=0 --group=0 -C "$root" -c . |
    docker import -c "ENV PATH=$path" -c "LABEL $LABEL=$content" -c "CMD [\"$cmd\"]" \
      - "$name" >/dev/null
  drop_replaced "$old" "$name"
}

need_busybox() {
  if [ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 &&
    ! ldd /bin/busybox >/dev/null 2>&1; then
    return
  fi
  log "no static /bin/busybox: it comes from Debian's busybox-static package"
  if is_root; then
    DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a NEEDRESTART_SUSPEND=1 \
      apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends busybox-static >/dev/null
  else
    log "install it with:  sudo apt-get install -y --no-install-recommends busybox-static"
    exit 1
  fi
}

build_busybox() {
  local t0 content root="$WORK/busybox" applet
  t0="$(now)"
  need_busybox
  content="$(printf '%s\n' "$SELF_HASH" "$(sha </bin/busybox)" | sha)"
  if [ "$(image_label "$BUSYBOX_IMAGE")" = "$content" ]; then
    log "$BUSYBOX_IMAGE is up to date ($(since "$t0"))"
    return
  fi
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  add_base_files "$root" /bin/sh
  import_rootfs "$root" "$BUSYBOX_IMAGE" "$content" /bin sh
  log "built $BUSYBOX_IMAGE in $(since "$t0")"
}

# A fingerprint of apt's package lists: the closure and the .deb files only change with them.
apt_lists_hash() {
  local lists
  lists="$(apt-config shell L Dir::State::lists/d | sed -E "s/^L='(.*)'$/\1/")"
  cat "${lists:-/var/lib/apt/lists/}"*_Packages* 2>/dev/null | sha
}

need_apt_lists() {
  apt-cache show python3 >/dev/null 2>&1 && return
  if is_root; then
    log "apt does not know python3 yet: apt-get update"
    apt-get update -qq -o DPkg::Lock::Timeout=300
  else
    log "apt does not know python3 yet; run:  sudo apt-get update"
    exit 1
  fi
}

build_python() {
  local t0 t1 content root="$WORK/python" debs="$WORK/debs" pkgs dir
  local apt_opts=(-q)
  t0="$(now)"
  command -v apt-get >/dev/null || { log "$PYTHON_IMAGE needs apt (Debian or Ubuntu)"; exit 1; }
  content="$(printf '%s\n' "$SELF_HASH" "$(apt_lists_hash)" | sha)"
  if [ "$(image_label "$PYTHON_IMAGE")" = "$content" ]; then
    log "$PYTHON_IMAGE is up to date ($(since "$t0"))"
    return
  fi
  need_apt_lists
  content="$(printf '%s\n' "$SELF_HASH" "$(apt_lists_hash)" | sha)"
  # Real packages only: virtual ones print as <name>, foreign architectures as name:arch.
  pkgs="$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "${PYTHON_PACKAGES[@]}" |
    grep -E '^[a-z0-9][a-z0-9.+-]*$' | sort -u)"
  mkdir -p "$debs"
  # As root apt would download as the _apt user, which cannot write to our folder.
  is_root && apt_opts+=(-o APT::Sandbox::User=root)
  t1="$(now)"
  # shellcheck disable=SC2086
  (cd "$debs" && apt-get download "${apt_opts[@]}" $pkgs >/dev/null)
  log "downloaded $(wc -w <<<"$pkgs") packages in $(since "$t1")"
  # A merged /usr as on Debian 12; tar keeps the directory symlinks the packages unpack into.
  mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/lib64"
  for dir in bin sbin lib lib64; do ln -s "usr/$dir" "$root/$dir"; done
  t1="$(now)"
  find "$debs" -name '*.deb' -print0 |
    xargs -0 -P "$(nproc)" -I{} sh -c 'deb="$1" root="$2"; shift 2
      dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root" "$@"' \
      sh {} "$root" "${TAR_EXCLUDES[@]}"
  log "unpacked in $(since "$t1")"
  ln -sf dash "$root/usr/bin/sh"
  add_base_files "$root" /bin/sh
  # Byte-compile the standard library once: without it every `python3` in a job container
  # compiles what it imports again (about 350 ms instead of 80 ms for the test's imports).
  t1="$(now)"
  local compiled=""
  if is_root && chroot "$root" /usr/bin/true 2>/dev/null; then
    # Parallel compiling needs POSIX semaphores, which live in /dev/shm.
    mkdir -p "$root/dev/shm"
    chroot "$root" /bin/sh -c "$COMPILE" >/dev/null || log "some modules did not compile"
    rm -rf "$root/dev"
    compiled=yes
    log "byte-compiled in $(since "$t1")"
  fi
  t1="$(now)"
  if [ -n "$compiled" ]; then
    import_rootfs "$root" "$PYTHON_IMAGE" "$content" /usr/local/bin:/usr/bin:/bin python3
    log "imported in $(since "$t1")"
  else
    # Not root (no chroot): compile inside a container and commit the result under the name.
    local tmp=cq-test/python-build:tmp box=cq-test-images-compile old
    old="$(image_id "$PYTHON_IMAGE")"
    import_rootfs "$root" "$tmp" "$content" /usr/local/bin:/usr/bin:/bin python3
    log "imported in $(since "$t1")"
    t1="$(now)"
    docker rm -f "$box" >/dev/null 2>&1 || true
    docker run --name "$box" "$tmp" sh -c "$COMPILE" >/dev/null || log "some modules did not compile"
    docker commit -c 'CMD ["python3"]' "$box" "$PYTHON_IMAGE" >/dev/null
    docker rm "$box" >/dev/null
    docker rmi "$tmp" >/dev/null
    drop_replaced "$old" "$PYTHON_IMAGE"
    log "byte-compiled in a container in $(since "$t1")"
  fi
  log "built $PYTHON_IMAGE ($(du -sh "$root" | cut -f1)) in $(since "$t0")"
}

command -v docker >/dev/null && docker info >/dev/null 2>&1 || {
  log "no Docker engine answers: run scripts/docker.sh first"
  exit 1
}
T0="$(now)"
build_busybox
build_python
log "done in $(since "$T0")"
