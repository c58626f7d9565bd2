#!/usr/bin/env bash
# L2 announcement at 1,000 pool Services on one local environment (started and torn down
# here, with its node agents); merges the l2.* figures into target/bench/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench-l2: needs root (the local environment)" >&2
  exit 1
fi
env=${CARGO_TARGET_DIR:-target}/debug/berth-env
exec 9>"${TMPDIR:-/tmp}/berth-e2e.lock"
flock 9
hack/setup-localstack.sh
cargo build -p berth-e2e -p berth-nodeproxy --bins
trap '"$env" down' EXIT
"$env" up
${CARGO_TARGET_DIR:-target}/debug/berth-bench-l2
