"""`staticegress agent`: argument parsing for the node agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from ipaddress import IPv4Network
from pathlib import Path

from staticegress.agent.agent import AGENT_HEALTH_PORT, Agent, AgentOptions, cleanup
from staticegress.cli.service import add_tenancy_flag, require_pool, run_service
from staticegress.dataplane.bpfcheck import BPFFS
from staticegress.dataplane.cnigate import (
    DEFAULT_BINARY,
    DEFAULT_READY_FILE,
    DEFAULT_WAIT_SECONDS,
    GateConfig,
)
from staticegress.dataplane.grants import GRANT_PORT, load_key
from staticegress.dataplane.host import PROC_SYS
from staticegress.render.nft import MarkLayout

log = logging.getLogger("staticegress.agent")


def _int(text: str) -> int:
    return int(text, 0)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "agent",
        help="the node agent (one per node: a DaemonSet)",
        description="Watch StaticEgressIPs, pods, services and nodes; program this node as a "
        "director (steer selected pods to their gateway) and as a gateway (own egress IPs "
        "and SNAT). Leaves the dataplane in place when it stops; --cleanup removes it.",
    )
    p.add_argument(
        "--node", default=os.environ.get("NODE_NAME"), help="this node's name (default: $NODE_NAME)"
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    p.add_argument(
        "--transport",
        choices=["auto", "direct", "vxlan"],
        default="auto",
        help="direct: pod IPs are routable between nodes; vxlan: our own tunnel. "
        "auto follows the cluster's decision (ConfigMap staticegress-transport in "
        "--namespace), which the first agent records: direct only if every node's pod "
        "range is routed via that node's address on our uplink (default: auto)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE") or "staticegress-system",
        help="the agent's namespace, where the cluster's transport is recorded "
        "(default: $POD_NAMESPACE or staticegress-system)",
    )
    add_tenancy_flag(p)
    p.add_argument(
        "--cluster-cidr",
        action="append",
        type=IPv4Network,
        default=[],
        metavar="CIDR",
        help="a range never steered, besides the Nodes' pod ranges "
        "and addresses (repeatable; needed for CNIs that leave podCIDR empty)",
    )
    p.add_argument(
        "--health-address",
        help="address for /healthz, /readyz, /metrics (default: the node's InternalIP)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=AGENT_HEALTH_PORT,
        help=f"0 disables (default: {AGENT_HEALTH_PORT})",
    )
    p.add_argument(
        "--min-sync-interval",
        type=float,
        default=0.05,
        help="seconds between syncs at most (coalescing; default: 0.05)",
    )
    p.add_argument(
        "--resync-interval",
        type=float,
        default=60.0,
        help="seconds between periodic full resyncs (default: 60)",
    )
    p.add_argument(
        "--mark-mask",
        type=_int,
        default=0x3F000000,
        help="packet-mark bits for gateway slots (default: 0x3f000000)",
    )
    p.add_argument(
        "--return-mark",
        type=_int,
        default=0x40000000,
        help="packet-mark bit for replies through the tunnel (default: 0x40000000)",
    )
    p.add_argument("--table-base", type=int, default=7300, help="first routing table we use")
    p.add_argument("--rule-priority", type=int, default=100, help="priority of our ip rules")
    p.add_argument(
        "--ownership",
        choices=["grants", "status-only"],
        default="grants",
        help="grants: hold an egress IP only while a manager's grant covers it, enforced by "
        "the kernel (safe under partitions; see docs/fault-model.md). status-only: follow "
        "the status alone, for clusters without managers; a partitioned gateway keeps its "
        "IPs (default: grants)",
    )
    p.add_argument(
        "--selection",
        choices=["published", "local"],
        default="published",
        help="published: watch only this node's pods and take the other nodes' selected "
        "pods from the manager's StaticEgressIPMembers (memory and watch traffic follow the "
        "node, not the cluster). local: watch every pod and select everything here, for "
        "clusters without managers (default: published)",
    )
    p.add_argument(
        "--grant-key-file",
        default=os.environ.get("GRANT_KEY_FILE", "/etc/staticegress/grant/key"),
        help="the cluster's grant key (the Secret staticegress-grant-key, mounted) "
        "(default: $GRANT_KEY_FILE or /etc/staticegress/grant/key)",
    )
    p.add_argument(
        "--grant-port", type=int, default=GRANT_PORT, help=f"UDP port (default: {GRANT_PORT})"
    )
    p.add_argument(
        "--grant-address",
        default=os.environ.get("NODE_IP"),
        help="address to accept grants on, known at start so a restarted agent renews at "
        "once (default: $NODE_IP, else the node's InternalIP once listed)",
    )
    p.add_argument(
        "--cni-conf-dir",
        type=Path,
        metavar="DIR",
        help="the container runtime's CNI config dir, as mounted (e.g. /host/etc/cni/net.d): "
        "with --cni-bin-dir, install the CNI gate, which holds new pods after a reboot until "
        "this node is programmed (default: no gate)",
    )
    p.add_argument(
        "--cni-bin-dir",
        type=Path,
        metavar="DIR",
        help="the container runtime's CNI plugin dir, as mounted (e.g. /host/opt/cni/bin)",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        default=DEFAULT_READY_FILE,
        metavar="PATH",
        help="written after the first sync since boot to let held pods through; the same path "
        f"on the host (default: {DEFAULT_READY_FILE})",
    )
    p.add_argument(
        "--cni-gate-binary",
        type=Path,
        default=DEFAULT_BINARY,
        metavar="PATH",
        help=f"the gate plugin to copy into --cni-bin-dir (default: {DEFAULT_BINARY})",
    )
    p.add_argument(
        "--cni-gate-wait",
        type=int,
        default=DEFAULT_WAIT_SECONDS,
        metavar="SECONDS",
        help="how long the gate holds a pod's sandbox before the runtime retries it "
        f"(default: {DEFAULT_WAIT_SECONDS})",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove every rule, route, address and link we own (and, with the CNI options, "
        "the CNI gate and its ready file), then exit",
    )
    p.add_argument(
        "--uplink",
        help="with --cleanup: the interface egress IPs were added to "
        "(default: every interface holding an address with our label)",
    )
    p.add_argument(
        "--proc-sys",
        type=Path,
        default=PROC_SYS,
        metavar="DIR",
        help="where the node's /proc/sys is writable: in a container /proc/sys is read-only, "
        "so the DaemonSet mounts the node's /proc/sys/net at /host/proc/sys/net and passes "
        f"/host/proc/sys (default: {PROC_SYS})",
    )
    p.add_argument(
        "--sysctl-record",
        type=Path,
        metavar="PATH",
        help="keep the node settings we change as they were before our first write since boot "
        "in this file (on a tmpfs such as /run), for --cleanup to restore (default: not kept)",
    )
    p.add_argument(
        "--bpffs",
        type=Path,
        default=BPFFS,
        metavar="DIR",
        help="the node's BPF filesystem, read to detect eBPF dataplanes that bypass netfilter "
        f"(default: {BPFFS})",
    )
    p.set_defaults(func=run)


def _cni_gate(args: argparse.Namespace) -> GateConfig | None:
    if args.cni_conf_dir is None and args.cni_bin_dir is None:
        return None
    if args.cni_conf_dir is None or args.cni_bin_dir is None:
        raise ValueError("--cni-conf-dir and --cni-bin-dir go together")
    if not 0 <= args.cni_gate_wait <= 120:
        raise ValueError("--cni-gate-wait must be within 0..120 seconds")
    return GateConfig(
        conf_dir=args.cni_conf_dir,
        bin_dir=args.cni_bin_dir,
        binary=args.cni_gate_binary,
        ready_file=args.ready_file,
        wait_seconds=args.cni_gate_wait,
    )


def run(args: argparse.Namespace) -> int:
    try:
        cni_gate = _cni_gate(args)
    except ValueError as exc:
        print(f"staticegress agent: {exc}", file=sys.stderr)
        return 2
    if args.cleanup:
        errors = asyncio.run(
            cleanup(
                netns=None,
                uplink=args.uplink,
                cni_gate=cni_gate,
                proc_sys=args.proc_sys,
                sysctl_record=args.sysctl_record,
            )
        )
        for e in errors:
            log.error("cleanup: %s", e)
        log.info("cleanup done%s", f" with {len(errors)} errors" if errors else "")
        return 1 if errors else 0
    if not args.node:
        print("staticegress agent: --node or $NODE_NAME is required", file=sys.stderr)
        return 2
    if args.mark_mask & args.return_mark:
        print("staticegress agent: --mark-mask and --return-mark overlap", file=sys.stderr)
        return 2
    grant_key = None
    if args.ownership == "grants":
        try:
            grant_key = load_key(args.grant_key_file)
        except (OSError, ValueError) as exc:
            print(f"staticegress agent: cannot read the grant key: {exc}", file=sys.stderr)
            return 2
    opts = AgentOptions(
        node=args.node,
        transport=args.transport,
        cluster_cidrs=tuple(args.cluster_cidr),
        require_pool=require_pool(args),
        health_address=args.health_address,
        health_port=args.health_port,
        min_sync_interval=args.min_sync_interval,
        resync_interval=args.resync_interval,
        marks=MarkLayout(slot_mask=args.mark_mask, return_bit=args.return_mark),
        table_base=args.table_base,
        rule_priority=args.rule_priority,
        ownership=args.ownership,
        selection=args.selection,
        grant_key=grant_key,
        grant_port=args.grant_port,
        grant_address=args.grant_address,
        namespace=args.namespace,
        cni_gate=cni_gate,
        proc_sys=str(args.proc_sys),
        sysctl_record=str(args.sysctl_record) if args.sysctl_record else None,
        bpffs=str(args.bpffs),
    )

    async def stopped() -> None:
        # Deliberately no cleanup: the dataplane stays as it is (see the agent module).
        log.info("node=%s agent stopping; dataplane left in place", opts.node)

    return run_service(
        Path(args.kubeconfig) if args.kubeconfig else None,
        lambda api: Agent(api, opts).run(),
        on_stop=stopped,
    )
