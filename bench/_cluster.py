"""Shared by the dataplane benchmarks: a synthetic cluster, and one node's
dataplane for it rendered and applied by the product's own code.

The cluster: `nodes` nodes (node-i: pod range 10.244.i.0/24, InternalIP
172.20.0.(i+1)), `rules` rules in StaticEgressIPs of 5 rules each, created one
second apart so that the global order is the rule number, every `pods // rules`
pods selected by one rule (its own label), spread evenly over the nodes. Rule k has
one egress IP (100.64.0.0 + k + 1) whose gateway is node-(k % gateways), two
destination ranges of its own in the benchmarking range 198.18.0.0/15, an
exclusion in every third rule, and every tenth rule shares 198.19.255.0/24
with the others (the same service allowed to several teams).

The last rule in the global order is the measured one: its destinations are
the server's range (203.0.113.0/24, less 203.0.113.192/26) and one of its
own, its gateway is chosen by the caller, and its first pod runs on node-0
(LOCAL_SELECTED), its second on node-1 (REMOTE_SELECTED). One more pod on
node-0 (UNSELECTED) matches no rule. These three addresses never change.

Nothing here reads `DesiredState` beyond handing it to the renderers, so the
benchmarks measure whatever the product renders.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from staticegress.api.types import NodeName
from staticegress.dataplane.netlink import NetlinkApplier
from staticegress.dataplane.netns import NetnsRunner
from staticegress.dataplane.nft import NftApplier
from staticegress.k8s.snapshot import ParseCache, build_snapshot
from staticegress.model.desired import AgentConfig, Snapshot, Transport, compute_desired
from staticegress.render.netlink import NetlinkSpec, RoutingConfig, render_netlink
from staticegress.render.nft import delete_table_batch, render_ruleset

SERVER = IPv4Address("203.0.113.10")
SERVER_RANGE = IPv4Network("203.0.113.0/24")
SERVER_EXCLUDED = IPv4Network("203.0.113.192/26")
UNDERLAY = IPv4Network("172.20.0.0/16")
ROUTER = IPv4Address("172.20.255.254")
"""The server's address on the nodes' network: their route towards SERVER_RANGE."""
POD_SUPERNET = IPv4Network("10.244.0.0/16")
EGRESS_BASE = IPv4Address("100.64.0.0")
EGRESS_SUPERNET = IPv4Network("100.64.0.0/10")
UPLINK = "eth0"
PER_OBJECT = 5


LOCAL_SELECTED = IPv4Address("10.244.0.2")
REMOTE_SELECTED = IPv4Address("10.244.1.2")
UNSELECTED = IPv4Address("10.244.0.3")


def egress_ip(rule: int) -> IPv4Address:
    return EGRESS_BASE + rule + 1


def node_ip(i: int) -> IPv4Address:
    return IPv4Address(int(IPv4Address("172.20.0.1")) + i)


def pod_range(i: int) -> IPv4Network:
    return IPv4Network(f"10.244.{i}.0/24")


@dataclass(frozen=True)
class Cluster:
    """The raw API objects, and the addresses the benchmarks send from."""

    objects: dict[str, dict[str, Any]]
    rules: int
    selected_pods: int
    local_selected: IPv4Address
    """node-0's pod selected by the last rule."""
    remote_selected: IPv4Address
    """node-1's pod selected by the last rule."""
    unselected: IPv4Address
    """node-0's pod that no rule selects."""
    last_gateway: str


def _node(i: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"node-{i}"},
        "spec": {"podCIDR": str(pod_range(i))},
        "status": {"addresses": [{"type": "InternalIP", "address": str(node_ip(i))}]},
    }


def _pod(name: str, node: int, ip: IPv4Address, app: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": name, "labels": {"app": app}},
        "spec": {"nodeName": f"node-{node}"},
        "status": {"phase": "Running", "podIP": str(ip), "podIPs": [{"ip": str(ip)}]},
    }


def _destinations(k: int, last: bool) -> tuple[list[str], list[str]]:
    base = IPv4Address(int(IPv4Address("198.18.0.0")) + (k % 1000) * 128)
    own = [f"{base}/26", f"{base + 64}/27"]
    excluded = [f"{base + 16}/28"] if k % 3 == 0 else []
    if last:
        return [str(SERVER_RANGE), own[0]], [str(SERVER_EXCLUDED)]
    if k % 10 == 0:
        own.append("198.19.255.0/24")
    return own, excluded


def build(
    *, pods: int, rules: int, last_gateway: int, nodes: int = 100, gateways: int = 10
) -> Cluster:
    """The synthetic cluster of the module docstring (`rules` >= 1)."""
    if not 1 <= rules <= 1000 or not 2 <= nodes <= 250 or pods // rules < 2:
        raise ValueError("want 1..1000 rules, 2..250 nodes and at least 2 pods per rule")
    per_rule = pods // rules
    next_host: dict[int, int] = defaultdict(lambda: 2)

    def place(node: int) -> IPv4Address:
        host = next_host[node]
        if host > 253:
            raise ValueError(f"more than 252 pods on node-{node}: use more nodes")
        next_host[node] = host + 1
        return pod_range(node).network_address + host

    last = rules - 1
    # The measured clients first, so that their addresses never change:
    # the last rule's first pod on node-0 (10.244.0.2), its second on node-1
    # (10.244.1.2), and node-0's unselected pod (10.244.0.3).
    local, remote, unselected = place(0), place(1), place(0)
    assert (local, remote, unselected) == (LOCAL_SELECTED, REMOTE_SELECTED, UNSELECTED)
    pod_objs: dict[str, dict[str, Any]] = {
        f"default/p{last}-0": _pod(f"p{last}-0", 0, local, f"app-{last}"),
        f"default/p{last}-1": _pod(f"p{last}-1", 1, remote, f"app-{last}"),
        "default/unselected": _pod("unselected", 0, unselected, "unselected"),
    }
    for k in range(rules):
        for j in range(2 if k == last else 0, per_rule):
            node = (31 * k + 7 * j) % nodes  # balanced, and not in step with gateways
            pod_objs[f"default/p{k}-{j}"] = _pod(f"p{k}-{j}", node, place(node), f"app-{k}")

    policies: dict[str, dict[str, Any]] = {}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for c in range((rules + PER_OBJECT - 1) // PER_OBJECT):
        rule_list, status = [], []
        for k in range(c * PER_OBJECT, min(rules, (c + 1) * PER_OBJECT)):
            eip = str(egress_ip(k))
            cidrs, excluded = _destinations(k, k == last)
            rule: dict[str, Any] = {
                "egressip": eip,
                "pod-selector": {"matchLabels": {"app": f"app-{k}"}},
                "cidrs": cidrs,
            }
            if excluded:
                rule["excluded-cidrs"] = excluded
            rule_list.append(rule)
            gw = last_gateway if k == last else k % gateways
            status.append({"egressIP": eip, "gateway": f"node-{gw}"})
        created = (start + timedelta(seconds=c)).strftime("%Y-%m-%dT%H:%M:%SZ")
        policies[f"default/se{c}"] = {
            "apiVersion": "staticegressips.io/v1alpha1",
            "kind": "StaticEgressIP",
            "metadata": {
                "namespace": "default",
                "name": f"se{c}",
                "uid": f"uid-{c}",
                "generation": 1,
                "creationTimestamp": created,
            },
            "spec": {"rules": rule_list},
            "status": {"egressIPs": status},
        }
    return Cluster(
        objects={
            "policies": policies,
            "pods": pod_objs,
            "nodes": {f"node-{i}": _node(i) for i in range(nodes)},
        },
        rules=rules,
        selected_pods=per_rule * rules,
        local_selected=local,
        remote_selected=remote,
        unselected=unselected,
        last_gateway=f"node-{last_gateway}",
    )


@dataclass(frozen=True)
class Rendered:
    """One node's dataplane as the product renders it."""

    nft: dict[str, Any]
    netlink: NetlinkSpec


def snapshot(
    objs: dict[str, dict[str, Any]], cache: ParseCache | None = None
) -> tuple[Snapshot, list[Any]]:
    """The snapshot of a synthetic cluster's raw objects (policies, pods and
    nodes; no Services), and what was refused."""
    snap, invalid = build_snapshot(
        policies=objs["policies"],
        pods=objs["pods"],
        nodes=objs["nodes"],
        services={},
        namespaces={},
        slices={},
        cache=cache,
    )
    return snap, list(invalid)


def render(cluster: Cluster, *, node: int, transport: Transport) -> Rendered:
    """compute_desired -> render_ruleset and render_netlink, for node-`node`."""
    snap, invalid = snapshot(cluster.objects)
    if invalid:
        raise ValueError(f"synthetic objects refused: {invalid[:3]}")
    desired = compute_desired(snap, AgentConfig(node=NodeName(f"node-{node}"), transport=transport))
    return Rendered(
        nft=render_ruleset(desired, transport=transport),
        netlink=render_netlink(
            desired,
            transport=transport,
            cfg=RoutingConfig(uplink=UPLINK, uplink_ip=node_ip(node)),
        ),
    )


async def _apply(ns: str, rendered: Rendered | None) -> None:
    routing = NetlinkApplier(netns=ns)
    runner = NetnsRunner(ns)
    try:
        nft = NftApplier(runner)
        if rendered is None:
            await nft.apply(delete_table_batch())
            done = await routing.cleanup(UPLINK)
            if done.errors:
                raise RuntimeError(f"routing cleanup in {ns}: {done.errors}")
            return
        # The agent's order: routes and rules first, then the table, then
        # addresses and the removal of what is stale.
        first = await routing.apply(rendered.netlink, phase="add")
        await nft.apply(rendered.nft)
        fin = await routing.apply(rendered.netlink, phase="finish")
        errors = (first.errors or []) + (fin.errors or [])
        if errors:
            raise RuntimeError(f"routing in {ns}: {errors}")
    finally:
        runner.close()


def apply(ns: str, rendered: Rendered | None) -> None:
    """Program namespace `ns` like the agent would; None removes all of it."""
    asyncio.run(_apply(ns, rendered))


CNI_TABLE = "sebench_cni"


def cni_masquerade() -> str:
    """What the CNI leaves on every node: pod traffic leaving the cluster is
    masqueraded (nft text, applied apart from the product's tables)."""
    return f"""
table ip {CNI_TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {POD_SUPERNET} ip daddr != {{ {POD_SUPERNET}, {UNDERLAY} }} masquerade
  }}
}}
"""
