"""The pure renderers: the nft batch's shape and scaling, marks, routing specs."""

from __future__ import annotations

import dataclasses
import json
from ipaddress import IPv4Address, IPv4Network, collapse_addresses

import pytest

from staticegress.model.desired import DesiredState, compute_desired
from staticegress.render.netlink import RoutingConfig, render_netlink
from staticegress.render.nft import GUARD_TABLE, MarkLayout, render_ruleset, vtep_mac
from tests import scenario


def _desired(node: str = "node-1", transport: str = "direct", extra_pods: int = 0) -> DesiredState:
    data = scenario.load("mixed")
    data["node"] = node
    data["pods"] += [
        {
            "namespace": "default",
            "name": f"x{i}",
            "node": "node-1",
            "ip": f"10.244.1.{20 + i}",
            "labels": {"app": "frontend"},
        }
        for i in range(extra_pods)
    ]
    return compute_desired(scenario.snapshot(data), scenario.config(data, transport))


def _rules(batch: dict[str, object]) -> list[dict[str, object]]:
    return [
        c["add"]["rule"]
        for c in batch["nftables"]  # type: ignore[attr-defined]
        if "rule" in c.get("add", {})
    ]


def test_batch_replaces_the_table_in_one_transaction() -> None:
    cmds = render_ruleset(_desired(), transport="direct")["nftables"]
    assert cmds[0] == {"metainfo": {"json_schema_version": 1}}
    table = {"family": "ip", "name": "staticegress"}
    assert cmds[1] == {"add": {"table": table}}
    assert cmds[2] == {"delete": {"table": table}}
    assert cmds[3]["add"]["table"]["name"] == "staticegress"


def test_rule_count_does_not_grow_with_pods() -> None:
    small = render_ruleset(_desired(), transport="direct")
    big = render_ruleset(_desired(extra_pods=200), transport="direct")
    assert len(_rules(small)) == len(_rules(big))
    steer = next(
        c["add"]["map"]
        for c in big["nftables"]
        if c.get("add", {}).get("map", {}).get("name") == "steer_pods"
    )
    # Every frontend pod is an element, and all of them share one class.
    frontend = {e[1]["jump"]["target"] for e in steer["elem"] if e[0].startswith("10.244.1.")}
    assert len(steer["elem"]) == 204
    assert len(frontend) == 4  # frontend, billing, orphan and other: one class each


def _walked(batch: dict[str, object]) -> dict[str, int]:
    """Rules per chain: what a packet can walk is one base chain's rules plus
    one class chain's."""
    out: dict[str, int] = {}
    for r in _rules(batch):
        out[str(r["chain"])] = out.get(str(r["chain"]), 0) + 1
    return out


def test_rule_count_does_not_grow_with_rules() -> None:
    """Every packet walks the same chains whatever the number of rules: the
    rules of the StaticEgressIPs become elements of one pod . destination map."""

    def batch(rules: int) -> dict[str, object]:
        data = scenario.load("mixed")
        data["staticegressips"] += [
            {
                "metadata": {
                    "namespace": "default",
                    "name": f"many-{o}",
                    "creationTimestamp": f"2026-11-05T00:00:{o:02d}Z",
                    "uid": f"many-{o}",
                },
                "spec": {
                    "rules": [
                        {
                            "egressip": "198.51.100.201",
                            "pod-selector": {"matchLabels": {"app": "other"}},
                            "cidr": f"192.{o}.{i}.0/24",
                        }
                        for i in range(min(50, rules - 50 * o))
                    ]
                },
            }
            for o in range((rules + 49) // 50)
        ]
        desired = compute_desired(scenario.snapshot(data), scenario.config(data, "direct"))
        return render_ruleset(desired, transport="direct")

    one, many = _walked(batch(1)), _walked(batch(200))
    for base in ("prerouting", "postrouting"):
        assert one[base] == many[base], base
    # Every class chain is one line (a map lookup), however many rules made it.
    assert all(n == 1 for chain, n in many.items() if "_class_" in chain)
    dst = {
        c["add"]["map"]["name"]: len(c["add"]["map"].get("elem", []))
        for c in batch(200)["nftables"]  # type: ignore[attr-defined]
        if "map" in c.get("add", {})
    }
    assert max(n for name, n in dst.items() if name.endswith("_dst")) >= 200  # rules as elements


def test_every_address_is_rendered_from_parsed_values() -> None:
    # No raw string reaches nft: every element must parse as an address or prefix.
    batch = render_ruleset(_desired(transport="vxlan"), transport="vxlan")
    for cmd in batch["nftables"]:
        body = cmd.get("add", {}).get("set") or cmd.get("add", {}).get("map") or {}
        for e in body.get("elem", []):
            for part in e if isinstance(e, list) else [e]:
                if isinstance(part, dict) and "prefix" in part:
                    IPv4Address(part["prefix"]["addr"])
                elif isinstance(part, str):
                    IPv4Address(part)


def test_vxlan_only_pieces() -> None:
    direct = render_ruleset(_desired("node-2"), transport="direct")
    vxlan = render_ruleset(_desired("node-2", "vxlan"), transport="vxlan")

    def chains(b):
        return {c["add"]["chain"]["name"] for c in b["nftables"] if "chain" in c.get("add", {})}

    assert "forward" not in chains(direct)
    assert "forward" in chains(vxlan)
    assert len(_rules(vxlan)) == len(_rules(direct)) + 3


def test_mark_layout() -> None:
    m = MarkLayout()
    assert (m.shift, m.max_slots) == (24, 63)
    assert m.slot_mark(1) == 0x01000000
    with pytest.raises(ValueError, match="outside"):
        m.slot_mark(64)
    narrow = MarkLayout(slot_mask=0x0000F000, return_bit=0x00010000)
    assert (narrow.shift, narrow.max_slots, narrow.slot_mark(2)) == (12, 15, 0x2000)


def test_vtep_mac_is_local_unicast_and_unique() -> None:
    a, b = vtep_mac(IPv4Address("198.51.100.11")), vtep_mac(IPv4Address("198.51.100.12"))
    assert a != b
    first = int(a.split(":")[0], 16)
    assert first & 0x02
    assert not first & 0x01


def test_routing_spec_per_transport() -> None:
    cfg = RoutingConfig(uplink="eth0", uplink_ip=IPv4Address("198.51.100.11"))
    direct = render_netlink(_desired(), transport="direct", cfg=cfg)
    assert direct.tunnel is None
    assert [(r.table, str(r.gateway), r.dev) for r in direct.routes] == [
        (7301, "198.51.100.12", "eth0")
    ]
    assert [str(a) for a in direct.addresses] == ["198.51.100.201"]
    vx = render_netlink(_desired(transport="vxlan"), transport="vxlan", cfg=cfg)
    assert vx.tunnel is not None
    assert vx.tunnel.mtu == 1450
    # The outer packets to the gateway must bypass the steering table.
    assert any(r.table == 254 and str(r.dst) == "198.51.100.12/32" for r in vx.rules)


def test_the_guard_is_one_line_in_its_own_table_with_each_pods_own_destinations() -> None:
    """The guard outlives our table (its own table), costs one line and a
    class's chain per packet whatever the number of rules, and keys each pod
    to the destinations its own rules steer it for: a pod selected for one
    rule may still be masqueraded towards another rule's destinations."""
    desired = _desired()
    cmds = render_ruleset(desired, transport="direct")["nftables"]
    guard = [
        c["add"]
        for c in cmds
        if c.get("add", {}).get(next(iter(c.get("add", {})), ""), {}).get("table") == GUARD_TABLE
    ]
    rules = [g["rule"] for g in guard if "rule" in g]
    base = [r for r in rules if r["chain"] == "guard"]
    assert len(base) == 1
    assert base[0]["expr"][-1]["vmap"]["data"] == "@pod_classes"
    classes = {r["chain"]: r for r in rules if r["chain"] != "guard"}
    assert classes
    assert all(r["expr"][-1] == {"drop": None} for r in classes.values())
    sets = {g["set"]["name"]: g["set"].get("elem", []) for g in guard if "set" in g}
    pod_classes = next(
        g["map"]["elem"] for g in guard if g.get("map", {}).get("name") == "pod_classes"
    )
    pairs = {
        (pod, json.dumps(e))
        for pod, verdict in pod_classes
        for e in sets[f"{verdict['jump']['target']}_dst"]
    }
    steered = {str(ip) for r in desired.rules for ip, _ in [*r.steer, *r.snat]}
    assert {p for p, _ in pairs} == steered
    assert len(classes) < len(pod_classes), "pods with the same destinations share a class"
    # Each pod's destinations: its own pieces, collapsed.
    for pod, verdict in pod_classes:
        want = collapse_addresses(
            net for ip, net, _ in (*desired.steer_pieces, *desired.snat_pieces) if str(ip) == pod
        )
        got = sets[f"{verdict['jump']['target']}_dst"]
        assert got == [_nft_range(n) for n in want]


def _nft_range(net: IPv4Network) -> object:
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def test_no_guard_without_selected_pods() -> None:
    cmds = render_ruleset(DesiredState(), transport="direct")["nftables"]
    added = [c["add"] for c in cmds if "add" in c]
    assert [a["table"]["name"] for a in added if "table" in a] == [
        "staticegress", "staticegress", GUARD_TABLE,
    ]  # fmt: skip
    assert not [a for a in added if a.get("chain", {}).get("table") == GUARD_TABLE]


def test_a_class_is_its_content_whatever_the_order_of_the_pieces() -> None:
    """Two pods with the same pieces share one class even when the pieces come
    in another order, and the class's map is the same either way (the render
    keys pods by their pieces as given, and names classes by sorted content)."""
    desired = _desired(extra_pods=3)
    shuffled = dataclasses.replace(
        desired,
        steer_pieces=tuple(reversed(desired.steer_pieces)),
        snat_pieces=tuple(reversed(desired.snat_pieces)),
    )

    def classes(d: DesiredState) -> tuple[dict[str, object], dict[str, str]]:
        cmds = render_ruleset(d, transport="direct")["nftables"]
        adds = [c["add"] for c in cmds if "add" in c]
        maps = {a["map"]["name"]: a["map"] for a in adds if "map" in a}
        chains = [a["chain"]["name"] for a in adds if "chain" in a]
        assert len(chains) == len(set(chains)), "a chain rendered twice"
        dst = {n: m.get("elem") for n, m in maps.items() if n.endswith("_dst")}
        pods = {
            e[0]: e[1]["jump"]["target"]
            for n in ("steer_pods", "snat_pods")
            for e in maps[n]["elem"]
        }
        return dst, pods

    assert classes(shuffled) == classes(desired)
    _, pods = classes(desired)
    frontend = {pods[f"10.244.1.{20 + i}"] for i in range(3)}
    assert len(frontend) == 1
