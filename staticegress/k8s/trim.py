"""Trim API objects to the fields the product reads, before a reflector stores them.

A real Pod is 5-30 KB of JSON (managedFields, container specs and statuses,
env, probes); the agent reads a dozen fields of it. Keeping whole objects
made an agent's memory grow with the size of every object in the cluster,
not with what it uses. A trimmed object keeps the API's shape (a dict with
`metadata`, `spec`, `status` as the server sent them), so the parsers at the
edge (`staticegress.api.core`, `k8s.snapshot`) read it exactly as they read
the full object: `tests/unit/test_trim.py` checks that parsing a trimmed
object gives what parsing the full one gives, for every kind trimmed here.

What a trimmer keeps must include every field any parser of that kind reads;
adding a field to a parser means adding it here (the test above fails
otherwise for the sample objects it covers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Json = dict[str, Any]
Trim = Callable[[Json], Json]

_META = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp")


def _meta(obj: Mapping[str, Any], *, labels: bool = True, deletion: bool = False) -> Json:
    meta = obj.get("metadata") or {}
    out: Json = {k: meta[k] for k in _META if k in meta}
    if labels and meta.get("labels"):
        out["labels"] = meta["labels"]
    if deletion and meta.get("deletionTimestamp"):
        out["deletionTimestamp"] = meta["deletionTimestamp"]
    return out


def _pick(section: Any, keys: tuple[str, ...]) -> Json:
    if not isinstance(section, Mapping):
        return {}
    return {k: section[k] for k in keys if k in section}


def _head(obj: Mapping[str, Any]) -> Json:
    return {k: obj[k] for k in ("kind", "apiVersion") if k in obj}


def _with_conditions(status: Any, keys: tuple[str, ...]) -> Json:
    """`keys` of a status, and its conditions without their messages."""
    out = _pick(status, keys)
    conditions = [
        _pick(c, ("type", "status", "lastTransitionTime"))
        for c in (status.get("conditions") if isinstance(status, Mapping) else None) or []
        if isinstance(c, Mapping)
    ]
    if conditions:
        out["conditions"] = conditions
    return out


_CONTAINER_STATUSES = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")


def _container_starts(statuses: Any) -> list[Json]:
    """Each container status's current state, with only when it started."""
    out: list[Json] = []
    for cs in statuses if isinstance(statuses, list) else []:
        state = cs.get("state") if isinstance(cs, Mapping) else None
        kept = {
            phase: _pick(detail, ("startedAt",))
            for phase, detail in (state.items() if isinstance(state, Mapping) else ())
            if phase in ("running", "terminated") and isinstance(detail, Mapping)
        }
        out.append({"state": kept})
    return out


def trim_pod(obj: Json) -> Json:
    """Identity, node, labels, network and lifecycle, and when its sandbox was
    last reported up (its conditions, and its containers' start times for
    kubelets without the sandbox condition): what `parse_pod` reads."""
    status = obj.get("status")
    out_status = _with_conditions(status, ("phase", "podIP", "podIPs"))
    for key in _CONTAINER_STATUSES:
        if isinstance(status, Mapping) and status.get(key):
            out_status[key] = _container_starts(status[key])
    return {
        **_head(obj),
        "metadata": _meta(obj, deletion=True),
        "spec": _pick(obj.get("spec"), ("nodeName", "hostNetwork")),
        "status": out_status,
    }


def trim_node(obj: Json) -> Json:
    """Name, uid, labels, pod ranges, addresses and conditions (the manager
    reads Ready): no images, no capacity, no node info."""
    return {
        **_head(obj),
        "metadata": _meta(obj),
        "spec": _pick(obj.get("spec"), ("podCIDR", "podCIDRs")),
        "status": _with_conditions(obj.get("status"), ("addresses",)),
    }


def trim_service(obj: Json) -> Json:
    """The selector and the addresses the Service takes (never egress IPs)."""
    status = obj.get("status") or {}
    lb = status.get("loadBalancer") if isinstance(status, Mapping) else None
    return {
        **_head(obj),
        "metadata": _meta(obj, labels=False),
        "spec": _pick(obj.get("spec"), ("selector", "loadBalancerIP", "externalIPs")),
        "status": {"loadBalancer": _pick(lb, ("ingress",))} if lb else {},
    }


def trim_endpoint_slice(obj: Json) -> Json:
    """The service it belongs to, its family and its endpoints' addresses."""
    return {
        **_head(obj),
        "metadata": _meta(obj),
        "addressType": obj.get("addressType"),
        "endpoints": [
            _pick(ep, ("addresses",))
            for ep in obj.get("endpoints") or []
            if isinstance(ep, Mapping)
        ],
    }


def trim_namespace(obj: Json) -> Json:
    """Name and labels."""
    return {**_head(obj), "metadata": _meta(obj)}


def trim_static_egress_ip(obj: Json) -> Json:
    """For agents: the spec and the status's egress IP assignments (who is each
    one's gateway). The conditions, which the manager rewrites as agents report,
    are the manager's alone: without them here, a condition's change no longer
    makes every agent recompute."""
    status = obj.get("status")
    return {
        **_head(obj),
        "metadata": _meta(obj),
        "spec": obj.get("spec"),
        "status": _pick(status, ("egressIPs",)),
    }


def trim_pool(obj: Json) -> Json:
    """The spec: the pool's status is the manager's report, read by nobody."""
    return {**_head(obj), "metadata": _meta(obj), "spec": obj.get("spec")}
