#!/usr/bin/env bash
# berth-nodeproxy against kube-proxy (nftables mode; the pinned release and the newest,
# see hack/versions.env) through the local environment's real apiserver, one proxy at a
# time on one node. Merges compare.* into target/bench/results.json and writes the plot
# target/bench/proxies.svg. BENCH_PROXIES_SCALES=1000,5000,10000 adds the 10k run
# (default 1000,5000); BENCH_PROXIES_CHANGES sets the programming-latency changes (50).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench-proxies: needs root (the local environment)" >&2
  exit 1
fi
target=${CARGO_TARGET_DIR:-target}
env=$target/debug/berth-env
# Outside the lock: the two kube-proxy builds (cached after the first run) and berth's
# release build.
hack/build-binaries.sh kube-proxy
cargo build --release -p berth-nodeproxy --bin berth-nodeproxy
cargo build -p berth-e2e --bins
exec 9>"${TMPDIR:-/tmp}/berth-e2e.lock"
flock 9
hack/setup-localstack.sh
trap '"$env" down' EXIT
# No harness agents: the bench runs each proxy itself on the first node.
BERTH_E2E_NODEPROXY=0 "$env" up
# Inside the client namespace: every probe is traffic from outside the node.
ip netns exec berth-client "$target/debug/berth-bench-proxies"
