#!/usr/bin/env bash
# `make demo`: berth's whole job on the embedded local cluster, step by step.
#
# Starts the local cluster on nodes without any node agent, installs berth through its
# Helm chart (the controller and the node agent DaemonSet, both running from berth's own
# images), then walks the seed article's nginx example from ClusterIP to a load
# balancer: an address from a pool announced on the node network (PROVIDER=pool), and an
# AWS Network Load Balancer emulated by LocalStack (PROVIDER=aws). Default: both.
# The cluster stays up afterwards for exploration; `make down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/versions.env

provider=${PROVIDER:-both}
case "$provider" in
  pool | aws | both) ;;
  *) echo "demo: PROVIDER must be pool, aws or both (got '$provider')" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
  echo "demo: needs root (network namespaces, nftables, veths)" >&2
  exit 1
fi

cache=${BERTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
bin=$cache/bin/current
venv=$cache/localstack-venv-$LOCALSTACK_VERSION
env=${CARGO_TARGET_DIR:-target}/debug/berth-env
export KUBECONFIG=$PWD/target/e2e/kubeconfig
export PATH="$bin:$PATH"
system=berth-system
pool_range=198.19.0.240/28

bold=$'\033[1m' dim=$'\033[2m' off=$'\033[0m'
[ -t 1 ] || bold='' dim='' off=''
step_no=0
step() {
  step_no=$((step_no + 1))
  printf '\n%s==> %d. %s%s\n' "$bold" "$step_no" "$1" "$off"
  shift
  for line in "$@"; do printf '%s    %s%s\n' "$dim" "$line" "$off"; done
}
say() { for line in "$@"; do printf '%s    %s%s\n' "$dim" "$line" "$off"; done; }
run() {
  printf '+ %s\n' "$*"
  "$@"
}
# Retries a command (quietly) until it succeeds, then shows its output once.
eventually() {
  local tries=$1
  shift
  printf '+ %s\n' "$*" >&2
  for _ in $(seq "$tries"); do
    if out=$("$@" 2>&1); then
      printf '%s\n' "$out"
      return 0
    fi
    sleep 0.5
  done
  printf '%s\n' "$out"
  echo "demo: gave up waiting for: $*" >&2
  return 1
}
jsonpath() { kubectl get "$@" 2>/dev/null; }
# A non-empty jsonpath value, waited for.
wait_value() {
  local what=$1 tries=$2
  shift 2
  for _ in $(seq "$tries"); do
    v=$(jsonpath "$@" || true)
    if [ -n "$v" ]; then
      printf '%s' "$v"
      return 0
    fi
    sleep 0.5
  done
  echo "demo: no $what after $((tries / 2)) s" >&2
  kubectl describe service nginx-service >&2 || true
  return 1
}
title_from() { grep -o '<title>.*</title>'; }

step "Build berth's images" \
  "OCI images of the controller and the node agent from Debian packages (mmdebstrap," \
  "umoci; no Docker daemon) with the debug build, in target/images/. The chart's pods" \
  "run from them: unpacked and started with crun in the pod's network namespace."
PROFILE=debug hack/images.sh

step "Start the local cluster" \
  "Real etcd, kube-apiserver, controller-manager and scheduler; LocalStack with a VPC," \
  "one subnet and one EC2 instance per node; three simulated nodes, each a network" \
  "namespace on bridge berth-br0; berth-client is the outside world. No node agent runs" \
  "yet: berth's DaemonSet will be the cluster's only kube-proxy."
BERTH_E2E_NODEPROXY=0 "$env" up
info=target/e2e/env.json
api=$(jq -r .apiserver_url "$info")
api=${api#https://}
localstack=$(jq -r .localstack_endpoint "$info")
region=$(jq -r .region "$info")
cluster=$(jq -r .cluster_name "$info")
service_cidr=$(jq -r .service_cidr "$info")
cluster_cidr=10.244.0.0/16 # the harness's pod network (node N: 10.244.N.0/24)
mapfile -t nodes < <(jq -r '.nodes[].netns' "$info")
mapfile -t node_ips < <(jq -r '.nodes[].ip' "$info")
client=$(jq -r .client_netns "$info")

step "Install berth with Helm" \
  "The chart installs the CRD, the controller (2 replicas, leader-elected), the node agent" \
  "DaemonSet and two LoadBalancerClasses: 'pool' (default: $pool_range, announced on L2)" \
  "and 'aws' (an NLB per Service, here against LocalStack with static test credentials)."
values=$(mktemp --suffix=.yaml)
trap 'rm -f "$values"' EXIT
cat >"$values" <<YAML
clusterName: $cluster
controller:
  aws: {region: $region, endpointURL: "$localstack", credentialsSecret: aws-creds}
  logJSON: false
nodeproxy:
  apiServer: {host: "${api%:*}", port: ${api##*:}}
  clusterCIDR: $cluster_cidr
  serviceCIDR: $service_cidr
  logJSON: false
loadBalancerClasses:
  - name: pool
    default: true
    pool: {addresses: ["$pool_range"], autoAssign: true, l2: true}
  - name: aws
    aws: {scheme: internet-facing, targetType: instance}
YAML
run kubectl create namespace "$system"
run kubectl -n "$system" create secret generic aws-creds \
  --from-literal=AWS_ACCESS_KEY_ID=test --from-literal=AWS_SECRET_ACCESS_KEY=test
run helm install berth charts/berth -n "$system" -f "$values" --wait --timeout 3m
run kubectl -n "$system" get pods -o wide
run kubectl get loadbalancerclasses

step "Apply the seed's nginx Deployment" \
  "Three replicas; each pod gets its own network namespace and an IP from its node's podCIDR."
run kubectl apply -f examples/seed/nginx-deployment.yaml
run kubectl rollout status deployment/nginx-deployment --timeout=120s
run kubectl get pods -l app=nginx -o wide

step "Apply the seed's nginx-service and curl its ClusterIP from a node" \
  "berth-nodeproxy (the DaemonSet) programs nftables on every node: the ClusterIP answers" \
  "on each node and is spread over the three pods."
run kubectl apply -f examples/seed/nginx-service.yaml
vip=$(wait_value "ClusterIP" 20 service nginx-service -o jsonpath='{.spec.clusterIP}')
for node in "${nodes[@]}"; do
  eventually 40 ip netns exec "$node" curl -s --max-time 2 "http://$vip/" | title_from
done

step "The seed's kubectl proxy URL" \
  "The apiserver's service proxy reaches the Service's pods, as in the seed article."
kubectl proxy --port=8080 >/dev/null 2>&1 &
proxy=$!
trap 'kill $proxy 2>/dev/null; rm -f "$values"' EXIT
for _ in $(seq 20); do curl -s -o /dev/null localhost:8080/version && break; sleep 0.25; done
eventually 20 curl -s --max-time 3 \
  http://localhost:8080/api/v1/namespaces/default/services/nginx-service/proxy/ | title_from

svc_ip() { jsonpath service nginx-service -o jsonpath='{.status.loadBalancer.ingress[0].ip}'; }

if [ "$provider" != aws ]; then
  step "Make nginx-service a LoadBalancer: the default 'pool' class gives it an address" \
    "No loadBalancerClass in the Service: the apiserver sets the default class berth.dev/pool" \
    "(the chart's MutatingAdmissionPolicy), so no cloud controller takes it too. The controller" \
    "allocates an address from $pool_range, writes status.loadBalancer.ingress (ipMode VIP)" \
    "and the condition berth.dev/LoadBalancerReady; one node wins the address's Lease," \
    "adds the address to its eth0 and sends gratuitous ARP."
  run kubectl patch service nginx-service -p '{"spec":{"type":"LoadBalancer"}}'
  lb_ip=$(wait_value "pool address" 60 service nginx-service \
    -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
  run kubectl get service nginx-service
  run kubectl get service nginx-service \
    -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'
  np=$(jsonpath service nginx-service -o jsonpath='{.spec.ports[0].nodePort}')

  step "Reach nginx from outside the cluster: NodePort on every node, then the pool address" \
    "berth-client is not a node: it reaches the NodePort on each node's address, and the" \
    "load-balancer address $lb_ip over the shared L2 network (ARP answered by one node)."
  for ip in "${node_ips[@]}"; do
    eventually 40 ip netns exec "$client" curl -s --max-time 2 "http://$ip:$np/" | title_from
  done
  eventually 60 ip netns exec "$client" curl -s --max-time 2 "http://$lb_ip/" | title_from
  lease=berth-l2-${lb_ip//./-}
  # The agents' Leases live in the namespace the chart creates for them (<release>-l2).
  holder=$(wait_value "lease holder" 20 lease "$lease" -n berth-l2 -o jsonpath='{.spec.holderIdentity}')
  holder_ns=$(jq -r --arg n "$holder" '.nodes[] | select(.name == $n) | .netns' "$info")
  echo "Lease berth-l2/$lease is held by $holder: the address is on its eth0, on no other node's"
  run ip -n "$holder_ns" -4 addr show dev eth0
  run ip -n "$client" neigh show "$lb_ip"
  for _ in $(seq 30); do
    [ "$(jsonpath loadbalancerclass pool -o jsonpath='{.status.allocated}')" = 1 ] && break
    sleep 0.5
  done
  run kubectl get loadbalancerclass pool
fi

if [ "$provider" != pool ]; then
  if [ "$provider" = both ]; then
    step "Move the same Service to the 'aws' class: an NLB in LocalStack" \
      "spec.loadBalancerClass can only be set while the type becomes LoadBalancer, so the" \
      "Service goes to ClusterIP first (the controller releases the pool address) and comes" \
      "back as a LoadBalancer of class berth.dev/aws."
    run kubectl patch service nginx-service -p '{"spec":{"type":"ClusterIP"}}'
    for _ in $(seq 60); do
      [ -z "$(svc_ip)" ] && ! ip -n "$holder_ns" -4 -o addr show dev eth0 | grep -qw "$lb_ip/32" && break
      sleep 0.5
    done
    echo "$lb_ip is released: gone from the Service's status and from $holder's eth0"
  else
    step "Make nginx-service a LoadBalancer of class berth.dev/aws: an NLB in LocalStack"
  fi
  say "The controller creates the NLB in the discovered subnets, a listener and a target" \
    "group per port with every node's EC2 instance as a target on the NodePort, and writes" \
    "the NLB's DNS name into status.loadBalancer.ingress."
  run kubectl patch service nginx-service \
    -p '{"spec":{"type":"LoadBalancer","loadBalancerClass":"berth.dev/aws"}}'
  host=$(wait_value "NLB hostname" 180 service nginx-service \
    -o jsonpath='{.status.loadBalancer.ingress[0].hostname}')
  run kubectl get service nginx-service
  run kubectl get service nginx-service \
    -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'

  step "What LocalStack holds: the NLB, its target group and the targets' health" \
    "LocalStack's health checks really connect to each node's NodePort."
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=$region \
    "$venv/bin/python" - "$localstack" "$host" <<'PY'
import sys, time
import boto3
endpoint, host = sys.argv[1], sys.argv[2]
elb = boto3.client("elbv2", endpoint_url=endpoint)
lb = next(l for l in elb.describe_load_balancers()["LoadBalancers"] if l["DNSName"] == host)
print(f"load balancer  {lb['LoadBalancerName']}  {lb['Type']} {lb['Scheme']} {lb['State']['Code']}")
print(f"  dns name     {lb['DNSName']}")
print(f"  subnets      {', '.join(z['SubnetId'] + ' (' + z['ZoneName'] + ')' for z in lb['AvailabilityZones'])}")
for ls in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]:
    print(f"listener       {ls['Protocol']}:{ls['Port']}")
for tg in elb.describe_target_groups(LoadBalancerArn=lb["LoadBalancerArn"])["TargetGroups"]:
    print(f"target group   {tg['TargetGroupName']}  {tg['Protocol']}:{tg['Port']}  "
          f"{tg['TargetType']} targets, health check {tg['HealthCheckProtocol']}")
    for _ in range(60):
        health = elb.describe_target_health(TargetGroupArn=tg["TargetGroupArn"])["TargetHealthDescriptions"]
        if health and all(h["TargetHealth"]["State"] == "healthy" for h in health):
            break
        time.sleep(1)
    for h in health:
        t = h["Target"]
        print(f"  target       {t['Id']}:{t['Port']}  {h['TargetHealth']['State']}")
PY

  step "A request through the emulated NLB" \
    "LocalStack's berth extension serves each listener at an address on the bridge and" \
    "forwards to healthy targets: client -> NLB -> NodePort -> berth-nodeproxy -> pod."
  addr=""
  for _ in $(seq 60); do
    addr=$(curl -s "$localstack/_berth/elbv2/listeners" |
      jq -r --arg h "$host" '.[] | select(.dnsName == $h and .port == 80) | .address' | head -1)
    [ -n "$addr" ] && break
    sleep 0.5
  done
  echo "listener $host:80 is served at $addr"
  eventually 60 ip netns exec "$client" curl -s --max-time 2 "http://$addr/" | title_from
fi

cat <<TXT

${bold}Done.${off} The cluster stays up. Explore it:
  export KUBECONFIG=$KUBECONFIG PATH=$bin:\$PATH
  kubectl get svc,pods -o wide
  kubectl get loadbalancerclasses
  kubectl -n $system get pods,leases          # the controller's leader Lease
  kubectl -n berth-l2 get leases              # the agents' Leases
  kubectl -n $system logs deploy/berth-controller
  ip netns exec $client curl http://<load-balancer-address>/    # from the outside world
  ip netns exec ${nodes[0]} nft list ruleset                          # berth-nodeproxy's rules
Stop it with: make down
TXT
