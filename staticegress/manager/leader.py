"""Leader election on a coordination.k8s.io Lease, with fencing by local time.

The holder renews every `renew_interval`; a candidate takes over when the
Lease record has not changed for `duration` seconds by its *own* monotonic
clock (observed time, as client-go does), so clock skew between replicas
cannot shorten a lease. Writes use the Lease's resourceVersion, so two
candidates never both win.

`is_leader()` is what every status write checks first: it turns False as
soon as the last successful renewal is older than `duration - margin`,
before any other replica may take over, so a leader that cannot renew (cut
off from the API server) stops writing at once.

The Lease also carries what the leader publishes for every replica (the
grant map, in annotations): the holder writes `annotations()` with every
renewal and at once on `publish()`; every replica keeps the last annotations
it read in `observed_annotations`. Standbys read the Lease every
`poll_interval`, more often than the leader renews, so they learn a new map
quickly.

A *reluctant* replica (its own view of the nodes is implausible, see
staticegress.model.ownership) gives the Lease up and does not take it while
another replica could: only once the Lease has gone unrenewed for
`duration + vacancy_grace`. A replica that took it that way keeps it (someone
must lead), so reluctant replicas do not pass the Lease back and forth.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.k8s.client import REQUEST_TIMEOUT

log = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 2.0,
        renew_interval: float = 0.5,
        margin: float = 0.5,
        poll_interval: float = 0.2,
        vacancy_grace: float = 5.0,
        annotations: Callable[[], dict[str, str]] = dict,
        on_change: Callable[[bool], None] = lambda leader: None,
    ) -> None:
        self._leases = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration, self.renew_interval, self.margin = duration, renew_interval, margin
        self._on_change = on_change
        self._valid_until = 0.0
        self._leader = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.transitions = 0
        self.poll_interval, self.vacancy_grace = poll_interval, vacancy_grace
        self._annotations = annotations
        self.observed_annotations: dict[str, str] = {}
        self.last_read = float("-inf")
        self.reluctant = False
        self._took_reluctantly = False
        self._lock = asyncio.Lock()

    def is_leader(self) -> bool:
        return self._leader and time.monotonic() < self._valid_until

    def _set(self, leader: bool) -> None:
        if leader != self._leader:
            self._leader = leader
            log.info(
                "manager=%s %s",
                self.identity,
                "became the leader" if leader else "is no longer the leader",
            )
            self._on_change(leader)

    def _body(self, transitions: int, acquire: str | None, rv: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "annotations": self._annotations(),
        }
        if rv:
            meta["resourceVersion"] = rv
        now = _now()
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.duration)),
                "acquireTime": acquire or now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    async def _attempt(self) -> None:
        start = time.monotonic()
        try:
            lease = await self._leases.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            await self._leases.create_namespaced_lease(
                self.namespace, self._body(0, None, None), _request_timeout=REQUEST_TIMEOUT
            )
            self._won(start)
            return
        spec = lease.spec
        self.observed_annotations = dict(lease.metadata.annotations or {})
        self.last_read = time.monotonic()
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, start
        rv = lease.metadata.resource_version
        transitions = spec.lease_transitions or 0
        if not self.reluctant:
            self._took_reluctantly = False
        if spec.holder_identity == self.identity and self.reluctant and not self._took_reluctantly:
            await self._step_down(lease)
            return
        if spec.holder_identity == self.identity:
            acquire = (
                spec.acquire_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if spec.acquire_time else None
            )
            await self._leases.replace_namespaced_lease(
                self.name,
                self.namespace,
                self._body(transitions, acquire, rv),
                _request_timeout=REQUEST_TIMEOUT,
            )
            self._won(start)
        elif not spec.holder_identity or start - self._observed_at > self.duration:
            if self.reluctant:
                if start - self._observed_at <= self.duration + self.vacancy_grace:
                    self._set(False)
                    return  # leave it to a replica with a better view
                self._took_reluctantly = True
            await self._leases.replace_namespaced_lease(
                self.name,
                self.namespace,
                self._body(transitions + 1, None, rv),
                _request_timeout=REQUEST_TIMEOUT,
            )
            self.transitions += 1
            log.info(
                "manager=%s took the lease from %s", self.identity, spec.holder_identity or "nobody"
            )
            self._won(start)
        else:
            self._set(False)

    def _won(self, start: float) -> None:
        self._valid_until = start + self.duration - self.margin
        self._set(True)

    async def _step_down(self, lease: Any) -> None:
        """Give the Lease up, keeping its annotations, so another replica leads."""
        self._set(False)
        self._valid_until = 0.0
        body = self._body(lease.spec.lease_transitions or 0, None, lease.metadata.resource_version)
        body["spec"]["holderIdentity"] = ""
        body["metadata"]["annotations"] = dict(lease.metadata.annotations or {})
        await self._leases.replace_namespaced_lease(
            self.name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT
        )
        log.warning("manager=%s stepped down: its view of the nodes is implausible", self.identity)

    async def publish(self) -> bool:
        """Renew now, so what `annotations()` returns reaches the other replicas
        without waiting for the next renewal. True if it was written as leader."""
        async with self._lock:
            try:
                await self._attempt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("manager=%s publish failed: %s", self.identity, exc)
                return False
            return self.is_leader()

    async def run(self) -> None:
        while True:
            try:
                async with self._lock:
                    await self._attempt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A conflict means someone else wrote first; anything else means
                # we cannot renew. Either way, leadership lapses on its own time.
                log.debug("manager=%s lease attempt failed: %s", self.identity, exc)
            if self._leader and time.monotonic() >= self._valid_until:
                self._set(False)
            await asyncio.sleep(self.renew_interval if self._leader else self.poll_interval)

    async def release(self) -> None:
        """Give the lease up on a clean shutdown, so a standby takes over at once."""
        if not self.is_leader():
            return
        self._set(False)
        try:
            lease = await self._leases.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
            if lease.spec.holder_identity == self.identity:
                body = self._body(
                    lease.spec.lease_transitions or 0, None, lease.metadata.resource_version
                )
                body["spec"]["holderIdentity"] = ""
                await self._leases.replace_namespaced_lease(
                    self.name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT
                )
        except Exception as exc:
            log.warning("manager=%s could not release the lease: %s", self.identity, exc)
