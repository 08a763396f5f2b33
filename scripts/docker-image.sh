#!/usr/bin/env bash
# Builds Docker images offline (no image registry needed), from files on this machine:
#
#   scripts/docker-image.sh freeflow [--bin-dir DIR] [--tag TAG]
#       The Freeflow router image (default tag freeflow:tcp): the same paths, environment,
#       health check and entry point as docker/Dockerfile, on a root filesystem made of the
#       built workspace's binaries and shims (DIR, default target/release), `ip` (iproute2) and
#       the libraries they link, imported with `docker import`, then docker/offline.Dockerfile
#       on top of it.
#   scripts/docker-image.sh programs --tag TAG PROGRAM...
#       An application image of unmodified Debian programs (e.g. iperf3) with their libraries
#       and libgcc_s (which every Debian image has and the shim links), and /tmp.
#
# Why a root filesystem of copied files rather than debootstrap/mmdebstrap: it needs no
# network and takes seconds, so CI time stays bounded; the programs are the machine's own
# Debian binaries either way. Images are cached by content: the root filesystem is a tar with
# fixed order, times and owners, and an image whose label freeflow.rootfs holds the tar's
# sha256 is not imported again.
#
# The docker CLI is $DOCKER (default: docker) and honours $DOCKER_HOST, so one script serves
# several engines (the e2e test runs one per simulated host). Prints the image's tag at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

docker_cli="${DOCKER:-docker}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

die() {
  echo "scripts/docker-image.sh: $*" >&2
  exit 1
}

# copy_libraries ROOT FILE: every library ldd names for FILE into ROOT, at the paths ldd prints
# (the loader included).
copy_libraries() {
  local root="$1" f="$2" lib
  # ldd's lines: "name => /path (addr)", "/path (addr)", or "linux-vdso.so.1 (addr)".
  while read -r lib; do
    [ -n "$lib" ] || continue
    if [ ! -e "$root$lib" ]; then
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    fi
  done < <(ldd "$f" 2>/dev/null | sed -nE 's/.*=> (\/[^ ]+) .*/\1/p; s/^[[:space:]]*(\/[^ ]+) .*/\1/p')
}

# copy_with_libraries ROOT FILE...: each FILE into ROOT at the same path, with its libraries.
copy_with_libraries() {
  local root="$1" f
  shift
  for f in "$@"; do
    [ -e "$f" ] || die "$f does not exist"
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
    copy_libraries "$root" "$f"
  done
}

# import_rootfs ROOT TAG [CHANGE...]: imports ROOT as TAG unless TAG already holds the same
# content (label freeflow.rootfs = sha256 of the deterministic tar).
import_rootfs() {
  local root="$1" tag="$2"
  shift 2
  local tarball hash have
  tarball="$work/rootfs.tar"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$tarball" .
  hash="$(sha256sum "$tarball" | cut -c1-64)"
  have="$("$docker_cli" image inspect -f '{{index .Config.Labels "freeflow.rootfs"}}' "$tag" 2>/dev/null || true)"
  if [ "$have" = "$hash" ]; then
    echo "== $tag: root filesystem unchanged (sha256 ${hash:0:12}), not imported again" >&2
  else
    echo "== importing $tag ($(du -h "$tarball" | cut -f1), sha256 ${hash:0:12})" >&2
    local changes=(--change "LABEL freeflow.rootfs=$hash")
    local c
    for c in "$@"; do changes+=(--change "$c"); done
    "$docker_cli" import "${changes[@]}" "$tarball" "$tag" >/dev/null
  fi
}

base_dirs() {
  local root="$1"
  mkdir -p "$root/tmp" "$root/etc" "$root/run" "$root/proc" "$root/sys" "$root/dev"
  chmod 1777 "$root/tmp"
}

build_freeflow() {
  local bin_dir=target/release tag=freeflow:tcp
  while [ $# -gt 0 ]; do
    case "$1" in
      --bin-dir) bin_dir="$2"; shift 2 ;;
      --tag) tag="$2"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  local files=(freeflow freeflow-router freeflow-cni libfsocket.so libibverbs.so librdmacm.so libfreeflow_providers.so)
  local f
  for f in "${files[@]}"; do
    [ -f "$bin_dir/$f" ] || die "$bin_dir/$f missing: build the workspace first (cargo build --release --workspace)"
  done
  command -v ip >/dev/null || die "ip (iproute2) is not installed"
  local root="$work/root"
  base_dirs "$root"
  copy_with_libraries "$root" "$(command -v ip)"
  # `ip` is looked up on PATH; Debian's is /usr/sbin/ip (or /sbin/ip before merged /usr).
  mkdir -p "$root/usr/local/lib/freeflow" "$root/usr/local/bin"
  for f in "${files[@]}"; do
    cp -L "$bin_dir/$f" "$root/usr/local/lib/freeflow/$f"
    copy_libraries "$root" "$bin_dir/$f"
    # Debug information is most of a debug build's size and nothing the image needs.
    if command -v objcopy >/dev/null; then
      objcopy --strip-debug "$root/usr/local/lib/freeflow/$f"
    fi
  done
  ln -s ../lib/freeflow/freeflow "$root/usr/local/bin/freeflow"
  local base="freeflow-rootfs:latest"
  import_rootfs "$root" "$base" "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  echo "== building $tag from docker/offline.Dockerfile on $base" >&2
  "$docker_cli" build -q --build-arg "BASE=$base" -t "$tag" -f docker/offline.Dockerfile docker >/dev/null
  echo "$tag"
}

build_programs() {
  local tag=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --tag) tag="$2"; shift 2 ;;
      -*) die "unknown option $1" ;;
      *) break ;;
    esac
  done
  [ -n "$tag" ] || die "programs: --tag TAG is required"
  [ $# -gt 0 ] || die "programs: name at least one program"
  local root p paths=()
  for p in "$@"; do
    paths+=("$(command -v "$p")") || die "$p is not installed"
  done
  root="$work/root"
  base_dirs "$root"
  copy_with_libraries "$root" "${paths[@]}"
  local gcc_s
  gcc_s="$(ldconfig -p | sed -nE 's/.*libgcc_s\.so\.1 \(libc6,x86-64\) => (.*)/\1/p' | head -n 1)"
  [ -n "$gcc_s" ] || die "libgcc_s.so.1 not found"
  copy_with_libraries "$root" "$gcc_s"
  import_rootfs "$root" "$tag" "ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
  echo "$tag"
}

case "${1:-}" in
  freeflow) shift; build_freeflow "$@" ;;
  programs) shift; build_programs "$@" ;;
  *) die "usage: $0 freeflow [--bin-dir DIR] [--tag TAG] | programs --tag TAG PROGRAM..." ;;
esac
