#!/usr/bin/env bash
# The demo on the running local cluster (started by `make up`): the seed's nginx
# Deployment and Service on the simulated nodes, with berth-nodeproxy on every node
# doing kube-proxy's job. The cluster stays up for exploration.
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

step "Apply the seed's nginx-service: a ClusterIP that berth-nodeproxy programs on every node"
kubectl apply -f examples/seed/nginx-service.yaml
vip=$(kubectl get service nginx-service -o jsonpath='{.spec.clusterIP}')
for i in 1 2 3; do
  echo "+ ip netns exec berth-node-$i curl -s http://$vip/ | grep title"
  for try in $(seq 20); do
    ip netns exec "berth-node-$i" curl -s --max-time 2 "http://$vip/" | grep title && break
    sleep 0.25
  done
done

step "The seed's kubectl proxy URL (the apiserver's service proxy)"
kubectl proxy --port=8080 >/dev/null 2>&1 &
proxy=$!
trap 'kill $proxy 2>/dev/null' EXIT
for try in $(seq 20); do curl -s -o /dev/null localhost:8080/version && break; sleep 0.25; done
echo "+ curl http://localhost:8080/api/v1/namespaces/default/services/nginx-service/proxy/ | grep title"
curl -s http://localhost:8080/api/v1/namespaces/default/services/nginx-service/proxy/ | grep title

step "The same Service as NodePort: reachable from the outside world (namespace berth-client)"
kubectl patch service nginx-service -p '{"spec":{"type":"NodePort"}}' >/dev/null
np=$(kubectl get service nginx-service -o jsonpath='{.spec.ports[0].nodePort}')
for n in 198.18.1.10 198.18.2.10 198.18.3.10; do
  echo "+ ip netns exec berth-client curl -s http://$n:$np/ | grep title"
  for try in $(seq 20); do
    ip netns exec berth-client curl -s --max-time 2 "http://$n:$np/" | grep title && break
    sleep 0.25
  done
done

cat <<TXT

The cluster stays up. Explore it with:
  export KUBECONFIG=$PWD/$KUBECONFIG PATH=$bin:\$PATH
  kubectl get all -A
  ip netns exec berth-client curl http://198.18.1.10:$np/    # NodePort from the outside world
  ip netns exec berth-node-1 curl http://<pod-ip>/             # from a node
Stop it with: make down
TXT
