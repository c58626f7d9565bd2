#!/usr/bin/env bash
# berth against MetalLB on one local environment (started and torn down here, with its
# node agents, which proxy the traffic for both); merges bare.* and compare.metallb.*
# into target/bench/results.json. BENCH_METALLB_SERVICES sets the Service count (500).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench-metallb: needs root (the local environment)" >&2
  exit 1
fi
target=${CARGO_TARGET_DIR:-target}
env=$target/debug/berth-env
# Outside the lock: MetalLB's build (cached after the first run) and berth's.
hack/build-binaries.sh metallb
cargo build -p berth-e2e -p berth-nodeproxy -p berth-controller --bins
exec 9>"${TMPDIR:-/tmp}/berth-e2e.lock"
flock 9
hack/setup-localstack.sh
trap '"$env" down' EXIT
"$env" up
"$target/debug/berth-bench-metallb"
