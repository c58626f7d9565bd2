#!/usr/bin/env bash
# Installs the Debian packages berth's local environment needs. Idempotent.
set -euo pipefail
pkgs=(nftables iproute2 conntrack openssl socat tcpdump curl jq ca-certificates python3-venv)
pkgs+=(prometheus)  # monitoring e2e: a real Prometheus scrapes the cluster and evaluates the chart's alerts
pkgs+=(mmdebstrap umoci crun binutils) # make images; the local cluster runs berth's pods from them
pkgs+=(frr gobgpd) # BGP e2e: real routers (FRR bgpd + zebra, GoBGP) peer with the node agents
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install-deps] installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! rustup component list --installed 2>/dev/null | grep -q clippy; then rustup component add clippy rustfmt; fi
echo "[install-deps] system packages ready" >&2
