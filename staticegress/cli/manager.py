"""`staticegress manager`: argument parsing for the gateway manager."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from ipaddress import ip_network
from pathlib import Path

from kubernetes_asyncio import client

from staticegress.cli.service import add_tenancy_flag, require_pool, run_service
from staticegress.dataplane.grants import GRANT_PORT, load_key
from staticegress.manager.manager import MANAGER_HEALTH_PORT, Manager, ManagerOptions
from staticegress.model.assign import DEFAULT_GATEWAY_LABEL

log = logging.getLogger("staticegress.manager")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "manager",
        help="the gateway manager (a Deployment of 2+ replicas; one leads)",
        description="Probe every node (ICMP, every 100 ms); the leader, elected through a "
        "Lease, assigns each egress IP to a healthy gateway node and writes every "
        "StaticEgressIP's status, moving IPs off a node that stops answering within a "
        "fraction of a second.",
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    p.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name in the Lease (default: $POD_NAME or host-pid)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "staticegress-system"),
        help="namespace of the Lease (default: $POD_NAMESPACE or staticegress-system)",
    )
    p.add_argument("--lease-duration", type=float, default=2.0)
    p.add_argument("--probe-interval", type=float, default=0.1)
    p.add_argument(
        "--down-after",
        type=int,
        default=3,
        help="missed heartbeats before a node counts as down (default: 3)",
    )
    p.add_argument(
        "--up-after",
        type=int,
        default=5,
        help="answered heartbeats before a node counts as up again (default: 5)",
    )
    p.add_argument(
        "--gateway-label",
        default="=".join(DEFAULT_GATEWAY_LABEL),
        help="nodes eligible as gateways when a rule has no gateway-selector "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--grant-key-file",
        default=os.environ.get("GRANT_KEY_FILE", "/etc/staticegress/grant/key"),
        help="the cluster's grant key (the Secret staticegress-grant-key, mounted); grants "
        "let gateways hold their egress IPs (default: $GRANT_KEY_FILE or "
        "/etc/staticegress/grant/key)",
    )
    p.add_argument(
        "--grant-port",
        type=int,
        default=GRANT_PORT,
        help=f"agents' UDP port (default: {GRANT_PORT})",
    )
    add_tenancy_flag(p)
    p.add_argument(
        "--cluster-cidr",
        action="append",
        type=ip_network,
        default=[],
        metavar="CIDR",
        help="a pod range besides the Nodes' podCIDRs, never an egress IP (repeatable)",
    )
    p.add_argument(
        "--forbidden-cidr",
        action="append",
        type=ip_network,
        default=[],
        metavar="CIDR",
        help="addresses never used as egress IPs, whatever a pool holds: routers' "
        "virtual addresses, VIPs (repeatable)",
    )
    p.add_argument("--health-address", default="127.0.0.1")
    p.add_argument(
        "--health-port",
        type=int,
        default=MANAGER_HEALTH_PORT,
        help=f"0 disables (default: {MANAGER_HEALTH_PORT})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key, _, value = args.gateway_label.partition("=")
    try:
        grant_key = load_key(args.grant_key_file)
    except (OSError, ValueError) as exc:
        print(f"staticegress manager: cannot read the grant key: {exc}", file=sys.stderr)
        return 2
    opts = ManagerOptions(
        identity=args.identity,
        namespace=args.namespace,
        lease_duration=args.lease_duration,
        probe_interval=args.probe_interval,
        down_after=args.down_after,
        up_after=args.up_after,
        default_label=(key, value),
        health_address=args.health_address,
        health_port=args.health_port,
        grant_key=grant_key,
        grant_port=args.grant_port,
        require_pool=require_pool(args),
        cluster_cidrs=tuple(args.cluster_cidr),
        forbidden_cidrs=tuple(args.forbidden_cidr),
    )
    managers: list[Manager] = []

    async def body(api: client.ApiClient) -> None:
        managers.append(Manager(api, opts))
        await managers[0].run()

    async def stopped() -> None:
        log.info("manager=%s stopping", opts.identity)
        if managers:
            await managers[0].elector.release()

    return run_service(Path(args.kubeconfig) if args.kubeconfig else None, body, on_stop=stopped)
