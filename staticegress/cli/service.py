"""Run a long-lived role (agent, manager) until SIGTERM or SIGINT, with one API client."""

from __future__ import annotations

import asyncio
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
