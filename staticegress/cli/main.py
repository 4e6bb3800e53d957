"""The `staticegress` command: one program, one subcommand per role.

Subcommands:
- `controlplane binaries`: find or build etcd and the Kubernetes control plane;
- `controlplane up`: run a local control plane in the foreground until Ctrl-C;
- `lab ...`: the local cluster of network-namespace nodes and pods;
- `demo`: the local demo, on the lab;

- `agent`: the node agent;
- `manager`: the gateway manager.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from staticegress import __version__
from staticegress.cli import agent as agent_cli
from staticegress.cli import demo as demo_cli
from staticegress.cli import lab as lab_cli
from staticegress.cli import manager as manager_cli
from staticegress.controlplane.binaries import BinaryNotFoundError, ensure_binaries
from staticegress.controlplane.cluster import ControlPlane, ControlPlaneError
from staticegress.k8s.client import api_client
from staticegress.k8s.crd import install_crd
from staticegress.lab.netns import LabError
from staticegress.lab.plan import CNIS


def _say(line: str) -> None:
    print(f"[staticegress] {line}", file=sys.stderr, flush=True)


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _cmd_binaries(args: argparse.Namespace) -> int:
    found = ensure_binaries(progress=_say)
    for name, path in vars(found).items():
        print(f"{name.replace('_', '-'):24} {path}")
    return 0


def _cmd_controlplane_up(args: argparse.Namespace) -> int:
    found = ensure_binaries(progress=_say)
    with ControlPlane(binaries=found, bind_address=args.bind_address, progress=_say) as cp:
        asyncio.run(_install_crd(cp.admin_kubeconfig))
        out = Path(args.kubeconfig)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cp.admin_kubeconfig, out)
        out.chmod(0o600)
        _say(f"admin kubeconfig: {out}")
        _say(f"try: KUBECONFIG={out} kubectl get staticegressips -A")
        _say("press Ctrl-C to stop and remove everything")
        _wait_for_signal()
    return 0


async def _install_crd(kubeconfig: Path) -> None:
    api = await api_client(kubeconfig)
    try:
        await install_crd(api)
    finally:
        await api.close()
    _say("StaticEgressIP CRD installed and Established")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="staticegress",
        description="Fixed source IPs for chosen workloads' traffic leaving a Kubernetes cluster.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cp = sub.add_parser("controlplane", help="the local Kubernetes control plane (tests, demo)")
    cp_sub = cp.add_subparsers(dest="cp_command", required=True, metavar="ACTION")
    b = cp_sub.add_parser(
        "binaries",
        help="find or build etcd, kube-apiserver, kube-controller-manager, kube-scheduler",
        description="Find each binary (TEST_ASSET_*, KUBEBUILDER_ASSETS, the build cache, "
        "PATH) or build it from the pinned Go modules into the cache; print the paths.",
    )
    b.set_defaults(func=_cmd_binaries)
    up = cp_sub.add_parser(
        "up",
        help="run a control plane in the foreground until Ctrl-C",
        description="Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler "
        "on free ports, install the CRD, write an admin kubeconfig, and wait for Ctrl-C.",
    )
    up.add_argument("--bind-address", default="127.0.0.1", help="API server address")
    up.add_argument(
        "--kubeconfig",
        default=str(Path.home() / ".kube" / "staticegress.kubeconfig"),
        help="where to write the admin kubeconfig (default: %(default)s)",
    )
    up.set_defaults(func=_cmd_controlplane_up)

    demo = sub.add_parser(
        "demo",
        help="the local demo, on the lab (root)",
        description="Bring the lab up, run a `frontend` Deployment with a pod per node, show "
        "the source address the external server sees for each pod, apply the StaticEgressIP "
        "example and show a typo being refused. The lab stays up unless --down is given.",
    )
    demo.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    demo.add_argument("--cni", choices=CNIS, default="host-gw", help="lab pod networking")
    demo.add_argument("--down", action="store_true", help="take the lab down at the end")
    demo.set_defaults(func=demo_cli.run)
    lab_cli.add_parser(sub)
    agent_cli.add_parser(sub)
    manager_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        code: int = args.func(args)
    except (BinaryNotFoundError, ControlPlaneError, LabError) as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
