#!/usr/bin/env bash
# Build segadapt's CPU image with no registry: a Debian 12 base image from a local debootstrap root
# filesystem, then Dockerfile.cpu installed offline from containers/wheelhouse/.
#
# Usage: containers/build.sh [--lock] [--wheelhouse-only]
#   --lock             first rewrite requirements.lock (the repository's one lock) from the current environment
#   --wheelhouse-only  fill containers/wheelhouse/ (needed by both Dockerfiles) and stop
# Environment: DOCKER_HOST (daemon to use), IMAGE (default segadapt:cpu), BASE_IMAGE (default
# segadapt-base:bookworm), SEGADAPT_CACHE (rootfs cache, default ~/.cache/segadapt), DEBIAN_MIRROR,
# PYTHON (interpreter whose pip fills the wheelhouse, default python3).
# Making the base needs root (debootstrap); it is made once per cache and reused.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PYTHON=${PYTHON:-python3}
IMAGE=${IMAGE:-segadapt:cpu}
BASE_IMAGE=${BASE_IMAGE:-segadapt-base:bookworm}
CACHE=${SEGADAPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/segadapt}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
ROOTFS_TAR=$CACHE/debian-$SUITE-python3.11-rootfs.tar
LOCK=$REPO/requirements.lock
WHEELHOUSE=$HERE/wheelhouse
# The CPU build of torch lives on PyTorch's own index; the default PyPI wheel is the CUDA one.
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

log() { printf 'build.sh: %s\n' "$*" >&2; }

write_lock() {
  # The one lock of the project (README, CI, envs/ and both images install with it), rewritten from
  # the current environment: the closure of pyproject.toml's dependencies and extras, pinned exactly.
  "$PYTHON" "$REPO/tools/write_lock.py"
}

fill_wheelhouse() {
  # Rebuilt from scratch when the lock changes, so no stale version can be picked up.
  local stamp=$WHEELHOUSE/.lock.sha256 want
  want=$(sha256sum "$LOCK" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "filling $WHEELHOUSE from $LOCK"
    rm -rf "$WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    local torch
    torch=$(grep -E '^torch==' "$LOCK" | cut -d= -f3)
    grep -vE '^(#|torch==)' "$LOCK" > "$WHEELHOUSE/.deps.txt"
    # pip wheel: takes published wheels as they are and builds the few sdist-only packages
    "$PYTHON" -m pip wheel --quiet --no-deps -r "$WHEELHOUSE/.deps.txt" -w "$WHEELHOUSE"
    "$PYTHON" -m pip download --quiet --no-deps --retries 1 --extra-index-url "$TORCH_CPU_INDEX" \
      "torch==$torch+cpu" -d "$WHEELHOUSE"
    rm "$WHEELHOUSE/.deps.txt"
    echo "$want" > "$stamp"
  fi
  cp "$LOCK" "$WHEELHOUSE/requirements.lock"
  # segadapt itself, from a copy of the sources so the checkout gains no build/ or egg-info
  local src
  src=$(mktemp -d)
  cp "$REPO/pyproject.toml" "$REPO/README.md" "$src/"
  tar -C "$REPO" --exclude=__pycache__ -cf - stages | tar -C "$src" -xf -
  rm -f "$WHEELHOUSE"/segadapt-*.whl
  "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation "$src" -w "$WHEELHOUSE"
  rm -rf "$src"
  log "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

make_rootfs() {
  # Debian 12 minbase + python3.11 (nothing else: the venv gets pip from the wheelhouse).
  [ "$(id -u)" -eq 0 ] || { log "debootstrap needs root to make $ROOTFS_TAR"; exit 1; }
  command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install debootstrap"; exit 1; }
  local root
  mkdir -p "$CACHE"
  root=$(mktemp -d)
  log "debootstrap $SUITE from $MIRROR"
  debootstrap --variant=minbase --include=python3.11 "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -rf "$root" "$root.log"; exit 1; }
  chroot "$root" dpkg-query -W -f '${Package}=${Version}\n' > "$ROOTFS_TAR.packages.tmp"
  # package caches and docs: not needed to run, a third of the size
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/debootstrap "$root"/var/log/*.log
  tar --numeric-owner --sort=name -C "$root" -cf "$ROOTFS_TAR.tmp" .
  rm -rf "$root" "$root.log"
  mv "$ROOTFS_TAR.packages.tmp" "$ROOTFS_TAR.packages"
  mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
}

make_base() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE present"
    return
  fi
  [ -f "$ROOTFS_TAR" ] || make_rootfs
  local sha
  sha=$(sha256sum "$ROOTFS_TAR" | cut -d' ' -f1)
  log "importing $ROOTFS_TAR (sha256 $sha) as $BASE_IMAGE"
  docker import --change "LABEL org.segadapt.rootfs.sha256=$sha org.segadapt.rootfs.suite=$SUITE" \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
}

main() {
  local lock=0 wheelhouse_only=0
  for arg in "$@"; do
    case $arg in
      --lock) lock=1 ;;
      --wheelhouse-only) wheelhouse_only=1 ;;
      -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
      *) log "unknown argument: $arg"; exit 2 ;;
    esac
  done
  [ "$lock" -eq 1 ] && write_lock
  fill_wheelhouse
  [ "$wheelhouse_only" -eq 1 ] && return
  make_base
  log "building $IMAGE"
  docker build --pull=false -f "$HERE/Dockerfile.cpu" -t "$IMAGE" "$HERE"
}

main "$@"
