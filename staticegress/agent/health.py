"""The agent's HTTP endpoints: /livez, /healthz, /readyz and /metrics (aiohttp).

- /livez: 200 whenever the process's event loop answers. This is the one to
  point a liveness probe at. A root task that dies takes the process with it
  (see the agent), so a running process whose loop answers is alive;
- /healthz: 200 while every watch has heard the API server within the last
  `watch_silence` seconds (10 by default); otherwise 503 naming each silent
  watch and for how long, e.g. `watches silent: pods 12s, nodes 12s`. This is
  a report for people and monitoring, deliberately NOT a liveness probe: an
  API-server outage or a blackholed path makes every agent's watches silent
  at once, and restarting them all would fix nothing (the reflectors already
  reconnect on their own) while turning an outage into a restart loop. The
  dataplane is kept either way: an agent never clears it for lack of news;
- /readyz: 200 once the first sync has been applied and no change has waited
  longer than `max_pending` seconds: readiness means the dataplane is fresh;
- /metrics: Prometheus text format.

It listens on the node address given by flag, never on every interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from staticegress.agent.metrics import Registry

Check = Callable[[], tuple[bool, str]]


class Watch(Protocol):
    """What /healthz needs of a reflector."""

    name: str

    def silent_for(self) -> float: ...


def watches_heard(watches: Iterable[Watch], *, limit: float) -> tuple[bool, str]:
    """(False, the silent watches and for how long) if any has not heard the API
    server for more than `limit` seconds."""
    silent = [(w.name, s) for w in watches if (s := w.silent_for()) > limit]
    if silent:
        return False, "watches silent: " + ", ".join(f"{n} {s:.0f}s" for n, s in silent)
    return True, "ok"


def _alive() -> tuple[bool, str]:
    return True, "ok"


@dataclass
class HealthState:
    """What the endpoints read; the agent keeps it current."""

    watches_ok: Check
    ready: Check
    registry: Registry
    live: Check = _alive


def _answer(check: Check) -> web.Response:
    ok, why = check()
    return web.Response(status=200 if ok else 503, text=f"{why}\n")


def make_app(state: HealthState) -> web.Application:
    async def livez(_: web.Request) -> web.Response:
        return _answer(state.live)

    async def healthz(_: web.Request) -> web.Response:
        return _answer(state.watches_ok)

    async def readyz(_: web.Request) -> web.Response:
        return _answer(state.ready)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            text=state.registry.render(), content_type="text/plain", charset="utf-8"
        )

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(state: HealthState, *, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host=host, port=port).start()
    return runner
