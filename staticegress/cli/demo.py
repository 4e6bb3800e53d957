"""`staticegress demo`: the local demo, on the lab.

It brings the lab up (an agent on every node), runs `frontend` and `backend`
Deployments with one pod per node, shows the source address the external
servers see for each pod, applies the original StaticEgressIP example (with
lab addresses), shows it refused because no pool grants its address, has the
administrator grant it with a StaticEgressIPPool, and shows the sources again:
frontend pods now leave with the egress IP from every node, backend pods and
other destinations are untouched.
Finally the API server refuses a typo. The lab stays up afterwards for the
user to explore, unless `--down` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from staticegress.controlplane.binaries import ensure_binaries
from staticegress.k8s import manifests
from staticegress.lab import lab, plan
from staticegress.lab.netns import LabError
from staticegress.lab.probe import probe_command

WORKLOADS = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {app}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {app}}}
  template:
    metadata:
      labels: {{app: {app}}}
    spec:
      terminationGracePeriodSeconds: 0
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {{app: {app}}}
      containers:
      - name: main
        image: lab.invalid/{app}:0
---
apiVersion: v1
kind: Service
metadata:
  name: {app}
spec:
  selector: {{app: {app}}}
  ports:
  - port: 80
"""

TYPO = """
apiVersion: staticegressips.io/v1alpha1
kind: StaticEgressIP
metadata: {name: typo}
spec:
  rules:
  - {egressip: 100.137.146.300, service-name: frontend, cidr: 4.2.2.2/32}
"""


def _say(line: str) -> None:
    print(f"[demo] {line}", file=sys.stderr, flush=True)


class _Kubectl:
    def __init__(self, kubectl: Path, kubeconfig: str) -> None:
        self.argv = [str(kubectl)]
        self.env = {**os.environ, "KUBECONFIG": kubeconfig}

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            [*self.argv, *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise LabError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout + (proc.stderr if not check else "")

    def show(self, *args: str, stdin: str | None = None, check: bool = True) -> None:
        print(f"\n$ kubectl {' '.join(args)}")
        print(self(*args, stdin=stdin, check=check).rstrip())


def _ready_pods(kubectl: _Kubectl, app: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 90
    while True:
        pods = json.loads(kubectl("get", "pods", "-l", f"app={app}", "-o", "json"))["items"]
        ready = [
            p
            for p in pods
            if p["status"].get("podIP")
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p["status"].get("conditions", [])
            )
        ]
        if len(ready) == count == len(pods):
            return sorted(ready, key=lambda p: p["spec"]["nodeName"])
        if time.monotonic() > deadline:
            raise LabError(f"{app} pods not Ready after 90s ({len(ready)}/{count})")
        time.sleep(0.5)


def _show_sources(title: str, pods: list[dict[str, Any]], nodes: int) -> None:
    print(f"\n{title}")
    for pod in pods:
        node = plan.node_by_name(pod["spec"]["nodeName"], nodes)
        seen = [_seen_by_server(pod, str(server)) for server in plan.SERVER_IPS]
        print(
            f"  {pod['metadata']['labels']['app']:9} {pod['status']['podIP']:11} on {node.name} "
            f"({node.underlay_ip}): {plan.SERVER_IPS[0]} saw {seen[0]:15} "
            f"{plan.SERVER_IPS[1]} saw {seen[1]}"
        )


def _seen_by_server(pod: dict[str, Any], server: str) -> str:
    target = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
    argv = lab.exec_argv(target, ["curl", "-s", "-m", "3", f"http://{server}/"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return proc.stdout.strip() or f"(no answer: {proc.stderr.strip() or proc.returncode})"


def run(args: argparse.Namespace) -> int:
    binaries = ensure_binaries(progress=_say)
    state = lab.up(nodes=args.nodes, cni=args.cni, progress=_say, binaries=binaries, pool=False)
    kubectl = _Kubectl(binaries.kubectl, state.admin_kubeconfig)
    for app in ("frontend", "backend"):
        kubectl("apply", "-f", "-", stdin=WORKLOADS.format(app=app, replicas=state.nodes))
    kubectl.show("get", "nodes", "-o", "wide")
    pods = _ready_pods(kubectl, "frontend", state.nodes) + _ready_pods(
        kubectl, "backend", state.nodes
    )
    kubectl.show("get", "pods", "-o", "wide")
    _show_sources(
        "Before: every pod leaves masqueraded as its node, whatever it is:", pods, state.nodes
    )

    example = manifests.deploy_dir() / "examples" / "lab.yaml"
    print("\nThe original example, with lab addresses: the pods behind Service frontend")
    print(f"reach {plan.SERVER_IPS[0]} with the source 198.51.100.200.")
    kubectl.show("apply", "-f", str(example))
    reason = _wait_refused(kubectl)
    print(
        f"\nRefused ({reason}): an egress IP is a credential, and no administrator has "
        "granted 198.51.100.200 to namespace default yet. The frontend pods' traffic to "
        "the server is dropped meanwhile, never sent with the node's address:"
    )
    kubectl.show(
        "get",
        "staticegressip",
        "frontend",
        "-o",
        'jsonpath={.status.conditions[?(@.type=="Ready")].message}',
    )
    pool = manifests.deploy_dir() / "examples" / "lab-pool.yaml"
    print("\nThe administrator grants it with a cluster-scoped StaticEgressIPPool:")
    kubectl.show("apply", "-f", str(pool))
    gateway = _wait_gateway(kubectl)
    kubectl.show("get", "staticegressippools")
    print(f"\nThe manager chose {gateway} as the gateway of 198.51.100.200:")
    kubectl.show("get", "staticegressips")
    time.sleep(1.0)  # the agents apply a change within a fraction of a second
    _show_sources(
        f"After: frontend pods reach {plan.SERVER_IPS[0]} as 198.51.100.200 from every node; "
        f"backend pods and other destinations are untouched:",
        pods,
        state.nodes,
    )

    _failover(kubectl, pods, gateway)

    print("\nA typo in the egress IP is refused by the API server:")
    kubectl.show("apply", "-f", "-", stdin=TYPO, check=False)

    if args.down:
        lab.down(progress=_say)
    else:
        print(lab.describe(state, binaries.kubectl))
    return 0


def _wait_refused(kubectl: _Kubectl) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        obj = json.loads(kubectl("get", "staticegressip", "frontend", "-o", "json"))
        for c in (obj.get("status") or {}).get("conditions", []):
            if c.get("type") == "Ready" and c.get("status") == "False":
                return str(c.get("reason"))
        time.sleep(0.2)
    raise LabError("the manager wrote no status within 30 s")


def _wait_gateway(kubectl: _Kubectl) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        obj = json.loads(kubectl("get", "staticegressip", "frontend", "-o", "json"))
        for entry in (obj.get("status") or {}).get("egressIPs", []):
            if entry.get("gateway"):
                return str(entry["gateway"])
        time.sleep(0.2)
    raise LabError("the manager assigned no gateway within 30 s")


def _failover(kubectl: _Kubectl, pods: list[dict[str, Any]], gateway: str) -> None:
    """Kill the gateway node while a frontend pod elsewhere probes the server."""
    client = next(
        p
        for p in pods
        if p["metadata"]["labels"]["app"] == "frontend" and p["spec"]["nodeName"] != gateway
    )
    target = f"{client['metadata']['namespace']}/{client['metadata']['name']}"
    print(
        f"\nFailover: {client['metadata']['name']} on {client['spec']['nodeName']} sends a UDP "
        f"probe to {plan.SERVER_IPS[0]} every 10 ms; after 1 s the gateway {gateway} is "
        "killed (its processes stop, its link goes down)."
    )
    argv = lab.exec_argv(
        target,
        probe_command(
            server=str(plan.SERVER_IPS[0]), port=plan.UDP_PORT, interval=0.01, duration=4
        ),
    )
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    lab.node_kill(gateway, progress=_say)
    out, _ = proc.communicate(timeout=60)
    res = json.loads(out)
    new = _wait_gateway(kubectl)
    print(
        f"  {res['sent']} probes, {res['received']} answered; the server saw the sources "
        f"{res['sources']}; longest gap {res['longest_gap_ms']:.0f} ms"
    )
    print(f"  198.51.100.200 moved from {gateway} to {new}:")
    kubectl.show("get", "staticegressips")
    lab.node_restore(gateway, progress=_say)
    print(f"  {gateway} is back; it stays a standby (no flapping).")
