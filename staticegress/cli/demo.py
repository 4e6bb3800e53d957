"""`staticegress demo`: the local demo, on the lab.

It brings the lab up, runs a `frontend` Deployment with one pod per node
behind a Service, shows each pod reaching the external server and the source
address the server saw, then applies the original StaticEgressIP example and
shows the API server refusing a typo. The lab stays up afterwards for the
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

FRONTEND = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: frontend
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: frontend}}
  template:
    metadata:
      labels: {{app: frontend}}
    spec:
      terminationGracePeriodSeconds: 0
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {{app: frontend}}
      containers:
      - name: main
        image: lab.invalid/frontend:0
---
apiVersion: v1
kind: Service
metadata:
  name: frontend
spec:
  selector: {{app: frontend}}
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


def _ready_pods(kubectl: _Kubectl, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 90
    while True:
        pods = json.loads(kubectl("get", "pods", "-l", "app=frontend", "-o", "json"))["items"]
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
            raise LabError(f"frontend pods not Ready after 90s ({len(ready)}/{count})")
        time.sleep(0.5)


def _seen_by_server(pod: dict[str, Any], server: str) -> str:
    target = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
    argv = lab.exec_argv(target, ["curl", "-s", "-m", "3", f"http://{server}/"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return proc.stdout.strip() or f"(no answer: {proc.stderr.strip() or proc.returncode})"


def run(args: argparse.Namespace) -> int:
    binaries = ensure_binaries(progress=_say)
    state = lab.up(nodes=args.nodes, cni=args.cni, progress=_say, binaries=binaries)
    kubectl = _Kubectl(binaries.kubectl, state.admin_kubeconfig)
    kubectl("apply", "-f", "-", stdin=FRONTEND.format(replicas=state.nodes))
    kubectl.show("get", "nodes", "-o", "wide")
    pods = _ready_pods(kubectl, state.nodes)
    kubectl.show("get", "pods", "-o", "wide")
    kubectl.show("get", "endpointslices", "-l", "kubernetes.io/service-name=frontend")

    server = str(plan.SERVER_IPS[0])
    print(f"\nEach pod asks the external server http://{server}/ which source it saw:")
    for pod in pods:
        node = plan.node_by_name(pod["spec"]["nodeName"], state.nodes)
        seen = _seen_by_server(pod, server)
        print(
            f"  {pod['metadata']['name']:28} pod {pod['status']['podIP']:12} on {node.name} "
            f"({node.underlay_ip}) -> server saw {seen}"
        )
    print(
        "Without staticegress every pod leaves masqueraded as its node, so the source "
        "depends on where the pod was scheduled."
    )

    seed = manifests.deploy_dir() / "examples" / "seed.yaml"
    kubectl.show("apply", "-f", str(seed))
    kubectl.show("get", "staticegressips")
    print("\nA typo in the egress IP is refused by the API server:")
    kubectl.show("apply", "-f", "-", stdin=TYPO, check=False)

    if args.down:
        lab.down(progress=_say)
    else:
        print(lab.describe(state, binaries.kubectl))
    return 0
