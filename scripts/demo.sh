#!/usr/bin/env bash
# The demo: builds a simulated two-host cluster on this machine (network namespaces joined by a
# link, a VXLAN overlay, three containers), starts Freeflow on both hosts with one shared
# registry, shows containers attaching through their host's router (and a stranger refused),
# kills a router to show supervision, runs the ring and idle measurements and the TCP comparison
# (host link, overlay, Freeflow), and removes everything it made, also on Ctrl-C or failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/demo.sh builds network namespaces; run as root (sudo -E scripts/demo.sh)" >&2
  exit 1
fi
packages=(iproute2 iputils-ping procps python3)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building (release)"
cargo build --release --workspace --quiet
bin=$PWD/target/release
ff=$bin/freeflow
bench=$bin/freeflow-bench

tag="demo$((RANDOM % 1000))"
work=$(mktemp -d /tmp/freeflow-demo.XXXXXX)
cleanup() {
  set +e
  step "cleaning up"
  for h in 0 1; do
    [ -d "$work/h$h" ] && ip netns exec "ff-$tag-h$h" "$ff" down --dir "$work/h$h" >/dev/null 2>&1
  done
  "$ff" cluster down --tag "$tag" >/dev/null 2>&1
  rm -rf "$work"
  echo "removed cluster $tag and $work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "simulated cluster $tag: two hosts (192.168.1.1, 192.168.1.2) joined by a link, VXLAN overlay 10.32.0.0/12"
"$ff" cluster up --tag "$tag" --hosts 2 \
  --container web:0:10.32.0.2 --container cache:0:10.32.0.3 --container db:1:10.32.0.4 >/dev/null
ip netns list | grep "ff-$tag" | sed 's/ (id.*//' | sort | sed 's/^/  namespace /'

step "freeflow up on both hosts (one shared registry)"
for h in 0 1; do
  ip netns exec "ff-$tag-h$h" "$ff" up --dir "$work/h$h" --host-ip "192.168.1.$((h + 1))" \
    --vnet-prefix 10.32.0.0/12 --registry "file:$work/registry.json"
done

step "registering the containers"
ip netns exec "ff-$tag-h0" "$ff" container add web --dir "$work/h0" --netns "/run/netns/ff-$tag-c-web" --ip 10.32.0.2 --tenant blue
ip netns exec "ff-$tag-h0" "$ff" container add cache --dir "$work/h0" --netns "/run/netns/ff-$tag-c-cache" --ip 10.32.0.3 --tenant blue
ip netns exec "ff-$tag-h1" "$ff" container add db --dir "$work/h1" --netns "/run/netns/ff-$tag-c-db" --ip 10.32.0.4 --tenant blue
"$ff" container ls --dir "$work/h0"
sleep 0.5

step "each container attaches to its own host's router through shared memory"
ip netns exec "ff-$tag-c-web" "$bench" probe "$work/h0" --samples 20000
ip netns exec "ff-$tag-c-cache" "$bench" probe "$work/h0" --samples 20000
ip netns exec "ff-$tag-c-db" "$bench" probe "$work/h1" --samples 20000
echo "a process in host 1's own namespace (not a registered container) tries the same:"
ip netns exec "ff-$tag-h1" "$bench" probe "$work/h1" --samples 10 2>&1 | sed 's/^/  /' || true

step "supervision: kill -9 host 0's router"
old=$("$ff" status --dir "$work/h0" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["router"]["pid"])')
start=$(date +%s%N)
kill -9 "$old"
for _ in $(seq 1 500); do
  new=$("$ff" status --dir "$work/h0" --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["router"]["pid"] if d["router"]["running"] else "")' 2>/dev/null || true)
  if [ -n "$new" ] && [ "$new" != "$old" ]; then break; fi
  sleep 0.01
done
echo "router $old killed; router $new ready after $(( ($(date +%s%N) - start) / 1000000 )) ms"
ip netns exec "ff-$tag-c-web" "$bench" probe "$work/h0" --samples 20000
"$ff" status --dir "$work/h0"

step "ring: request to a router shard and back, and batched one-way throughput (pinned cores)"
"$bench" ring --reps 3 --samples 100000 --messages 10000000

step "idle: 50 attached containers that do nothing"
"$bench" idle --containers 50 --seconds 5

step "TCP between two simulated hosts: host link vs overlay vs Freeflow (libfsocket.so), side by side"
"$bench" tcp --reps 3 --seconds 1 --samples 10000 --setups 500

step "done"
echo "TCP mode: the data path runs on the host network (see the table); connection setup is not"
echo "yet within 1.5x of a host connect, and RDMA mode is not built yet: see README.md"
