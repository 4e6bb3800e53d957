"""Tenant isolation on the lab, with the real agents and managers, in both CNI modes: an
egress IP is honoured only where a StaticEgressIPPool grants it.

Two tenants, `tenant-a` and `tenant-b`, each with a client pod on every node
and a pool of its own (outside the lab's own pool, which grants .192/27 to
everyone). Each test checks what the external server sees, what the nodes
hold, and what the status says:
- a tenant cannot take another tenant's pooled address, whichever object is older;
- an address outside every pool is attached nowhere, its pods fail closed;
- a node's address and the router's are refused even inside a pool;
- a namespace-selector reaching another tenant's namespace selects nothing
  there without the pool's grant, and does with it;
- shrinking a pool withdraws the address from its gateway, and the pods that
  used it fail closed, as the status says.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from e2e.labkit import Lab, spread_deployment, wait_for
from e2e.test_agent import target
from staticegress.api.pools import POOL_KIND
from staticegress.api.v1alpha1 import API_VERSION, KIND
from staticegress.lab import plan

pytestmark = pytest.mark.lab

SERVER = "203.0.113.10"
POOL_A = "198.51.100.224/30"  # .224-.227, granted to tenant-a
POOL_B = "198.51.100.228/30"  # .228-.231, granted to tenant-b
STRAY = "198.51.100.240"  # in no pool
NODE_IPS = {str(p.underlay_ip) for p in plan.node_plans(3)}


def _pool(name: str, cidrs: list[str], tenant: str, **more: Any) -> str:
    return json.dumps(
        {
            "apiVersion": API_VERSION,
            "kind": POOL_KIND,
            "metadata": {"name": name},
            "spec": {"cidrs": cidrs, "namespaceSelector": {"matchLabels": {"tenant": tenant}}}
            | more,
        }
    )


def _object(name: str, eips: list[str], **rule: Any) -> str:
    body = {
        "egressips": eips,
        "cidr": f"{SERVER}/32",
        "pod-selector": {"matchLabels": {"app": "client"}},
    }
    return json.dumps(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name},
            "spec": {"rules": [body | rule]},
        }
    )


def _entry(lab: Lab, ns: str, name: str, ip: str) -> dict[str, Any] | None:
    obj = lab.get("staticegressip", "-n", ns, name)
    for e in (obj.get("status") or {}).get("egressIPs") or []:
        if e.get("egressIP") == ip:
            return dict(e)
    return None


def _settled(lab: Lab, ns: str, name: str, ip: str, **want: str) -> dict[str, Any]:
    """Wait until the status entry of `ip` says `want` (gateway=... is "any" for any)."""

    def check() -> dict[str, Any] | None:
        e = _entry(lab, ns, name, ip)
        if e is None:
            return None
        for k, v in want.items():
            if (v == "any" and not e.get(k)) or (v != "any" and e.get(k) != v):
                return None
        return e

    return wait_for(f"{ns}/{name} {ip}: {want}", check, seconds=15, every=0.1)


def _holders(ip: str) -> list[str]:
    """The lab nodes that have `ip` on an interface."""
    out = []
    for p in plan.node_plans(3):
        addrs = subprocess.run(
            ["ip", "netns", "exec", p.netns, "ip", "-o", "-4", "addr"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if f" {ip}/" in addrs:
            out.append(p.name)
    return out


def _on_gateway_only(lab: Lab, ns: str, name: str, ip: str, seconds: float = 10) -> str:
    """Wait until `ip` is on the node its status names, and on no other; that node."""
    seen: list[tuple[Any, list[str]]] = []

    def check() -> str | None:
        gateway = (_entry(lab, ns, name, ip) or {}).get("gateway")
        holders = _holders(ip)
        seen.append((gateway, holders))
        return str(gateway) if gateway and holders == [gateway] else None

    try:
        return wait_for(f"{ip} on its gateway only", check, seconds=seconds, every=0.1)
    except AssertionError as exc:
        changes = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
        raise AssertionError(f"{exc}; (gateway, holders) over time: {changes}") from None


def _sources(lab: Lab, pods: list[dict[str, Any]], tries: int = 1) -> set[str]:
    """What the server saw from each pod ('' for no answer), over `tries` rounds."""
    seen = set()
    for _ in range(tries):
        for p in pods:
            proc = lab.exec(target(p), "curl", "-s", "-m", "3", f"http://{SERVER}/", check=False)
            seen.add(proc.stdout.strip() if proc.returncode == 0 else "")
    return seen


def _condition(lab: Lab, ns: str, name: str, kind: str) -> dict[str, Any]:
    obj = lab.get("staticegressip", "-n", ns, name)
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


@pytest.fixture(scope="module")
def tenants(lab: Lab) -> dict[str, list[dict[str, Any]]]:
    pods = {}
    for t in ("a", "b"):
        ns = f"tenant-{t}"
        lab.kubectl("create", "namespace", ns)
        lab.kubectl("label", "namespace", ns, f"tenant={t}")
        lab.kubectl("apply", "-n", ns, "-f", "-", stdin=spread_deployment("client", 3))
    lab.apply(_pool("pool-a", [POOL_A], "a"))
    lab.apply(_pool("pool-b", [POOL_B], "b"))
    for t in ("a", "b"):
        ns = f"tenant-{t}"

        def ready(ns: str = ns) -> list[dict[str, Any]] | None:
            got = lab.get("pods", "-n", ns, "-l", "app=client")["items"]
            up = [
                p for p in got if p["status"].get("podIP") and p["status"].get("phase") == "Running"
            ]
            return up if len(up) == 3 else None

        pods[ns] = wait_for(f"{ns}'s client pods", ready, seconds=90)
    return pods


def _clean(lab: Lab, *refs: str) -> None:
    for ref in refs:
        ns, name = ref.split("/")
        lab.kubectl("delete", "staticegressip", "-n", ns, name, "--wait=true", check=False)


@pytest.mark.parametrize("thief_first", [True, False], ids=["thief-older", "thief-younger"])
def test_a_tenant_cannot_take_another_tenants_pooled_ip(
    lab: Lab, tenants: dict[str, list[dict[str, Any]]], thief_first: bool
) -> None:
    ip = "198.51.100.229" if thief_first else "198.51.100.230"
    first, second = (("tenant-a", "thief"), ("tenant-b", "owner"))[:: 1 if thief_first else -1]
    lab.kubectl("apply", "-n", first[0], "-f", "-", stdin=_object(first[1], [ip]))
    _settled(lab, *first, ip)  # its status is written before the other exists
    # Creation times have whole seconds: the second object must be younger, not tied.
    time.sleep(1.1)
    lab.kubectl("apply", "-n", second[0], "-f", "-", stdin=_object(second[1], [ip]))
    try:
        _settled(lab, "tenant-b", "owner", ip, gateway="any", pool="pool-b")
        thief = _settled(lab, "tenant-a", "thief", ip, reason="NamespaceNotGranted")
        assert "gateway" not in thief
        ready = _condition(lab, "tenant-a", "thief", "Ready")
        assert ready["status"] == "False"
        assert "pool-b" in ready["message"], ready
        assert "tenant-a" in ready["message"], ready
        _on_gateway_only(lab, "tenant-b", "owner", ip)
        wait_for(
            "tenant-b's pods leave with its egress IP",
            lambda: _sources(lab, tenants["tenant-b"]) == {ip},
            seconds=20,
        )
        # The thief's pods fail closed on their own rule: no answer, never the IP.
        assert _sources(lab, tenants["tenant-a"]) == {""}
    finally:
        _clean(lab, "tenant-a/thief", "tenant-b/owner")


def test_an_ip_outside_every_pool_is_attached_nowhere(
    lab: Lab, tenants: dict[str, list[dict[str, Any]]]
) -> None:
    lab.kubectl("apply", "-n", "tenant-a", "-f", "-", stdin=_object("stray", [STRAY]))
    try:
        entry = _settled(lab, "tenant-a", "stray", STRAY, reason="NotInPool")
        assert "gateway" not in entry
        assert _holders(STRAY) == []
        sources = _sources(lab, tenants["tenant-a"], tries=2)
        assert sources == {""}, f"selected pods must fail closed, the server saw {sources}"
        events = lab.kubectl(
            "get", "events", "-n", "tenant-a", "--field-selector", "involvedObject.name=stray"
        )
        assert "NotInPool" in events
    finally:
        _clean(lab, "tenant-a/stray")


def test_node_and_router_addresses_are_refused_inside_a_pool(
    lab: Lab, tenants: dict[str, list[dict[str, Any]]]
) -> None:
    node_ip = str(plan.node_plans(3)[0].underlay_ip)
    router = str(plan.ROUTER_IP)
    lab.apply(_pool("reserved", [f"{router}/32", f"{node_ip}/32"], "a"))
    lab.kubectl("apply", "-n", "tenant-a", "-f", "-", stdin=_object("hijack", [router, node_ip]))
    try:
        r = _settled(lab, "tenant-a", "hijack", router, reason="ForbiddenAddress")
        n = _settled(lab, "tenant-a", "hijack", node_ip, reason="ForbiddenAddress")
        assert "gateway" not in r
        assert "gateway" not in n
        message = _condition(lab, "tenant-a", "hijack", "Degraded")["message"]
        assert "default gateway" in message, message
        assert "an address of node node-1" in message, message
        # Nobody but node-1 holds node-1's address; nobody holds the router's.
        assert _holders(router) == []
        assert _holders(node_ip) == ["node-1"]
        pool = lab.get("staticegressippool", "reserved")
        degraded = next(c for c in pool["status"]["conditions"] if c["type"] == "Degraded")
        assert degraded["reason"] == "ForbiddenAddresses", degraded
    finally:
        _clean(lab, "tenant-a/hijack")
        lab.kubectl("delete", "staticegressippool", "reserved", check=False)


def test_cross_namespace_selection_needs_the_pools_grant(
    lab: Lab, tenants: dict[str, list[dict[str, Any]]]
) -> None:
    ip = "198.51.100.225"
    tenants_ns = {"matchExpressions": [{"key": "tenant", "operator": "Exists"}]}
    wide = _object("wide", [ip], **{"namespace-selector": tenants_ns})
    lab.kubectl("apply", "-n", "tenant-a", "-f", "-", stdin=wide)
    try:
        _settled(lab, "tenant-a", "wide", ip, gateway="any", pool="pool-a")
        degraded = wait_for(
            "the denial on the status",
            lambda: (
                (c := _condition(lab, "tenant-a", "wide", "Degraded"))["reason"]
                == "CrossNamespaceDenied"
                and c
            ),
            seconds=10,
        )
        assert "tenant-b" in degraded["message"], degraded
        wait_for(
            "tenant-a's pods leave with the egress IP",
            lambda: _sources(lab, tenants["tenant-a"]) == {ip},
            seconds=20,
        )
        # tenant-b's pods are untouched: they leave masqueraded as their nodes.
        assert _sources(lab, tenants["tenant-b"]) <= NODE_IPS

        lab.apply(
            _pool("pool-a", [POOL_A], "a", podNamespaceSelector={"matchLabels": {"tenant": "b"}})
        )
        wait_for(
            "with the grant, tenant-b's pods leave with it too",
            lambda: _sources(lab, tenants["tenant-b"]) == {ip},
            seconds=20,
        )
    finally:
        lab.apply(_pool("pool-a", [POOL_A], "a"))
        _clean(lab, "tenant-a/wide")


def test_shrinking_a_pool_withdraws_the_ip(
    lab: Lab, tenants: dict[str, list[dict[str, Any]]]
) -> None:
    ip = "198.51.100.226"
    lab.kubectl("apply", "-n", "tenant-a", "-f", "-", stdin=_object("shrink", [ip]))
    try:
        _settled(lab, "tenant-a", "shrink", ip, gateway="any", pool="pool-a")
        wait_for(
            "tenant-a's pods leave with the egress IP",
            lambda: _sources(lab, tenants["tenant-a"]) == {ip},
            seconds=20,
        )
        _on_gateway_only(lab, "tenant-a", "shrink", ip)
        pool = lab.get("staticegressippool", "pool-a")
        assert pool["status"]["used"] >= 1, pool["status"]

        lab.apply(_pool("pool-a", ["198.51.100.224/31"], "a"))
        _settled(lab, "tenant-a", "shrink", ip, reason="NotInPool")
        wait_for("the address gone from every node", lambda: _holders(ip) == [], seconds=10)
        sources = _sources(lab, tenants["tenant-a"], tries=2)
        assert sources == {""}, f"withdrawn: the pods must fail closed, the server saw {sources}"
    finally:
        lab.apply(_pool("pool-a", [POOL_A], "a"))
        _clean(lab, "tenant-a/shrink")
