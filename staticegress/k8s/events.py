"""Record Events on StaticEgressIP objects, once per distinct problem.

An agent re-derives its problems on every sync; without de-duplication a
broken object would get an Event (and a log line) per sync per node. A
problem is reported when it first appears and again only if it goes away
and comes back.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterable

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.types import EgressIPRef
from staticegress.api.v1alpha1 import API_VERSION, KIND
from staticegress.k8s.client import REQUEST_TIMEOUT

log = logging.getLogger(__name__)

Key = tuple[EgressIPRef, str, str]


class EventRecorder:
    def __init__(self, api: client.ApiClient | None, *, component: str, host: str) -> None:
        self._core = client.CoreV1Api(api) if api is not None else None
        self._component = component
        self._host = host
        self._active: set[Key] = set()
        self.emitted = 0

    async def report(self, problems: Iterable[tuple[EgressIPRef, str, str, str]]) -> None:
        """`problems`: (ref, uid, reason, message) present now. Emits the new ones."""
        current: dict[Key, str] = {(ref, reason, msg): uid for ref, uid, reason, msg in problems}
        for key in sorted(set(current) - self._active, key=str):
            ref, reason, message = key
            log.warning("egressip=%s reason=%s node=%s %s", ref, reason, self._host, message)
            await self._emit(ref, current[key], reason, message)
        self._active = set(current)

    async def emit(
        self, ref: EgressIPRef, uid: str, reason: str, message: str, *, kind: str = "Warning"
    ) -> None:
        """Record one Event now (for transitions, which need no de-duplication)."""
        await self._emit(ref, uid, reason, message, kind=kind)

    async def _emit(
        self, ref: EgressIPRef, uid: str, reason: str, message: str, *, kind: str = "Warning"
    ) -> None:
        if self._core is None:
            return
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{ref.name}.{uuid.uuid4().hex[:12]}", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": self._component, "host": self._host},
            "reportingComponent": self._component,
            "reportingInstance": self._host,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._core.create_namespaced_event(
                ref.namespace, body, _request_timeout=REQUEST_TIMEOUT
            )
            self.emitted += 1
        except ApiException as exc:
            # An Event is best effort; losing one must never stop a sync.
            log.warning("event for %s not recorded: %s %s", ref, exc.status, exc.reason)
        except Exception as exc:
            log.warning("event for %s not recorded: %s", ref, exc)
