"""`staticegress manager`: argument parsing for the gateway manager."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from kubernetes_asyncio import client

from staticegress.cli.service import run_service
from staticegress.manager.manager import Manager, ManagerOptions
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
    p.add_argument("--health-address", default="127.0.0.1")
    p.add_argument("--health-port", type=int, default=9810, help="0 disables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key, _, value = args.gateway_label.partition("=")
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
