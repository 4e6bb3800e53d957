"""The agent's HTTP endpoints: /healthz, /readyz and /metrics (aiohttp).

- /healthz: 200 while the process runs and every watch has been connected
  within `watch_grace` seconds; a wedged watch makes the kubelet restart us
  (the dataplane survives restarts, see the agent's shutdown note);
- /readyz: 200 once the first sync has been applied and no change has waited
  longer than `max_pending` seconds: readiness means the dataplane is fresh;
- /metrics: Prometheus text format.

It listens on the node address given by flag, never on every interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from staticegress.agent.metrics import Registry


@dataclass
class HealthState:
    """What the endpoints read; the agent keeps it current."""

    watches_ok: Callable[[], tuple[bool, str]]
    ready: Callable[[], tuple[bool, str]]
    registry: Registry


def make_app(state: HealthState) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        ok, why = state.watches_ok()
        return web.Response(status=200 if ok else 503, text=f"{why}\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, why = state.ready()
        return web.Response(status=200 if ok else 503, text=f"{why}\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            text=state.registry.render(), content_type="text/plain", charset="utf-8"
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(state: HealthState, *, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host=host, port=port).start()
    return runner
