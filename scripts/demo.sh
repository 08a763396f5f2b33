#!/usr/bin/env bash
# The demo from a fresh Debian machine: installs what it needs (iproute2; libibverbs-dev, gcc
# and libc6-dev for the RDMA part's measuring program, which `freeflow demo` would otherwise
# install itself), builds the workspace (release) and runs `freeflow demo` with the arguments
# given (--reps N, --seconds S, --json, --part P). The demo builds a simulated two-host cluster
# on this machine, starts Freeflow on both hosts, shows containers attaching and a stranger
# refused, runs the TCP comparison (host link, overlay, Freeflow) and the RDMA comparison (one
# host), and removes everything it made, also on Ctrl-C: see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/demo.sh builds network namespaces; run as root (sudo -E scripts/demo.sh)" >&2
  exit 1
fi
packages=(iproute2 libibverbs-dev gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "building (cargo build --release --workspace)" >&2
cargo build --release --workspace --quiet
exec "${CARGO_TARGET_DIR:-target}/release/freeflow" demo "$@"
