# berth: the two set-up commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo
BERTH_CACHE ?= $(HOME)/.cache/berth
BIN := $(BERTH_CACHE)/bin/current
ENV := target/debug/berth-env
export PATH := $(BIN):$(HOME)/.cargo/bin:$(PATH)

.PHONY: deps build fmt-check lint unit e2e test up down demo clean-env bench bench-nodeproxy bench-controller bench-aws-limits bench-l2 bench-proxies bench-metallb images

## Everything a fresh machine needs: Debian packages, Kubernetes/etcd/helm binaries built
## from Go modules (cached by version), the pinned LocalStack venv.
deps:
	hack/install-deps.sh
	hack/build-binaries.sh
	hack/setup-localstack.sh

build:
	$(CARGO) build --workspace --bins

fmt-check:
	$(CARGO) fmt --all -- --check

lint: fmt-check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	helm lint charts/berth

unit:
	$(CARGO) test --workspace --lib --bins

## End-to-end suites on the real local cluster (needs root).
e2e: build
	hack/e2e.sh

test: deps lint unit e2e

## Start the local cluster in the background (control plane, LocalStack, 3 nodes).
up: deps build
	$(ENV) up

down:
	@if [ -x $(ENV) ]; then $(ENV) down; else echo "nothing to stop"; fi

## The main job on the local cluster (root): berth installed with Helm, the seed's nginx
## behind a pool address and an NLB in LocalStack. PROVIDER=pool|aws picks one.
demo: deps build
	hack/demo.sh

## Benchmarks (root); each prints a report and merges its keys into
## target/bench/results.json.
bench: bench-nodeproxy bench-controller bench-l2 bench-metallb

## Node agent (release build): full and incremental sync, peak memory, first-connection
## latency.
bench-nodeproxy:
	$(CARGO) build --release -p berth-nodeproxy --bin berth-nodeproxy-bench
	$${CARGO_TARGET_DIR:-target}/release/berth-nodeproxy-bench

## Controller: creation-to-ready latency and AWS calls per reconcile against LocalStack.
bench-controller: deps build
	hack/bench-controller.sh

## Controller under AWS's request rate limits (LocalStack's extension enforcing them): 200
## Services at once against the lower bound their calls and the limits imply, one Service
## alone, calls per new Service by API (aws.limits.* keys). BENCH_AWS_CLIENT=global: the
## controller without its per-API buckets, for comparison.
bench-aws-limits: deps build
	hack/bench-controller.sh --aws-limits

## L2 announcement at 1,000 pool Services: time to announce all, renewal lateness p50/p99,
## Leases lost by healthy nodes, failed probes while 980 are deleted at once (l2.* keys).
bench-l2: deps build
	hack/bench-l2.sh

## berth-nodeproxy against kube-proxy (pinned and newest release, nftables mode) through
## the real apiserver at 1k and 5k Services x 10 endpoints: sync time, network programming
## latency p50/p99, one new Service, CPU, peak RSS, first connection (compare.* keys and
## target/bench/proxies.svg). BENCH_PROXIES_SCALES=1000,5000,10000 adds 10k.
bench-proxies: deps build
	hack/bench-proxies.sh

## berth's pool addresses against MetalLB v0.16.2 (memberlist on, built from its Go
## module) on the same 500 Services, one at a time: time to allocate and announce all,
## addresses kept across a controller restart, L2 failover gap when the announcing agent
## is killed and when its node fails (bare.* and compare.metallb.* keys).
## BENCH_METALLB_SERVICES sets the count.
bench-metallb: deps build
	hack/bench-metallb.sh

## OCI images of the controller and the node agent (root; no Docker daemon): Debian
## bookworm root filesystems made with mmdebstrap, assembled with umoci into
## target/images/berth-{controller,nodeproxy}/, tagged <version>-<commit> and <version>.
## PROFILE=release (default) builds the binaries; PROFILE=debug packs the debug build
## (what `make test` and `make demo` run).
images:
	hack/install-deps.sh
	hack/images.sh
