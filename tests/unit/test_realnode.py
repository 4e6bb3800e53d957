"""Real-runtime lab nodes share one host: every path their containerd and kubelet
configurations name must be the node's own, or a read-only host file.

A path two nodes share is a race between them: containerd's default NRI socket
(/var/run/nri/nri.sock) is unlinked and bound by each node's containerd in turn,
and when nodes boot together one loses with "bind: address already in use" and
exits. These checks read the configurations the lab writes, as the daemons do.

A node also boots with its own boot clock, so that what runs on it sees the
node's boot time, not the host's.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import pytest

from staticegress.lab import plan, realnode

TOOLS = realnode.NodeTools(
    kubelet="/cache/kubelet",
    kube_proxy="/cache/kube-proxy",
    containerd="/cache/containerd",
    ctr="/cache/ctr",
    shim="/cache/containerd-shim-runc-v2",
    runc="/usr/sbin/runc",
    cni_plugins="/usr/lib/cni",
)
IMAGES = realnode.NodeImages(
    pause_archive="/cache/pause.tar",
    pause_ref="localhost/staticegress-pause:3.10",
    product_archive="/cache/product.tar",
    product_ref="localhost/staticegress:0.1.0",
)
READ_ONLY = {TOOLS.runc, "/etc/resolv.conf"}
"""Host files a node reads and never writes."""

NODES = plan.node_plans(3)


def _paths(value: Any) -> Iterator[str]:
    """Every absolute path (or unix socket address) among a document's strings."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _paths(item)
    elif isinstance(value, str):
        path = value.removeprefix("unix://")
        if path.startswith("/"):
            yield path


def _node_private(node: plan.NodePlan, path: str) -> bool:
    """Inside the node's directory or under one of its bind mounts."""
    roots = [realnode.node_dir(node.name), *(PurePosixPath(t) for t, _ in realnode.MOUNTS)]
    return any(PurePosixPath(path).is_relative_to(root) for root in roots)


def _containerd(node: plan.NodePlan) -> dict[str, Any]:
    return tomllib.loads(realnode._containerd_config(node, TOOLS, IMAGES))


def _kubelet(node: plan.NodePlan) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(realnode._kubelet_config(node))
    return loaded


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.name)
def test_every_path_the_node_daemons_write_is_the_nodes_own(node: plan.NodePlan) -> None:
    for config in (_containerd(node), _kubelet(node)):
        shared = [p for p in _paths(config) if p not in READ_ONLY and not _node_private(node, p)]
        assert not shared, f"{node.name} would share these host paths: {shared}"


def test_containerd_runs_no_nri_socket() -> None:
    for node in NODES:
        nri = _containerd(node)["plugins"]["io.containerd.nri.v1.nri"]
        assert nri == {"disable": True}, nri


def test_containerd_host_defaults_are_configured_away() -> None:
    """Each default that would land on the host is replaced by a node path."""
    opts = {_containerd(n)["plugins"]["io.containerd.internal.v1.opt"]["path"] for n in NODES}
    # Distinct per node, or the nodes would still meet there.
    assert len(opts) == len(NODES), opts
    for node in NODES:
        opt = _containerd(node)["plugins"]["io.containerd.internal.v1.opt"]["path"]
        assert PurePosixPath(opt).is_relative_to(realnode.node_dir(node.name)), opt
        assert not any(opt.startswith(d) for d in realnode.HOST_DEFAULTS), opt


def test_a_node_boots_with_its_own_boot_clock() -> None:
    argv = realnode.holder_argv(NODES[0], "direct", 3, uptime=5025.97)
    unshare = argv[: argv.index("--", argv.index("unshare"))]
    assert "--time" in unshare
    # Whole seconds down: the node's clock starts just above zero, never below.
    assert "--boottime=-5025" in unshare
    assert realnode.host_uptime() > 0
