#!/usr/bin/env bash
# Runs the end-to-end suites against the local environment and tears it down afterwards,
# also when a test or the start fails. Two phases, one environment each:
#  1. every suite in tests/tests/ except bare_*.rs and serial_*.rs, in parallel, on nodes
#     whose berth-nodeproxy the harness runs; then, in the same environment, each
#     serial_*.rs suite on its own with one test thread (they disrupt what others use,
#     e.g. restart LocalStack);
#  2. the bare_*.rs suites, on nodes without node agents (they install berth's own, e.g.
#     through the Helm chart's DaemonSet).
# E2E_TESTS="pool l2" runs only the named suites (in their phases), for development.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "e2e: needs root (network namespaces, nftables, veths); run make test as root" >&2
  exit 1
fi
env=${CARGO_TARGET_DIR:-target}/debug/berth-env
# The chart's berth pods run from the images (the debug build; a no-op when unchanged).
PROFILE=debug hack/images.sh
# One local environment per machine: runs from several checkouts wait for each other.
exec 9>"${TMPDIR:-/tmp}/berth-e2e.lock"
flock 9
# The LocalStack venv is shared by every checkout: install this one's extension (a no-op
# when it is already there) while holding the lock, so no other run swaps it meanwhile.
hack/setup-localstack.sh
cargo test -p berth-e2e --tests --no-run
trap '"$env" down' EXIT

with_agents=() serial=() bare=()
for f in tests/tests/*.rs; do
  name=$(basename "$f" .rs)
  if [ -n "${E2E_TESTS:-}" ] && [[ " $E2E_TESTS " != *" $name "* ]]; then continue; fi
  case "$name" in
    bare_*) bare+=(--test "$name") ;;
    serial_*) serial+=("$name") ;;
    *) with_agents+=(--test "$name") ;;
  esac
done
threads=(--test-threads="${E2E_THREADS:-4}")

status=0
if [ ${#with_agents[@]} -gt 0 ] || [ ${#serial[@]} -gt 0 ]; then
  "$env" up
  if [ ${#with_agents[@]} -gt 0 ]; then
    cargo test -p berth-e2e "${with_agents[@]}" --no-fail-fast -- "${threads[@]}" || status=$?
  fi
  for name in ${serial[@]+"${serial[@]}"}; do
    cargo test -p berth-e2e --test "$name" -- --test-threads=1 || status=$?
  done
  "$env" down
fi
if [ ${#bare[@]} -gt 0 ]; then
  BERTH_E2E_NODEPROXY=0 BERTH_E2E_LOG_DIR=target/e2e-logs/bare "$env" up
  cargo test -p berth-e2e "${bare[@]}" --no-fail-fast -- "${threads[@]}" || status=$?
fi
exit "$status"
