"""`staticegress demo`: the local demo, on the lab.

It brings the lab up (an agent on every node), runs `frontend` and `backend`
Deployments with one pod per node, shows the source address the external
servers see for each pod, applies the original StaticEgressIP example (with
lab addresses) and shows the sources again: frontend pods now leave with the
egress IP from every node, backend pods and other destinations are untouched.
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
    state = lab.up(nodes=args.nodes, cni=args.cni, progress=_say, binaries=binaries)
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
    # The gateway manager (the next piece of the project) will choose the
    # gateway; until it exists, the demo writes that choice on the status.
    gateway = plan.node_plans(state.nodes)[min(1, state.nodes - 1)].name
    print(f"\n(no manager yet: the demo names {gateway} as the gateway on the status)")
    kubectl(
        "patch",
        "staticegressip",
        "frontend",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "status": {
                    "egressIPs": [{"egressIP": "198.51.100.200", "gateway": gateway}],
                    "summary": {"egressIPs": "198.51.100.200", "gateways": gateway},
                }
            }
        ),
    )
    kubectl.show("get", "staticegressips")
    time.sleep(1.0)  # the agents apply a change within a fraction of a second
    _show_sources(
        f"After: frontend pods reach {plan.SERVER_IPS[0]} as 198.51.100.200 from every node; "
        f"backend pods and other destinations are untouched:",
        pods,
        state.nodes,
    )

    print("\nA typo in the egress IP is refused by the API server:")
    kubectl.show("apply", "-f", "-", stdin=TYPO, check=False)

    if args.down:
        lab.down(progress=_say)
    else:
        print(lab.describe(state, binaries.kubectl))
    return 0
