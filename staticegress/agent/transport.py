"""The agent's transport: this node's detection, settled by the cluster's record.

`choose_transport` runs once, when the agent starts, and returns what this
node uses: it wires the decision rules (`staticegress.dataplane.transport`)
to the record's ConfigMap (`staticegress.k8s.configmap`), retries what the
API server could not answer, and reports a node that disagrees with the
cluster: one warning in the log, a `TransportMismatch` Event on its Node and
the `transport_mismatch` gauge at 1.

Until a decision exists the agent programs nothing: it waits (with backoff)
rather than guess, since a guess could split the cluster. One exception:
when the API server refuses us the record (403: the RBAC of an older
release), the node decides alone, as before the record existed, and says so.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.agent.metrics import Registry
from staticegress.dataplane.transport import (
    RECORD_NAME,
    Transport,
    TransportDecision,
    TransportFlag,
    TransportRecordError,
    decide_transport,
)
from staticegress.k8s.client import REQUEST_TIMEOUT
from staticegress.k8s.configmap import ConfigMapRecord

log = logging.getLogger(__name__)

NODE_EVENT_NAMESPACE = "default"
"""Where Events about cluster-scoped Nodes live (as the kubelet's do)."""


async def choose_transport(
    api: client.ApiClient,
    *,
    node: str,
    node_uid: str,
    namespace: str,
    flag: TransportFlag,
    detect: Callable[[], Awaitable[tuple[Transport, str]]],
    metrics: Registry | None = None,
    max_backoff: float = 30.0,
) -> TransportDecision:
    """This node's transport; see the module docstring."""
    store = ConfigMapRecord(api, namespace=namespace, name=RECORD_NAME)
    delay = 1.0
    while True:
        try:
            decision = await decide_transport(store, node=node, flag=flag, detect=detect)
            break
        except ApiException as exc:
            if exc.status == 403:
                decision = await _alone(flag, detect, namespace)
                break
            log.warning("node=%s transport record not readable (%s): retrying", node, exc.status)
        except TransportRecordError as exc:
            log.error("node=%s %s: fix or delete it; waiting", node, exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("node=%s transport record not readable (%s): retrying", node, exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff)
    log.info(
        "node=%s transport=%s (%s: %s)", node, decision.transport, decision.source, decision.reason
    )
    if metrics is not None:
        metrics.declare(
            "transport_mismatch",
            "gauge",
            "1 when this node's own transport check disagrees with the cluster's record.",
        )
        metrics.set("transport_mismatch", 1 if decision.mismatch else 0)
    if decision.mismatch:
        log.warning("node=%s transport mismatch: %s", node, decision.mismatch)
        await node_event(
            api, node=node, uid=node_uid, reason="TransportMismatch", message=decision.mismatch
        )
    return decision


async def _alone(
    flag: TransportFlag, detect: Callable[[], Awaitable[tuple[Transport, str]]], namespace: str
) -> TransportDecision:
    why = f"no access to ConfigMap {namespace}/{RECORD_NAME}: deciding alone (update the RBAC)"
    log.warning(why)
    if flag != "auto":
        return TransportDecision(flag, "flag", f"--transport flag; {why}")
    detected, reason = await detect()
    return TransportDecision(detected, "first", f"{reason}; {why}")


async def node_event(
    api: client.ApiClient, *, node: str, uid: str, reason: str, message: str
) -> None:
    """A Warning Event on this node's Node; best effort, never raises."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{node}.{uuid.uuid4().hex[:12]}", "namespace": NODE_EVENT_NAMESPACE},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid},
        "reason": reason,
        "message": message[:1024],
        "type": "Warning",
        "source": {"component": "staticegress-agent", "host": node},
        "reportingComponent": "staticegress-agent",
        "reportingInstance": node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await client.CoreV1Api(api).create_namespaced_event(
            NODE_EVENT_NAMESPACE, body, _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as exc:
        # An Event is best effort: the log line above already says it all.
        log.warning("node=%s %s event not recorded: %s", node, reason, exc)
