"""Helpers for tests that run on the lab: bring it up and down through the real
command line, talk to it with kubectl, run programs in its nodes and pods."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from staticegress.controlplane.binaries import Binaries
from staticegress.lab import plan

T = TypeVar("T")
STATICEGRESS = [sys.executable, "-m", "staticegress"]


def require_root() -> None:
    # Not a skip: a lab test that cannot run is a failure CI must see.
    if os.geteuid() != 0:
        raise AssertionError("lab tests create network namespaces and must run as root")


def require_no_lab() -> None:
    """Root, and no lab up. A lab whose processes all died with their owner (a run
    killed before `lab down`) is taken down first; a live one is someone else's."""
    from staticegress.lab import lab as lablib

    require_root()
    lablib.clear_stale(progress=lambda line: print(f"[lab] {line}"))
    assert lablib.load_state() is None, "a lab is in use on this machine: `staticegress lab down`"


def staticegress(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the staticegress command line; raise with its output if it fails."""
    proc = subprocess.run([*STATICEGRESS, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"staticegress {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def wait_for(
    what: str, check: Callable[[], T | None], *, seconds: float = 60, every: float = 0.25
) -> T:
    """Poll `check` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (AssertionError, subprocess.SubprocessError, KeyError, ValueError) as exc:
            last = exc
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what} (last: {last})")


def node_state(node: str) -> str:
    """Everything on a node the agent could touch, minus pods, counters, and the
    link indexes, MACs and link-local addresses a rebuilt (rebooted) node gets anew."""
    ns = f"{plan.PREFIX}-{node}"
    parts = []
    for argv in (
        ["nft", "list", "ruleset"],
        ["ip", "rule"],
        ["ip", "route", "show", "table", "all"],
        ["ip", "-o", "addr"],
        ["ip", "-o", "link"],
    ):
        out = subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
        ).stdout
        out = re.sub(r"counter packets \d+ bytes \d+", "counter", out)
        out = re.sub(r"^\d+: ", "", out, flags=re.MULTILINE)
        out = re.sub(r"@if\d+", "", out)
        out = re.sub(r"link/ether [0-9a-f:]+ brd [0-9a-f:]+", "link/ether", out)
        out = re.sub(r"\\[ \t]+link/ether[ \t]*", " ", out)
        # Pods' veths (the netns lab's and the CNI plugins'), link-local addresses.
        lines = sorted(
            ln for ln in out.splitlines() if not re.search(r"\bve(th)?[0-9a-f]{8}\b|fe80::", ln)
        )
        parts.append(f"## {' '.join(argv)}\n" + "\n".join(lines))
    return "\n".join(parts)


@dataclass
class Lab:
    """A running lab, as a test sees it."""

    cni: plan.CNI
    nodes: int
    kubeconfig: Path
    binaries: Binaries

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            [str(self.binaries.kubectl), *args],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", stdin=manifest)

    def exec(
        self, target: str, *command: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*STATICEGRESS, "lab", "exec", target, "--", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"lab exec {target} {' '.join(command)}: {proc.returncode} {proc.stderr.strip()}"
            )
        return proc

    def http_source(self, target: str, server: str = "203.0.113.10", port: int = 80) -> str:
        """The source address the server at `server` saw for a request from `target`."""
        out = self.exec(target, "curl", "-s", "-m", "3", f"http://{server}:{port}/").stdout
        return out.strip()

    def udp_echo(
        self, target: str, payload: str, server: str = "203.0.113.20", port: int = 9000
    ) -> str:
        code = (
            "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.settimeout(3);s.sendto(sys.argv[3].encode(),(sys.argv[1],int(sys.argv[2])));"
            "print(s.recvfrom(2048)[0].decode())"
        )
        return self.exec(
            target, sys.executable, "-c", code, server, str(port), payload
        ).stdout.strip()

    def ready_pods(self, selector: str, count: int) -> list[dict[str, Any]] | None:
        pods = self.get("pods", "-l", selector)["items"]
        ready = [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p["status"].get("conditions", [])
            )
            and p["status"].get("podIP")
        ]
        return ready if len(ready) == count and len(pods) == count else None


@contextlib.contextmanager
def pod_server(
    target: str, address: str, *, http_port: int = 8080, udp_port: int = 9001
) -> Iterator[None]:
    """Run the lab's echo servers inside a pod for the duration of the block."""
    proc = subprocess.Popen(
        [
            *STATICEGRESS,
            "lab",
            "exec",
            target,
            "--",
            sys.executable,
            "-m",
            "staticegress",
            "lab",
            "serve",
            "--address",
            address,
            "--http-port",
            str(http_port),
            "--udp-port",
            str(udp_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def spread_deployment(
    name: str, replicas: int, labels: dict[str, str] | None = None, node: str | None = None
) -> str:
    """A Deployment whose pods land one per node (a hard topology spread), or all on `node`."""
    labels = {"app": name, **(labels or {})}
    pin = f"\n      nodeSelector:\n        kubernetes.io/hostname: {node}" if node else ""
    label_yaml = "\n".join(f"        {k}: {json.dumps(v)}" for k, v in labels.items())
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
{label_yaml}
    spec:
      terminationGracePeriodSeconds: 0{pin}
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels:
            app: {name}
      containers:
      - name: main
        image: lab.invalid/none:0
"""


def egress_lab_object(name: str, eips: list[str], server: str, app: str = "client") -> str:
    """A StaticEgressIP for every `app=APP` pod towards `server`, through `eips`."""
    return json.dumps(
        {
            "apiVersion": "staticegressips.io/v1alpha1",
            "kind": "StaticEgressIP",
            "metadata": {"name": name},
            "spec": {
                "rules": [
                    {
                        "egressips": eips,
                        "pod-selector": {"matchLabels": {"app": app}},
                        "cidr": f"{server}/32",
                    }
                ]
            },
        }
    )


@contextlib.contextmanager
def client_lab(
    binaries: Binaries,
    cni: plan.CNI,
    *,
    name: str = "failover",
    eips: tuple[str, ...] = ("198.51.100.200", "198.51.100.201"),
    server: str = "203.0.113.10",
) -> Iterator[tuple[Lab, dict[str, dict[str, Any]]]]:
    """A 3-node lab with its agents and managers, a client pod on every node and
    one StaticEgressIP over `eips` for them, every egress IP assigned and every
    client leaving with one of them; (lab, node -> client pod). Taken down after."""
    from staticegress.lab import lab as lablib

    require_no_lab()
    staticegress("lab", "up", "--nodes", "3", "--cni", cni)
    try:
        lab = Lab(
            cni=cni, nodes=3, kubeconfig=lablib.state_dir() / "admin.kubeconfig", binaries=binaries
        )
        lab.apply(spread_deployment("client", 3))
        pods = {
            p["spec"]["nodeName"]: p
            for p in wait_for("client pods", lambda: lab.ready_pods("app=client", 3), seconds=90)
        }
        lab.apply(egress_lab_object(name, list(eips), server))

        def settled() -> bool:
            status = lab.get("staticegressip", name).get("status") or {}
            entries = status.get("egressIPs") or []
            return (
                len(entries) == len(eips)
                and all(e.get("gateway") for e in entries)
                and all(
                    lab.http_source(f"default/{p['metadata']['name']}", server) in eips
                    for p in pods.values()
                )
            )

        wait_for("every egress IP assigned and in use", settled, seconds=30)
        yield lab, pods
    finally:
        staticegress("lab", "down")
