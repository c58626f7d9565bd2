#!/usr/bin/env bash
# The controller's benchmark figures on one local environment (started and torn down
# here); merges them into target/bench/results.json. Arguments go to the benchmark
# (`--aws-limits`: under AWS's request rate limits).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench-controller: needs root (the local environment)" >&2
  exit 1
fi
env=${CARGO_TARGET_DIR:-target}/debug/berth-env
exec 9>"${TMPDIR:-/tmp}/berth-e2e.lock"
flock 9
# The LocalStack venv is shared by every checkout: install this one's extension (a no-op
# when it is already there) while holding the lock, so no other run swaps it meanwhile.
hack/setup-localstack.sh
cargo build -p berth-e2e -p berth-controller --bins
trap '"$env" down' EXIT
"$env" up
${CARGO_TARGET_DIR:-target}/debug/berth-bench-controller "$@"
