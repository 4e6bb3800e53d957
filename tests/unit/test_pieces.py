"""Rule order resolved into disjoint pod . destination pieces: the pieces give
every address the verdict of the first rule that selects the pod and covers
the address (its destinations less its exclusions), as a walk over the rules
in order would."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from staticegress.model.desired import DesiredState, compute_desired, first_match_pieces, subtract
from tests import scenario


def _first_rule(reach: list[list[IPv4Network]], addr: IPv4Address) -> int | None:
    for k, nets in enumerate(reach):
        if any(addr in n for n in nets):
            return k
    return None


def _random_nets(rng: random.Random, count: int) -> list[IPv4Network]:
    out = []
    for _ in range(count):
        plen = rng.choice([8, 12, 16, 20, 24, 28, 32])
        addr = IPv4Address(rng.choice([0x0A000000, 0xC0000200, 0xCB007100]) + rng.getrandbits(12))
        out.append(IPv4Network(f"{addr}/{plen}", strict=False))
    return out


def test_pieces_are_disjoint_and_give_each_address_its_first_rule() -> None:
    rng = random.Random(12)
    for _ in range(200):
        reach = [
            subtract(_random_nets(rng, rng.randint(1, 3)), _random_nets(rng, rng.randint(0, 2)))
            for _ in range(rng.randint(1, 6))
        ]
        won = first_match_pieces(tuple(tuple(r) for r in reach))
        flat = [(k, n) for k, nets in enumerate(won) for n in nets]
        for i, (_, a) in enumerate(flat):
            for _, b in flat[i + 1 :]:
                assert not a.overlaps(b), (a, b)
        probes = [n.network_address for nets in reach for n in nets]
        probes += [n.broadcast_address for nets in reach for n in nets]
        probes += [IPv4Address(int(p) + 1) for p in probes if int(p) < 2**32 - 1]
        probes += [IPv4Address(rng.getrandbits(32)) for _ in range(20)]
        for p in probes:
            got = next((k for k, n in flat if p in n), None)
            assert got == _first_rule(reach, p), (p, reach, won)


def _overlapping(node: str) -> DesiredState:
    return compute_desired(*scenario.overlapping(node))


def _lookup(pieces: tuple[tuple[IPv4Address, IPv4Network, Any], ...], pod: str, dst: str) -> Any:
    hits = [v for p, n, v in pieces if p == IPv4Address(pod) and IPv4Address(dst) in n]
    assert len(hits) <= 1, hits
    return hits[0] if hits else None


def test_a_director_follows_the_first_rule_and_falls_through_exclusions() -> None:
    d = _overlapping("node-1")
    gw = {g.node: g.slot for g in d.gateways}
    assert _lookup(d.steer_pieces, "10.244.1.2", "203.0.113.5") == gw["node-2"]
    assert _lookup(d.steer_pieces, "10.244.1.2", "203.0.113.200") == "local"
    assert _lookup(d.steer_pieces, "10.244.1.2", "192.0.2.9") == "local"
    assert _lookup(d.steer_pieces, "10.244.1.2", "198.18.0.1") is None


def test_a_gateway_snats_only_what_the_first_rule_sends_it() -> None:
    d = _overlapping("node-1")
    # The remote pod's traffic to 203.0.113.5 belongs to the older rule (node-2):
    # this node must not SNAT it to its own egress IP.
    assert _lookup(d.snat_pieces, "10.244.3.2", "203.0.113.5") is None
    assert _lookup(d.snat_pieces, "10.244.3.2", "203.0.113.200") == IPv4Address("198.51.100.201")
    assert _lookup(d.snat_pieces, "10.244.1.2", "192.0.2.9") == IPv4Address("198.51.100.201")
    # node-2 SNATs the older rule's pieces, and nothing of the younger one.
    d2 = _overlapping("node-2")
    assert _lookup(d2.snat_pieces, "10.244.3.2", "203.0.113.5") == IPv4Address("198.51.100.200")
    assert _lookup(d2.snat_pieces, "10.244.3.2", "203.0.113.200") is None
