"""The `staticegress` command: one program, one subcommand per role.

Subcommands:
- `agent`: the node agent;
- `manager`: the gateway manager;
- `uninstall`: remove staticegress from a cluster and its nodes;

and the test bed, which the image leaves out:
- `controlplane binaries`: find or build etcd and the Kubernetes control plane;
- `controlplane node-binaries`: find or build what a real-runtime lab node runs;
- `controlplane up`: run a local control plane in the foreground until Ctrl-C;
- `image build` / `image pause`: build the product image / the sandbox image here;
- `lab ...`: the local cluster of network-namespace nodes and pods;
- `demo`: the local demo, on the lab.

Only the chosen subcommand's modules are imported, so `agent` and `manager`
never load the test bed (the lab, the local control plane, their
dependencies): the image does not carry it, and a node runs only what it
needs. A test-bed subcommand asked of an installation without it says so.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from staticegress import __version__

TEST_BED_PACKAGES = (
    "staticegress.lab",
    "staticegress.controlplane",
    "staticegress.cnigate",
    "staticegress.cli.lab",
    "staticegress.cli.demo",
)
"""What the image leaves out; the agent and manager paths must not import any of it."""

_MODULE_COMMANDS = {
    "agent": ("staticegress.cli.agent", "the node agent (one per node: a DaemonSet)"),
    "manager": (
        "staticegress.cli.manager",
        "the gateway manager (a Deployment of 2+ replicas; one leads)",
    ),
    "lab": (
        "staticegress.cli.lab",
        "a local cluster of network-namespace nodes and pods (root, Linux)",
    ),
    "uninstall": (
        "staticegress.cli.uninstall",
        "remove staticegress from the cluster and clean every node",
    ),
}
"""Subcommands whose parser lives in their own module: name -> (module, help)."""

_EXPECTED_ERRORS = (
    ("staticegress.controlplane.binaries", "BinaryNotFoundError"),
    ("staticegress.controlplane.cluster", "ControlPlaneError"),
    ("staticegress.controlplane.images", "ImageBuildError"),
    ("staticegress.lab.netns", "LabError"),
)
"""Failures reported as one line, without a traceback, when their module is loaded."""


class NotInstalledError(RuntimeError):
    """A test-bed subcommand in an installation without the test bed (the image)."""


def _say(line: str) -> None:
    print(f"[staticegress] {line}", file=sys.stderr, flush=True)


def _import(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(TEST_BED_PACKAGES):
            raise NotInstalledError(
                f"{module} is not part of this installation (the image carries only "
                "`agent` and `manager`; the test bed needs a source checkout)"
            ) from exc
        raise


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler that imports its module only when it runs."""

    def run(args: argparse.Namespace) -> int:
        handler: Callable[[argparse.Namespace], int] = getattr(_import(module), function)
        return handler(args)

    return run


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _print_paths(found: object) -> None:
    for name, path in vars(found).items():
        print(f"{name.replace('_', '-'):24} {path}")


def _cmd_binaries(args: argparse.Namespace) -> int:
    binaries = _import("staticegress.controlplane.binaries")
    _print_paths(binaries.ensure_binaries(progress=_say))
    return 0


def _cmd_node_binaries(args: argparse.Namespace) -> int:
    binaries = _import("staticegress.controlplane.binaries")
    _print_paths(binaries.ensure_node_binaries(progress=_say))
    return 0


def _cmd_image_build(args: argparse.Namespace) -> int:
    images = _import("staticegress.controlplane.images")
    built = images.ensure_product_image(progress=_say)
    print(f"{built.ref} {built.archive}")
    return 0


def _cmd_image_pause(args: argparse.Namespace) -> int:
    images = _import("staticegress.controlplane.images")
    built = images.ensure_pause_image(progress=_say)
    print(f"{built.ref} {built.archive}")
    return 0


def _cmd_controlplane_up(args: argparse.Namespace) -> int:
    binaries = _import("staticegress.controlplane.binaries")
    cluster = _import("staticegress.controlplane.cluster")
    found = binaries.ensure_binaries(progress=_say)
    with cluster.ControlPlane(binaries=found, bind_address=args.bind_address, progress=_say) as cp:
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
    from staticegress.k8s.client import api_client
    from staticegress.k8s.crd import install_crd

    api = await api_client(kubeconfig)
    try:
        await install_crd(api)
    finally:
        await api.close()
    _say("StaticEgressIP CRD installed and Established")


def _add_controlplane(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cp = sub.add_parser("controlplane", help="the local Kubernetes control plane (tests, demo)")
    cp_sub = cp.add_subparsers(dest="cp_command", required=True, metavar="ACTION")
    b = cp_sub.add_parser(
        "binaries",
        help="find or build etcd, kube-apiserver, kube-controller-manager, kube-scheduler",
        description="Find each binary (TEST_ASSET_*, KUBEBUILDER_ASSETS, the build cache, "
        "PATH) or build it from the pinned Go modules into the cache; print the paths.",
    )
    b.set_defaults(func=_cmd_binaries)
    nb = cp_sub.add_parser(
        "node-binaries",
        help="find or build kubelet, kube-proxy, containerd, ctr, the runc shim",
        description="What a real-runtime lab node runs: kubelet and kube-proxy (the control "
        "plane's Kubernetes module), containerd, ctr and containerd-shim-runc-v2 (a module of "
        "their own), found like the control plane's binaries (TEST_ASSET_KUBELET, ...) or "
        "built into the cache; runc and the CNI plugins from Debian. Print the paths.",
    )
    nb.set_defaults(func=_cmd_node_binaries)
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


def _add_image(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    img = sub.add_parser("image", help="build the container images on this machine (root)")
    img_sub = img.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = img_sub.add_parser(
        "build",
        help=f"build localhost/staticegress:{__version__} from Debian packages, no registry",
        description="Make a Debian base with mmdebstrap, download the pinned wheels, build the "
        "CNI gate plugin, and run the Containerfile with podman, offline. The image is tagged "
        "in podman's store and saved as an OCI archive in the cache (for `ctr images import`); "
        "unchanged inputs reuse it. Print the reference and the archive's path.",
    )
    build.set_defaults(func=_cmd_image_build)
    pause = img_sub.add_parser(
        "pause",
        help="build the pod sandbox (pause) image for the lab's real-runtime nodes",
        description="Compile the static pause program into a one-file image and save it as an "
        "OCI archive in the cache. Print the reference and the archive's path.",
    )
    pause.set_defaults(func=_cmd_image_pause)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser], *, full: bool) -> None:
    help_text = "the local demo, on the lab (root)"
    if not full:
        sub.add_parser("demo", help=help_text)
        return
    cnis = _import("staticegress.lab.plan").CNIS
    demo = sub.add_parser(
        "demo",
        help=help_text,
        description="Bring the lab up, run a `frontend` Deployment with a pod per node, show "
        "the source address the external server sees for each pod, apply the StaticEgressIP "
        "example and show a typo being refused. The lab stays up unless --down is given.",
    )
    demo.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    demo.add_argument("--cni", choices=cnis, default="host-gw", help="lab pod networking")
    demo.add_argument("--down", action="store_true", help="take the lab down at the end")
    demo.set_defaults(func=_lazy("staticegress.cli.demo", "run"))


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line: the first word that is not an option.

    The top-level options take no values, so this is exact.
    """
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module (from `argv`) is imported.

    Without `argv` every subcommand is loaded in full (tests, documentation).
    """
    parser = argparse.ArgumentParser(
        prog="staticegress",
        description="Fixed source IPs for chosen workloads' traffic leaving a Kubernetes cluster.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _chosen_command(argv)
    for name, (module, help_text) in _MODULE_COMMANDS.items():
        if argv is None or chosen == name:
            _import(module).add_parser(sub)
        else:
            # Listed in --help, never run: a chosen command gets its full parser.
            sub.add_parser(name, help=help_text)
    _add_controlplane(sub)
    _add_image(sub)
    _add_demo(sub, full=argv is None or chosen == "demo")
    return parser


def _expected(exc: BaseException) -> bool:
    if isinstance(exc, NotInstalledError):
        return True
    for module, name in _EXPECTED_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        code: int = args.func(args)
    except Exception as exc:
        if not _expected(exc):
            raise
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
