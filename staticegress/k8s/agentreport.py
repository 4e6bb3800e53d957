"""Agent reports: each node's `AgentRecord`, published as a Lease the manager watches.

One `coordination.k8s.io/v1` Lease per node, `staticegress-agent-<node>` in
the agents' namespace, labelled `app.kubernetes.io/component=
staticegress-agent-report`, holding the record as compact JSON in the
annotation `staticegress.io/agent-report`:

    {"applied": {"ns/name": generation}, "fenced": bool,
     "withheld": ["ip"], "owned": ["ip"], "subnet": "cidr", "routers": ["ip"]}

`subnet` and `routers` (the uplink's connected subnet and default next hops)
let the manager refuse the router's address as an egress IP. A node could lie
about them; the manager believes a router only inside that node's own subnet
(`staticegress.model.pools.trusted_routers`), so a lie can refuse addresses
near that node, never hand one out.

A Lease because it is small, namespaced, meant for per-holder records, and
every cluster has it; nobody takes the lease, `renewTime` only says when the
record last changed.

Invariants of `AgentReporter`, the agent's side:
- `publish()` never waits and never fails: the sync hands over its record
  and goes on; writing happens in the reporter's own task;
- only the newest record is written, at most once per `min_interval`, and
  only when it differs from the one last written (a resync that changes
  nothing writes nothing);
- a failed write is retried after a growing delay; the first failure of a
  run of failures is logged as a warning, the rest only at debug level.

The manager's side, `records_from_store`, parses at the edge: a record that
cannot be read counts as absent (that node confirms nothing), and the node a
record speaks for is taken from the Lease's name, which the admission policy
in deploy/rbac/agent.yaml ties to the writer, never from its content.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from ipaddress import ip_address, ip_network
from typing import Any, Protocol

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.types import EgressIPRef, IPAddress, NodeName
from staticegress.k8s.client import REQUEST_TIMEOUT
from staticegress.model.programmed import AgentRecord

log = logging.getLogger(__name__)

NAME_PREFIX = "staticegress-agent-"
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "staticegress-agent-report"
LABEL_SELECTOR = f"{COMPONENT_LABEL}={COMPONENT}"
ANNOTATION = "staticegress.io/agent-report"
MERGE = "application/merge-patch+json"


def lease_name(node: NodeName) -> str:
    return f"{NAME_PREFIX}{node}"


def encode(record: AgentRecord) -> str:
    """Compact, deterministic JSON: equal records give equal strings."""
    body: dict[str, object] = {
        "applied": {str(ref): gen for ref, gen in sorted(record.applied.items())},
        "fenced": record.fenced,
        "withheld": [str(ip) for ip in sorted(record.withheld, key=_ip_key)],
        "owned": [str(ip) for ip in sorted(record.owned, key=_ip_key)],
    }
    if record.subnet is not None:
        body["subnet"] = str(record.subnet)
    if record.routers:
        body["routers"] = [str(ip) for ip in sorted(record.routers, key=_ip_key)]
    return json.dumps(body, separators=(",", ":"))


def _ip_key(ip: IPAddress) -> tuple[int, int]:
    return (ip.version, int(ip))


def decode(node: NodeName, text: str) -> AgentRecord:
    """Parse a record's JSON; raises ValueError (or KeyError/TypeError) if malformed."""
    body = json.loads(text)
    if not isinstance(body, dict):
        raise ValueError("not an object")
    applied: dict[EgressIPRef, int] = {}
    for key, gen in (body.get("applied") or {}).items():
        ns, sep, name = str(key).partition("/")
        if not sep or not ns or not name or not isinstance(gen, int) or isinstance(gen, bool):
            raise ValueError(f"bad applied entry {key!r}: {gen!r}")
        applied[EgressIPRef(ns, name)] = gen
    fenced = body.get("fenced", False)
    if not isinstance(fenced, bool):
        raise ValueError("fenced is not a boolean")
    return AgentRecord(
        node=node,
        applied=applied,
        fenced=fenced,
        withheld=frozenset(ip_address(str(s)) for s in body.get("withheld") or []),
        owned=frozenset(ip_address(str(s)) for s in body.get("owned") or []),
        subnet=ip_network(str(body["subnet"])) if body.get("subnet") else None,
        routers=frozenset(ip_address(str(s)) for s in body.get("routers") or []),
    )


def records_from_store(
    store: Mapping[str, Mapping[str, Any]], *, nodes: Iterable[NodeName]
) -> dict[NodeName, AgentRecord]:
    """The readable records of the nodes in `nodes`, by node."""
    wanted = set(nodes)
    out: dict[NodeName, AgentRecord] = {}
    for obj in store.values():
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        if not name.startswith(NAME_PREFIX):
            continue
        node = NodeName(name.removeprefix(NAME_PREFIX))
        if node not in wanted:
            continue  # a leftover of a deleted node must not hold anything back
        text = (meta.get("annotations") or {}).get(ANNOTATION)
        if text is None:
            continue
        try:
            out[node] = decode(node, str(text))
        except (ValueError, KeyError, TypeError) as exc:
            log.debug("agent report %s unreadable, ignored: %s", name, exc)
    return out


class ReportWriter(Protocol):
    """Stores one node's record somewhere the manager can read it."""

    async def write(self, record: AgentRecord) -> None: ...


class LeaseReportWriter:
    """Writes the record into the node's Lease: a merge patch, or a create the first time.

    Needs only `create` and `patch` on leases (no get, list or update)."""

    def __init__(self, api: client.ApiClient, *, namespace: str, node: NodeName) -> None:
        self._coord = client.CoordinationV1Api(api)
        self._namespace = namespace
        self._node = node
        self._name = lease_name(node)

    async def write(self, record: AgentRecord) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        meta = {
            "name": self._name,
            "labels": {COMPONENT_LABEL: COMPONENT},
            "annotations": {ANNOTATION: encode(record)},
        }
        spec = {"holderIdentity": self._node, "renewTime": now}
        try:
            await self._coord.patch_namespaced_lease(
                self._name,
                self._namespace,
                {"metadata": meta, "spec": spec},
                _content_type=MERGE,
                _request_timeout=REQUEST_TIMEOUT,
            )
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta}
        await self._coord.create_namespaced_lease(
            self._namespace,
            {**body, "spec": {**spec, "acquireTime": now}},
            _request_timeout=REQUEST_TIMEOUT,
        )


class AgentReporter:
    """Coalesces published records and writes the newest one off the sync path."""

    def __init__(
        self,
        writer: ReportWriter,
        *,
        min_interval: float = 0.2,
        retry_interval: float = 0.5,
        max_retry_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._writer = writer
        self.min_interval = min_interval
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self._clock = clock
        self._sleep = sleep
        self._wanted: AgentRecord | None = None
        self.written: AgentRecord | None = None
        """The record last written successfully."""
        self._event = asyncio.Event()
        self._last_attempt = float("-inf")
        self.failures = 0
        self.writes = 0

    def publish(self, record: AgentRecord) -> None:
        """Hand over the newest record; returns at once."""
        if record == self._wanted:
            return
        self._wanted = record
        self._event.set()

    async def run(self) -> None:
        """Write forever; only cancellation stops it."""
        while True:
            await self._event.wait()
            gap = self._last_attempt + self.min_interval - self._clock()
            if gap > 0:
                await self._sleep(gap)  # publishes meanwhile coalesce into one write
            self._event.clear()
            record = self._wanted
            if record is None or record == self.written:
                continue
            self._last_attempt = self._clock()
            try:
                await self._writer.write(record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                delay = min(self.retry_interval * 2 ** (self.failures - 1), self.max_retry_interval)
                level = logging.WARNING if self.failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "node=%s agent report not written (retrying every %.1fs at most): %s",
                    record.node,
                    self.max_retry_interval,
                    _brief(exc),
                )
                await self._sleep(delay)
                self._event.set()
                continue
            if self.failures:
                log.info(
                    "node=%s agent report written after %d failures", record.node, self.failures
                )
            self.failures = 0
            self.writes += 1
            self.written = record


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:200]
