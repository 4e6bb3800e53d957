"""`staticegress manager`: argument parsing for the gateway manager."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from staticegress.k8s.client import api_client
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
    return asyncio.run(_main(opts, Path(args.kubeconfig) if args.kubeconfig else None))


async def _main(opts: ManagerOptions, kubeconfig: Path | None) -> int:
    api = await api_client(kubeconfig)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    manager = Manager(api, opts)
    try:
        await manager.run()
    except asyncio.CancelledError:
        log.info("manager=%s stopping", opts.identity)
        await manager.elector.release()
    finally:
        await api.close()
    return 0
