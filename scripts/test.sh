#!/usr/bin/env bash
# Every check CI runs, from a fresh Debian 12 machine with a Rust toolchain: installs the Debian
# packages the tests use, then formatting, lints, the build, all tests (as root: they build
# network namespaces), the loom model of the ring and a bounded run of every fuzz target.
# `scripts/test.sh fuzz` runs only the fuzz step (see fuzz_step below).
set -euo pipefail
cd "$(dirname "$0")/.."

# The fuzz targets of fuzz/ (cargo-fuzz, nightly), each for FUZZ_SECONDS (default 15) from the
# committed corpus, with debug assertions and overflow checks; a crash fails the step and leaves
# its input in fuzz/artifacts/<target>/. New inputs go to a temporary directory, so the
# committed corpus only changes by hand. Prints the executions and coverage of each target.
fuzz_step() {
  local seconds="${FUZZ_SECONDS:-15}"
  if ! command -v rustup >/dev/null 2>&1; then
    echo "scripts/test.sh: the fuzz step needs rustup to get the nightly toolchain" >&2
    return 1
  fi
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal
  fi
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
  fi
  # Safe Rust decoders: AddressSanitizer would find nothing the assertions miss, and costs
  # build time and executions.
  local flags=(--sanitizer none --debug-assertions)
  echo "== cargo fuzz build"
  (cd fuzz && cargo +nightly fuzz build "${flags[@]}")
  local work failed=()
  work="$(mktemp -d)"
  local targets t log
  targets="$(cd fuzz && cargo +nightly fuzz list)"
  if [ -z "$targets" ]; then
    echo "scripts/test.sh: cargo fuzz list found no fuzz target" >&2
    return 1
  fi
  for t in $targets; do
    mkdir -p "$work/$t" "fuzz/artifacts/$t"
    log="$work/$t.log"
    if ! (cd fuzz && cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
      -artifact_prefix="artifacts/$t/") >"$log" 2>&1; then
      tail -n 40 "$log"
      echo "== fuzz target $t FAILED; its input is in fuzz/artifacts/$t/ (replay:" \
        "cd fuzz && cargo +nightly fuzz run $t artifacts/$t/<file>)"
      failed+=("$t")
    fi
    # The last status line ("#N DONE cov: C ft: F corp: ...") and the final stats.
    printf '== fuzz %-16s execs %-9s %s\n' "$t" \
      "$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")" \
      "$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$log" | tail -n 1 |
        grep -oE '(cov|ft|corp|exec/s): [^ ]+' | tr '\n' ' ')"
  done
  rm -rf "$work"
  if [ "${#failed[@]}" -gt 0 ]; then
    echo "scripts/test.sh: fuzz targets crashed: ${failed[*]}" >&2
    return 1
  fi
}

if [ "${1:-}" = fuzz ]; then
  fuzz_step
  exit
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the tests build network namespaces; run as root (sudo -E scripts/test.sh)" >&2
  exit 1
fi

# Debian packages: ip/bridge (iproute2), ping (iputils-ping), ps/kill (procps), python3 for the
# shim's preload and TCP-mode tests, iperf3, redis-server and redis-tools (unmodified programs
# through the shim), ibverbs-utils (ibv_devices, ibv_devinfo, ibv_rc_pingpong through the verbs
# library), libibverbs-dev (the verbs headers its ABI is checked against), strace (the RDMA
# fast path is checked to make no system call), perftest (ib_write_lat, ib_send_bw, ...
# through the verbs library), and gcc with libc6-dev (the tests' C probes and freeflow-bench
# rdma's measuring program; a Rust toolchain usually brings them, as its linker), nginx, postgresql
# and curl (unmodified servers and clients of the TCP-mode server tests), libfabric-bin, ucx-utils
# and python3-pyverbs (fi_info, ucx_info and pyverbs' modules load the provider stand-ins;
# python3-pyverbs also ships rdma-core's own test suite, which e2e/tests/verbs_pyverbs.rs runs),
# prometheus (promtool checks the metrics), containernetworking-plugins (bridge and host-local in
# /usr/lib/cni, the chain the CNI plugin test runs freeflow-cni in), docker.io (dockerd and its
# CLI: the Docker test runs one engine per simulated host and builds its images offline with
# scripts/docker-image.sh, which uses tar, ldd and binutils' objcopy), etcd-server (the etcd
# registry tests start their own etcd; the packaged service is not used), rdmacm-utils (rping,
# ucmatose, rdma_server/rdma_client, cmtime through Freeflow's librdmacm), librdmacm1 (Debian's
# library, whose symbols ours must all export) and librdmacm-dev (the rdma_cm headers of the C
# probe), libclang-dev and pkg-config (the router's hardware backend, feature rdma-hw: rdma-sys
# runs bindgen over the verbs and rdma_cm headers and finds libibverbs and librdmacm with
# pkg-config).
packages=(iproute2 iputils-ping procps python3 iperf3 redis-server redis-tools ibverbs-utils libibverbs-dev strace perftest gcc libc6-dev nginx postgresql curl libfabric-bin ucx-utils python3-pyverbs prometheus containernetworking-plugins iptables docker.io etcd-server rdmacm-utils librdmacm1 librdmacm-dev libclang-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # redis-server's (and nginx's, postgresql's) postinst starts the system service and fails the install if that fails (no
  # init system in a container, port 6379 taken). The tests start their own redis-server in a
  # container namespace, so forbid service starts for the install: invoke-rc.d and
  # deb-systemd-invoke ask policy-rc.d, and 101 means "action forbidden". Docker images already
  # have one; leave an existing file alone.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ "$own_policy" -eq 1 ]; then
    rm -f "$policy"
    trap - EXIT
  fi
fi
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$c"
  fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (the CLI and shim tests use the built binaries and libraries)"
cargo build --workspace
# The router with the hardware backend, in a target directory of its own (the default router
# must neither link nor load libibverbs): its lints, its unit tests, and the binary that
# e2e/tests/verbs_nic.rs runs on Freeflow's own device.
echo "== the router's hardware backend (feature rdma-hw): clippy, unit tests, build"
CARGO_TARGET_DIR=target/rdma-hw cargo clippy -p freeflow-dataplane --features rdma-hw --all-targets -- -D warnings
CARGO_TARGET_DIR=target/rdma-hw cargo test -p freeflow-dataplane --features rdma-hw --bin freeflow-router
CARGO_TARGET_DIR=target/rdma-hw cargo build -p freeflow-dataplane --features rdma-hw
echo "== cargo test"
cargo test --workspace
echo "== loom model of the ring"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p freeflow-proto --test loom_ring --release
echo "== fuzzing"
fuzz_step
echo "== all checks passed"
