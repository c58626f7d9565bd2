#!/usr/bin/env bash
# The demo on the running local cluster (started by `make up`): the seed's nginx
# Deployment on the simulated nodes. The cluster stays up for exploration.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/versions.env
export KUBECONFIG=target/e2e/kubeconfig
bin=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}/bin/current
export PATH="$bin:$PATH"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Apply the seed's nginx Deployment (3 replicas)"
kubectl apply -f examples/seed/nginx-deployment.yaml
kubectl rollout status deployment/nginx-deployment --timeout=90s

step "Nodes and pods: each pod runs in its own network namespace on a simulated node"
kubectl get nodes,pods -o wide

step "A pod answers at its pod IP from another node's namespace"
ip=$(kubectl get pods -l app=nginx -o jsonpath='{.items[0].status.podIP}')
node=$(kubectl get pods -l app=nginx -o jsonpath='{.items[0].spec.nodeName}')
other=$(kubectl get nodes -o jsonpath='{.items[*].metadata.name}' | tr ' ' '\n' | grep -vx "$node" | head -1)
echo "+ ip netns exec $other curl -s http://$ip/ | grep title"
ip netns exec "$other" curl -s --max-time 5 "http://$ip/" | grep title

cat <<TXT

The cluster stays up. Explore it with:
  export KUBECONFIG=$PWD/$KUBECONFIG PATH=$bin:\$PATH
  kubectl get all -A
  ip netns exec berth-client ping -c1 198.18.1.10            # the outside world reaches nodes
  ip netns exec berth-node-1 curl http://<pod-ip>/             # from a node
Stop it with: make down
TXT
