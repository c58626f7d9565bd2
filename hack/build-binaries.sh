#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and helm
# from Go modules and caches them by version under ${BERTH_CACHE:-~/.cache/berth}/bin.
# Idempotent: a binary already cached for its version is not rebuilt.
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
  local v="v$KUBE_VERSION" major=${KUBE_VERSION%%.*} rest=${KUBE_VERSION#*.}
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
