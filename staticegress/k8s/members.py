"""MemberPublisher: write the manager's selection as StaticEgressIPMembers objects.

Given the wanted objects (`render.members`) and what the API server holds
(the manager's reflector of them), it creates what is missing, merge-patches
what differs (members lists are replaced whole, and labels the object no
longer wants are removed with a null, since a merge patch only adds keys)
and deletes what is no longer wanted, `max_in_flight` writes at a time. Only
the leader calls it. A write that fails is retried on the next run (the
caller raises `TemporaryError`), and one failing object never keeps the
others from being written.

Creations come first, then patches, then deletions, and an object is deleted
only when its name is no longer wanted: while something moves from one
object to another (a rule's pods from one shard to another, endpoint
addresses out of an object written by an older manager into their own),
both hold it for a moment, never neither.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.members import MEMBERS_PLURAL
from staticegress.api.v1alpha1 import GROUP, VERSION
from staticegress.k8s.client import REQUEST_TIMEOUT
from staticegress.render.members import same_content

log = logging.getLogger(__name__)

Json = dict[str, Any]

MERGE = "application/merge-patch+json"


class MemberPublisher:
    def __init__(self, api: client.ApiClient, *, namespace: str, max_in_flight: int = 16) -> None:
        self._custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self._slots = asyncio.Semaphore(max_in_flight)
        self.writes = 0

    async def publish(self, wanted: Mapping[str, Json], stored: Mapping[str, Json]) -> list[str]:
        """Make the stored objects (keyed `namespace/name` or `name`) match `wanted`
        (keyed by name). Returns one message per failed write."""
        held = {key.rsplit("/", 1)[-1]: obj for key, obj in stored.items()}
        creates: list[Awaitable[None]] = []
        patches: list[Awaitable[None]] = []
        for name, body in wanted.items():
            current = held.get(name)
            if current is None:
                creates.append(self._create(body))
            elif not same_content(current, body):
                patches.append(self._patch(name, body, current=current))
        errors = await self._run(creates)
        errors += await self._run(patches)
        deletes: list[Awaitable[None]] = [
            self._delete(name) for name in sorted(held) if name not in wanted
        ]
        return errors + await self._run(deletes)

    async def _run(self, calls: list[Awaitable[None]]) -> list[str]:
        async def one(call: Awaitable[None]) -> str | None:
            async with self._slots:
                try:
                    await call
                    self.writes += 1
                    return None
                except ApiException as exc:
                    return f"{exc.status} {exc.reason}"
                except (TimeoutError, OSError) as exc:
                    return f"{type(exc).__name__}: {exc}"

        results = await asyncio.gather(*(one(c) for c in calls))
        return [r for r in results if r is not None]

    async def _create(self, body: Json) -> None:
        try:
            await self._custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                MEMBERS_PLURAL,
                body,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 409:  # there already (our store lags): patch it
                raise
            # Its labels are unknown here: a stale one stays until the store
            # shows the object and the next run compares it.
            await self._patch(body["metadata"]["name"], body, current={})

    async def _patch(self, name: str, body: Json, *, current: Mapping[str, Any]) -> None:
        """Merge-patch `name` to say what `body` says; `current` is the stored
        object, whose labels that `body` lacks are removed."""
        patch = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
        for key in ("members", "service", "endpoints"):
            patch.setdefault(key, None)
        labels: dict[str, str | None] = dict(body["metadata"].get("labels") or {})
        for key in (current.get("metadata") or {}).get("labels") or {}:
            labels.setdefault(key, None)
        patch["metadata"] = {**body["metadata"], "labels": labels}
        await self._custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            MEMBERS_PLURAL,
            name,
            patch,
            _content_type=MERGE,
            _request_timeout=REQUEST_TIMEOUT,
        )

    async def _delete(self, name: str) -> None:
        try:
            await self._custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                MEMBERS_PLURAL,
                name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
