"""Run a long-lived role (agent, manager) until SIGTERM or SIGINT, with one API client;
and the flags both roles must agree on."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from kubernetes_asyncio import client

from staticegress.k8s.client import api_client

GC_YOUNGEST = 50_000
"""Allocations between collections of the youngest generation (the
interpreter's default is 700). A role holds its watch caches (tens of thousands
of objects) and a sync allocates hundreds of thousands more that live until the
sync ends; at the default, the collector's passes over them took 40 % of a
sync's time at 10,000 pods (bench/sync_cost.py). Nothing here relies on the
collector promptly: our objects are freed by reference counting, and the rare
cycle waits a little longer."""


def tune_gc() -> None:
    """Collect less often (GC_YOUNGEST), and leave what the process holds at
    start-up (modules, parsed manifests) out of every later collection."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNGEST, older, oldest)
    gc.collect()  # what start-up left unreachable goes now, not frozen
    gc.freeze()


def run_service(
    kubeconfig: Path | None,
    body: Callable[[client.ApiClient], Awaitable[None]],
    *,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Run `body(api)`; a signal cancels it, then `on_stop` runs before the client closes."""

    tune_gc()

    async def main() -> int:
        api = await api_client(kubeconfig)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await body(api)
        except asyncio.CancelledError:
            if on_stop is not None:
                await on_stop()
        finally:
            await api.close()
        return 0

    return asyncio.run(main())


UNPOOLED_ENV = "STATICEGRESS_UNPOOLED_EGRESS_IPS"


def add_tenancy_flag(p: argparse.ArgumentParser) -> None:
    """`--unpooled-egress-ips`: the manager and every agent must agree on it (both
    judge who owns an address), so deploy/ sets it once, in the
    staticegress-settings ConfigMap, and both read it from the environment."""
    p.add_argument(
        "--unpooled-egress-ips",
        choices=("refuse", "allow"),
        default=os.environ.get(UNPOOLED_ENV) or "refuse",
        help="an egress IP that no StaticEgressIPPool holds: refuse it (the default: "
        "multi-tenant clusters), or honour it as before pools existed (a single-tenant "
        f"cluster's explicit opt-out). Default: ${UNPOOLED_ENV} or refuse",
    )


def require_pool(args: argparse.Namespace) -> bool:
    return bool(args.unpooled_egress_ips == "refuse")
