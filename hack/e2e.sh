#!/usr/bin/env bash
# Runs the end-to-end suites against one local environment for the whole run, and tears
# it down afterwards, also when a test or the start fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "e2e: needs root (network namespaces, nftables, veths); run make test as root" >&2
  exit 1
fi
env=${CARGO_TARGET_DIR:-target}/debug/berth-env
# One local environment per machine: runs from several checkouts wait for each other.
exec 9>"${TMPDIR:-/tmp}/berth-e2e.lock"
flock 9
cargo test -p berth-e2e --tests --no-run
trap '"$env" down' EXIT
"$env" up
cargo test -p berth-e2e --tests --no-fail-fast -- --test-threads="${E2E_THREADS:-4}"
