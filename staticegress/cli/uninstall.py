"""`staticegress uninstall`: remove staticegress from a cluster and its nodes.

Deleting the product's objects is not enough: agents leave their node's
dataplane in place when they stop (so an upgrade never lets selected pods out
unsteered), so every node still holds our tables, rules, routes, tunnel,
egress IPs and CNI gate. The procedure, each step through kubectl and shown
as it goes:

1. delete every StaticEgressIP and give the agents a moment: they withdraw
   the egress IPs and steering themselves while they still run;
2. delete the product (`kubectl delete -k deploy/`), waiting until its
   namespace is gone;
3. apply the uninstall kit (`deploy/uninstall/`, with the image the agents
   ran): a DaemonSet whose init container runs `staticegress agent --cleanup`
   on every node, and whose pods turn Ready only once their node is clean;
4. wait until it is ready on every node, and show each node's result (the
   init container's log);
5. delete the kit and its namespace.

It stops at the first step that fails and says what to do; running it again
picks up where it stopped (every step tolerates what is already gone).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from staticegress.k8s.manifests import UNINSTALL_KIT, deploy_dir

NAMESPACE = "staticegress-system"
KIT_NAMESPACE = "staticegress-uninstall"
KIT_DAEMONSET = "staticegress-cleanup"
IMAGE_NAME = "staticegress"
"""The image name the manifests use, which a kustomize `images:` entry replaces."""
SETTLE_SECONDS = 3.0
"""After the StaticEgressIPs are gone: time for every agent to sync (50 ms
coalescing) and withdraw what they programmed."""


class UninstallError(Exception):
    """A step failed; the message says which and what to do."""


def _say(line: str) -> None:
    print(f"[staticegress] {line}", file=sys.stderr, flush=True)


class Kubectl:
    """kubectl with the user's kubeconfig; every call returns its stdout."""

    def __init__(self, kubectl: str, kubeconfig: str | None) -> None:
        self.argv = [kubectl, *(("--kubeconfig", kubeconfig) if kubeconfig else ())]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.argv, *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise UninstallError(
                f"kubectl {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}"
            )
        return proc


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "uninstall",
        help="remove staticegress from the cluster and clean every node",
        description="Delete every StaticEgressIP, delete the product (kubectl delete -k "
        "deploy/), run the uninstall kit (deploy/uninstall/) until every node is clean, show "
        "each node's result, and remove the kit. Uses kubectl.",
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: kubectl's)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for each step (default: 300)",
    )
    p.add_argument(
        "--image",
        help="image for the cleanup pods (default: the one the agent DaemonSet runs, "
        "else the manifests' own)",
    )
    p.add_argument(
        "--kubectl",
        # The one installed with us first: a system one may be far older.
        default=shutil.which("kubectl", path=str(Path(sys.executable).parent))
        or shutil.which("kubectl")
        or "kubectl",
        help="the kubectl to use (default: the one next to this Python, else from PATH)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kubectl = Kubectl(args.kubectl, args.kubeconfig)
    try:
        clean = uninstall(kubectl, timeout=args.timeout, image=args.image)
    except UninstallError as exc:
        _say(f"error: {exc}")
        _say("fix it and run `staticegress uninstall` again: every step tolerates what is gone")
        return 1
    return 0 if clean else 1


def uninstall(kubectl: Kubectl, *, timeout: float, image: str | None) -> bool:
    """The whole procedure; True when every node reported a clean cleanup."""
    wait = f"--timeout={int(timeout)}s"
    image = image or _agent_image(kubectl)
    _say("1/5 deleting every StaticEgressIP")
    if kubectl("get", "crd", "staticegressips.staticegressips.io", check=False).returncode == 0:
        kubectl("delete", "staticegressips", "--all", "--all-namespaces", "--wait", wait)
        time.sleep(SETTLE_SECONDS)
    else:
        _say("    none: the StaticEgressIP CRD is not installed")
    _say(f"2/5 deleting staticegress (kubectl delete -k deploy/), namespace {NAMESPACE} included")
    kubectl("delete", "-k", str(deploy_dir()), "--ignore-not-found", "--wait", wait)
    with tempfile.TemporaryDirectory(prefix="staticegress-uninstall-") as tmp:
        kit = _kit(Path(tmp), image)
        shown = image or "the manifests' own"
        _say(f"3/5 cleaning every node: kubectl apply -k deploy/{UNINSTALL_KIT}/ (image {shown})")
        kubectl("apply", "-k", str(kit))
        try:
            _say(f"4/5 waiting for daemonset/{KIT_DAEMONSET} to be ready on every node")
            done = kubectl(
                "-n",
                KIT_NAMESPACE,
                "rollout",
                "status",
                f"daemonset/{KIT_DAEMONSET}",
                wait,
                check=False,
            )
            clean = _report(kubectl)
            if done.returncode != 0:
                _say(f"    not every node is clean: {(done.stderr or done.stdout).strip()}")
                clean = False
        finally:
            _say(f"5/5 removing the uninstall kit (namespace {KIT_NAMESPACE})")
            kubectl("delete", "-k", str(kit), "--ignore-not-found", "--wait", wait)
    if clean:
        _say("staticegress is uninstalled and every node is clean")
    else:
        _say("some nodes were not cleaned (above): run `staticegress agent --cleanup` there")
    return clean


def _agent_image(kubectl: Kubectl) -> str | None:
    """The image the agents run, so the cleanup runs the same code; None: unknown."""
    proc = kubectl(
        "-n",
        NAMESPACE,
        "get",
        "daemonset/staticegress-agent",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
        check=False,
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _kit(tmp: Path, image: str | None) -> Path:
    """The uninstall kit as a kustomization: deploy/uninstall/, with `image`."""
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        "resources:",
        # kustomize takes no absolute path for a base, only a relative one.
        f"- {os.path.relpath(deploy_dir() / UNINSTALL_KIT, tmp)}",
    ]
    if image:
        name, tag, digest = _split_image(image)
        lines += ["images:", f"- name: {IMAGE_NAME}", f'  newName: "{name}"']
        if digest:
            lines.append(f'  digest: "{digest}"')
        elif tag:
            lines.append(f'  newTag: "{tag}"')
    (tmp / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return tmp


def _split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a port in the registry is no tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _report(kubectl: Kubectl) -> bool:
    """Each node's cleanup result; True when every node's pod is Ready."""
    proc = kubectl(
        "-n",
        KIT_NAMESPACE,
        "get",
        "pods",
        "-l",
        f"app.kubernetes.io/name={KIT_DAEMONSET}",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} "
        '{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
    )
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    if not rows:
        _say("    no node ran the cleanup (no schedulable node?)")
    clean = True
    for row in sorted(rows, key=lambda r: r[1:2]):
        pod, node, ready = [*row, "", "", ""][:3]
        _say(f"    node {node or '?'}: {'clean' if ready == 'True' else 'NOT clean'}")
        logs = kubectl("-n", KIT_NAMESPACE, "logs", pod, "-c", "cleanup", check=False)
        for line in (logs.stdout or logs.stderr).splitlines():
            _say(f"      {line}")
        clean = clean and ready == "True"
    return clean
