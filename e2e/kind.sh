#!/usr/bin/env bash
# staticegress on kind, for users with Docker or podman: the same install and
# the same core checks as the real-runtime lab (e2e/test_real_runtime.py).
#
#   e2e/kind.sh [--cni kindnet|calico] [--engine docker|podman] [--keep]
#
# 1. a kind cluster: one control plane and three workers; kindnet (routed pod
#    ranges: the `direct` transport) or Calico with IPIP (an overlay: `vxlan`);
# 2. the image, built from Containerfile and loaded into every node;
# 3. the grant-key Secret, `kubectl apply -k` of deploy/ (only the image name
#    changed, in an overlay), every agent and both managers Ready;
# 4. the checks: a selected pod reaches an external echo server with the egress
#    IP and another destination with its node's address, an unselected pod
#    with its node's address; the agent container on a director killed and
#    restarted without one reply from another source; the gateway's node
#    container stopped, and the egress IP moves with no reply from another
#    source.
#
# Needs kind, kubectl, python3 and docker or podman, with a registry for
# kind's node image, Calico's manifest and the image's base. It cannot run on
# the project's build machines, which reach no registry; there
# `staticegress lab up --runtime containerd` runs the same steps.
# The cluster is deleted at the end unless --keep is given.
set -euo pipefail

CNI=kindnet
ENGINE=$(command -v docker >/dev/null && echo docker || echo podman)
KEEP=0
while [ $# -gt 0 ]; do
  case $1 in
    --cni) CNI=$2; shift 2 ;;
    --engine) ENGINE=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: $0 [--cni kindnet|calico] [--engine docker|podman] [--keep]" >&2; exit 2 ;;
  esac
done
case $CNI in kindnet|calico) ;; *) echo "--cni: kindnet or calico" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER=staticegress
IMAGE=localhost/staticegress:0.1.0
CALICO=https://raw.githubusercontent.com/projectcalico/calico/v3.28.2/manifests/calico.yaml
ECHOES=(staticegress-echo-1 staticegress-echo-2)
WORK=$(mktemp -d)
if [ "$ENGINE" = podman ]; then export KIND_EXPERIMENTAL_PROVIDER=podman; fi

say() { printf '[kind.sh] %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
k() { kubectl --context "kind-$CLUSTER" "$@"; }

cleanup() {
  "$ENGINE" rm -f "${ECHOES[@]}" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  if [ "$KEEP" = 0 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# Poll "$@" every second for up to $SECONDS_MAX seconds (default 120).
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + ${SECONDS_MAX:-120}))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "timed out waiting for $what"
    sleep 1
  done
}

# ------------------------------------------------------------------ cluster
say "creating kind cluster $CLUSTER (cni $CNI)"
cat >"$WORK/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: $([ "$CNI" = calico ] && echo true || echo false)
  podSubnet: $([ "$CNI" = calico ] && echo 192.168.0.0/16 || echo 10.244.0.0/16)
nodes:
- role: control-plane
- role: worker
- role: worker
- role: worker
EOF
kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --wait 120s
if [ "$CNI" = calico ]; then k apply -f "$CALICO"; fi
SECONDS_MAX=300 wait_for "every node Ready" k wait --for=condition=Ready nodes --all --timeout=5s
WORKERS=$(k get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}')
for n in $WORKERS; do k label node "$n" staticegress.io/gateway=true --overwrite >/dev/null; done

# -------------------------------------------------------------------- image
say "building $IMAGE and loading it into every node"
"$ENGINE" build -t "$IMAGE" -f "$ROOT/Containerfile" "$ROOT"
if [ "$ENGINE" = docker ]; then
  kind load docker-image "$IMAGE" --name "$CLUSTER"
else
  podman save --format docker-archive -o "$WORK/image.tar" "$IMAGE"
  kind load image-archive "$WORK/image.tar" --name "$CLUSTER"
fi

# ------------------------------------------------------------------ install
say "installing staticegress: kubectl apply -k deploy/"
k apply -f "$ROOT/deploy/namespace.yaml"
k -n staticegress-system create secret generic staticegress-grant-key \
  --from-literal=key="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
mkdir "$WORK/overlay"
cat >"$WORK/overlay/kustomization.yaml" <<EOF
resources:
- $(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$ROOT/deploy" "$WORK/overlay")
images:
- {name: staticegress, newName: ${IMAGE%:*}, newTag: "${IMAGE##*:}"}
EOF
k apply -k "$WORK/overlay"
k -n staticegress-system rollout status daemonset/staticegress-agent --timeout=300s
k -n staticegress-system rollout status deployment/staticegress-manager --timeout=300s

# --------------------------------------------------------- external servers
ECHO_PY='
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = (self.client_address[0] + "\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(b)))
        self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("", 80), H).serve_forever()'
for e in "${ECHOES[@]}"; do
  "$ENGINE" run -d --name "$e" --network kind --entrypoint python3 "$IMAGE" -c "$ECHO_PY" >/dev/null
done
ip_of() { "$ENGINE" inspect -f '{{(index .NetworkSettings.Networks "kind").IPAddress}}' "$1"; }
SERVER=$(ip_of "${ECHOES[0]}")
OTHER=$(ip_of "${ECHOES[1]}")
# The egress IP: a free address near the top of the kind network's IPv4 range.
EIP=$("$ENGINE" network inspect kind | python3 -c '
import ipaddress, json, sys
net = json.load(sys.stdin)[0]
subnets = [c.get("Subnet") for c in (net.get("IPAM") or {}).get("Config") or []]
subnets += [s.get("subnet") for s in net.get("subnets") or []]
v4 = next(ipaddress.ip_network(s) for s in subnets if s and ":" not in s)
print(v4.broadcast_address - 10)')
say "echo servers $SERVER and $OTHER, egress IP $EIP"

# ----------------------------------------------------------------- workloads
deployment() {  # name replicas
  cat <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: $1}
spec:
  replicas: $2
  selector: {matchLabels: {app: $1}}
  template:
    metadata: {labels: {app: $1}}
    spec:
      terminationGracePeriodSeconds: 0
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
         labelSelector: {matchLabels: {app: $1}}}
      containers:
      - {name: c, image: $IMAGE, command: [sleep, infinity]}
EOF
}
deployment client 3 | k apply -f -
deployment other 1 | k apply -f -
k rollout status deployment/client --timeout=120s
k rollout status deployment/other --timeout=120s
# As an administrator would: a pool that grants the egress IP to this namespace.
k apply -f - <<EOF
apiVersion: staticegressips.io/v1alpha1
kind: StaticEgressIPPool
metadata: {name: kind}
spec:
  cidrs: ["$EIP/32"]
  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}
EOF
k apply -f - <<EOF
apiVersion: staticegressips.io/v1alpha1
kind: StaticEgressIP
metadata: {name: kind}
spec:
  rules:
  - {egressip: "$EIP", pod-selector: {matchLabels: {app: client}}, cidr: "$SERVER/32"}
EOF

source_of() {  # pod server -> the source address the server saw
  k exec "$1" -- python3 -c 'import sys, urllib.request
print(urllib.request.urlopen("http://%s/" % sys.argv[1], timeout=3).read().decode().strip())' "$2"
}
node_ip() { k get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'; }
node_of() { k get pod "$1" -o jsonpath='{.spec.nodeName}'; }
gateway() { k get staticegressip kind -o jsonpath='{.status.egressIPs[0].gateway}'; }
# Probe the server from a pod every 50 ms for $3 seconds; print the sources seen.
probe() {
  k exec "$1" -- python3 -c 'import collections, sys, time, urllib.request
seen = collections.Counter(); end = time.time() + float(sys.argv[2])
while time.time() < end:
    try: seen[urllib.request.urlopen("http://%s/" % sys.argv[1], timeout=0.5).read().decode().strip()] += 1
    except OSError: seen["lost"] += 1
    time.sleep(0.05)
print(" ".join("%s=%d" % kv for kv in sorted(seen.items())))' "$2" "$3"
}
no_leak() {  # probe output: only the egress IP (and losses), and some answers
  say "  sources seen: $1"
  for kv in $1; do
    case ${kv%=*} in "$EIP"|lost) ;; *) fail "a reply came from ${kv%=*}" ;; esac
  done
  case " $1" in *" $EIP="*) ;; *) fail "no reply with the egress IP" ;; esac
}

# ------------------------------------------------------------------- checks
wait_for "a gateway for $EIP" test -n "$(gateway)"
say "check: selection and destination scoping (gateway $(gateway))"
for pod in $(k get pods -l app=client -o name); do
  pod=${pod#pod/}; nip=$(node_ip "$(node_of "$pod")")
  wait_for "$pod leaving with $EIP" test "$(source_of "$pod" "$SERVER")" = "$EIP"
  [ "$(source_of "$pod" "$OTHER")" = "$nip" ] || fail "$pod to $OTHER did not leave with $nip"
done
pod=$(k get pods -l app=other -o jsonpath='{.items[0].metadata.name}')
[ "$(source_of "$pod" "$SERVER")" = "$(node_ip "$(node_of "$pod")")" ] \
  || fail "the unselected pod did not leave with its node's address"

GW=$(gateway)
DIRECTOR_POD=
for pod in $(k get pods -l app=client -o jsonpath='{.items[*].metadata.name}'); do
  [ "$(node_of "$pod")" != "$GW" ] && DIRECTOR_POD=$pod && break
done
[ -n "$DIRECTOR_POD" ] || fail "no client pod outside the gateway"
DIRECTOR=$(node_of "$DIRECTOR_POD")

say "check: the agent container on $DIRECTOR killed and restarted, no leak"
AGENT=$(k -n staticegress-system get pods -l app.kubernetes.io/name=staticegress-agent \
  --field-selector "spec.nodeName=$DIRECTOR" -o jsonpath='{.items[0].metadata.name}')
restarts() { k -n staticegress-system get pod "$AGENT" -o jsonpath='{.status.containerStatuses[0].restartCount}'; }
BEFORE=$(restarts)
probe "$DIRECTOR_POD" "$SERVER" 12 >"$WORK/probe" &
sleep 2
# shellcheck disable=SC2016 # expanded in the node, not here
"$ENGINE" exec "$DIRECTOR" sh -c 'crictl stop --timeout 0 $(crictl ps -q --name "^agent$")' >/dev/null
wait
no_leak "$(cat "$WORK/probe")"
wait_for "the agent restarted" test "$(restarts)" -gt "$BEFORE"
k -n staticegress-system wait --for=condition=Ready "pod/$AGENT" --timeout=60s

say "check: the gateway's node $GW stopped, the egress IP moves, no leak"
probe "$DIRECTOR_POD" "$SERVER" 15 >"$WORK/probe" &
sleep 2
"$ENGINE" stop "$GW" >/dev/null
wait
no_leak "$(cat "$WORK/probe")"
NEW=$(gateway)
if [ -z "$NEW" ] || [ "$NEW" = "$GW" ]; then fail "the egress IP did not move off $GW ($NEW)"; fi
[ "$(source_of "$DIRECTOR_POD" "$SERVER")" = "$EIP" ] || fail "no egress IP after the failover"
"$ENGINE" start "$GW" >/dev/null
SECONDS_MAX=180 wait_for "$GW Ready again" k wait --for=condition=Ready "node/$GW" --timeout=5s

say "PASS: selection, destination scoping, agent restart, gateway failover ($CNI)"
