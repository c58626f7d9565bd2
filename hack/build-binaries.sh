#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and helm
# from Go modules and caches them by version under ${BERTH_CACHE:-~/.cache/berth}/bin.
# Idempotent: a binary already cached for its version is not rebuilt.
# `build-binaries.sh kube-proxy` builds only the two kube-proxy opponents of
# `make bench-proxies` (the pinned and the newest release, KUBE_PROXY_NEWEST_VERSION);
# `build-binaries.sh metallb` only MetalLB's controller and speaker (`make bench-metallb`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
kube_dir="$cache/bin/kubernetes-v$KUBE_VERSION"
etcd_dir="$cache/bin/etcd-v$ETCD_VERSION"
helm_dir="$cache/bin/helm-v$HELM_VERSION"
command -v go >/dev/null 2>&1 || export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null 2>&1 || { echo "[build-binaries] Go >= 1.26 is required" >&2; exit 1; }
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local

log() { printf '[build-binaries] %s\n' "$*" >&2; }

kube_ldflags() {
  local version=${1:-$KUBE_VERSION}
  local v="v$version" major=${version%%.*} rest=${version#*.}
  local minor=${rest%%.*} date
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=release-$v -X $pkg.buildDate=$date"
  done
  printf '%s' "$flags"
}

build_kube() {
  local missing=()
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [ -x "$kube_dir/$c" ] || missing+=("$c")
  done
  [ ${#missing[@]} -eq 0 ] && { log "kubernetes v$KUBE_VERSION cached in $kube_dir"; return; }
  log "building ${missing[*]} v$KUBE_VERSION (cold: 10-25 min)"
  mkdir -p "$kube_dir.tmp"
  local pkgs=()
  for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  (cd "$here/gobin/kubernetes" &&
    go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$(kube_ldflags)" \
      -o "$kube_dir.tmp/" "${pkgs[@]}")
  mkdir -p "$kube_dir"
  mv "$kube_dir.tmp"/* "$kube_dir/" && rmdir "$kube_dir.tmp"
}

build_etcd() {
  [ -x "$etcd_dir/etcd" ] && { log "etcd v$ETCD_VERSION cached in $etcd_dir"; return; }
  log "building etcd v$ETCD_VERSION"
  mkdir -p "$etcd_dir"
  (cd "$here/gobin/etcd" &&
    go build -trimpath -ldflags "-s -w" -o "$etcd_dir/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$etcd_dir/etcd.tmp" "$etcd_dir/etcd"
}

build_helm() {
  [ -x "$helm_dir/helm" ] && { log "helm v$HELM_VERSION cached in $helm_dir"; return; }
  log "building helm v$HELM_VERSION"
  mkdir -p "$helm_dir"
  GOBIN="$helm_dir" go install -trimpath -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION"
}

# kube-proxy of `version` into its own directory: the pinned one from the helper module,
# any other from a module generated here that replaces every staging module the
# k8s.io/kubernetes go.mod points into ./staging/src with its published v0.x release.
build_kube_proxy() {
  local version=$1 dir="$cache/bin/kube-proxy-v$1"
  [ -x "$dir/kube-proxy" ] && { log "kube-proxy v$version cached in $dir"; return; }
  log "building kube-proxy v$version"
  mkdir -p "$dir"
  local src="$here/gobin/kubernetes"
  if [ "$version" != "$KUBE_VERSION" ]; then
    src="$cache/gobin/kube-proxy-v$version"
    mkdir -p "$src"
    local gomod staging
    gomod=$(cd "$src" && GOFLAGS= go mod download -json "k8s.io/kubernetes@v$version" |
      sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    staging=$(sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*|\1|p' "$gomod")
    {
      printf 'module berth.dev/hack/kube-proxy\n\ngo 1.26.0\n\n'
      # A module without code: the tool directive keeps its require of k8s.io/kubernetes
      # at `version` (else a tidy drops it and a build resolves the newest release).
      printf 'tool k8s.io/kubernetes/cmd/kube-proxy\n\n'
      printf 'require k8s.io/kubernetes v%s\n\nreplace (\n' "$version"
      for m in $staging; do printf '\t%s => %s v0.%s\n' "$m" "$m" "${version#*.}"; done
      printf ')\n'
    } >"$src/go.mod"
  fi
  (cd "$src" &&
    go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "$(kube_ldflags "$version")" \
      -o "$dir/kube-proxy.tmp" k8s.io/kubernetes/cmd/kube-proxy)
  mv "$dir/kube-proxy.tmp" "$dir/kube-proxy"
}

# MetalLB's controller and speaker from the helper module, plus its CRD manifests (the
# module's config/crd) which `make bench-metallb` applies. Built in a copy of the module
# next to a patched frr-k8s (see the replace in hack/gobin/metallb/go.mod).
build_metallb() {
  local dir="$cache/bin/metallb-v$METALLB_VERSION" src="$cache/gobin/metallb-v$METALLB_VERSION"
  [ -x "$dir/controller" ] && [ -x "$dir/speaker" ] && [ -d "$dir/crd" ] &&
    { log "metallb v$METALLB_VERSION cached in $dir"; return; }
  log "building metallb v$METALLB_VERSION"
  rm -rf "$src" && mkdir -p "$src"
  cp "$here/gobin/metallb/go.mod" "$here/gobin/metallb/go.sum" "$src/"
  local frr
  frr=$(cd "$src" && GOFLAGS= go mod download -json github.com/metallb/frr-k8s@v0.0.21 |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  cp -r "$frr" "$src/frr-k8s" && chmod -R u+w "$src/frr-k8s"
  local api="$src/frr-k8s/api/v1beta1"
  sed -i 's|^\tPrefixesWithCommunity \[\]CommunityPrefixes .*|&\n\tPrefixesWithAsPathPrepend []AsPathPrependPrefixes `json:"withAsPathPrepend,omitempty"`|' \
    "$api/frrconfiguration_types.go"
  printf 'package v1beta1\n\ntype AsPathPrependPrefixes struct {\n\tAsPathPrepend uint8    `json:"asPathPrepend"`\n\tPrefixes      []string `json:"prefixes,omitempty"`\n}\n' \
    >"$api/zz_berth_aspathprepend.go"
  mkdir -p "$dir.tmp/crd"
  (cd "$src" &&
    go build -trimpath -ldflags "-s -w" -o "$dir.tmp/" \
      go.universe.tf/metallb/controller go.universe.tf/metallb/speaker)
  local mod
  mod=$(cd "$src" && go list -m -f '{{.Dir}}' go.universe.tf/metallb)
  cp "$mod"/config/crd/bases/*.yaml "$dir.tmp/crd/"
  chmod -R u+w "$dir.tmp"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

if [ "${1:-}" = metallb ]; then
  build_metallb
  exit 0
fi

if [ "${1:-}" = kube-proxy ]; then
  build_kube_proxy "$KUBE_VERSION"
  build_kube_proxy "$KUBE_PROXY_NEWEST_VERSION"
  exit 0
fi

build_etcd
build_helm
build_kube
# One directory the harness and the Makefile put first on PATH.
mkdir -p "$cache/bin/current"
for f in "$kube_dir"/* "$etcd_dir/etcd" "$helm_dir/helm"; do
  ln -sfn "$f" "$cache/bin/current/$(basename "$f")"
done
"$kube_dir/kube-apiserver" --version >&2
log "binaries ready in $cache/bin/current"
