"""Run a long-lived role (agent, manager) until SIGTERM or SIGINT, with one API client;
and the flags both roles must agree on."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from kubernetes_asyncio import client

from staticegress.k8s.client import api_client


def run_service(
    kubeconfig: Path | None,
    body: Callable[[client.ApiClient], Awaitable[None]],
    *,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Run `body(api)`; a signal cancels it, then `on_stop` runs before the client closes."""

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
