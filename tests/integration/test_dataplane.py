"""The dataplane against the real kernel, in throwaway network namespaces: the
rendered table as nft lists it (golden files), convergence, atomic failure,
the tunnel link, and cleanup."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from staticegress.dataplane.netlink import NetlinkApplier
from staticegress.dataplane.netns import NetnsRunner
from staticegress.dataplane.nft import NftApplier, NftError
from staticegress.model.desired import DesiredState, compute_desired
from staticegress.render.netlink import RoutingConfig, render_netlink
from staticegress.render.nft import delete_table_batch, render_ruleset, vtep_mac
from tests import scenario

GOLDEN = Path(__file__).parents[1] / "cases" / "model"
UPLINK_IP = IPv4Address("198.51.100.11")


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        raise AssertionError("dataplane tests need root (network namespaces)")
    name = f"setest-dp-{uuid.uuid4().hex[:6]}"
    _sh("ip", "netns", "add", name)
    try:
        _sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        for cmd in (
            "link set lo up",
            "link set eth0 up",
            "link set peer0 up",
            f"addr add {UPLINK_IP}/24 dev eth0",
        ):
            _sh("ip", "-n", name, *cmd.split())
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _desired(node: str, transport: str) -> DesiredState:
    data = scenario.load("mixed")
    data["node"] = node
    return compute_desired(scenario.snapshot(data), scenario.config(data, transport))


def _list(ns: str) -> str:
    return "".join(
        _sh("ip", "netns", "exec", ns, "nft", "list", "table", "ip", name)
        for name in ("staticegress", "staticegress_guard")
    )


def _routing(ns: str) -> str:
    return "\n".join(
        _sh("ip", "-n", ns, *cmd.split())
        for cmd in ("rule show", "route show table all", "-d link show", "neigh show", "addr show")
    )


@pytest.mark.parametrize(
    ("node", "transport"),
    [("node-1", "direct"), ("node-2", "direct"), ("node-1", "vxlan"), ("node-2", "vxlan")],
)
def test_rendered_table_matches_golden(netns: str, node: str, transport: str) -> None:
    desired = _desired(node, transport)
    nft = NftApplier(NetnsRunner(netns))
    asyncio.run(nft.apply(render_ruleset(desired, transport=transport)))
    listed = _list(netns)
    golden = GOLDEN / f"mixed.{node}.{transport}.nft"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(listed)
    assert listed == golden.read_text()


def test_apply_is_atomic_and_a_refused_batch_changes_nothing(netns: str) -> None:
    nft = NftApplier(NetnsRunner(netns))
    good = render_ruleset(_desired("node-1", "direct"), transport="direct")
    asyncio.run(nft.apply(good))
    before = _list(netns)
    asyncio.run(nft.apply(good))
    assert _list(netns) == before, "re-applying the same state changed the table"
    bad = render_ruleset(_desired("node-2", "direct"), transport="direct")
    # A rule jumping to a chain that does not exist: the kernel refuses the batch.
    bad["nftables"].append(
        {
            "add": {
                "rule": {
                    "family": "ip",
                    "table": "staticegress",
                    "chain": "prerouting",
                    "expr": [{"jump": {"target": "nowhere"}}],
                }
            }
        }
    )
    with pytest.raises(NftError):
        asyncio.run(nft.apply(bad))
    assert _list(netns) == before
    asyncio.run(nft.apply(delete_table_batch()))
    asyncio.run(nft.apply(delete_table_batch()))  # deleting twice is fine
    assert "staticegress" not in _sh("ip", "netns", "exec", netns, "nft", "list", "tables")


def _netlink_spec(desired: DesiredState, transport: str) -> object:
    return render_netlink(
        desired, transport=transport, cfg=RoutingConfig(uplink="eth0", uplink_ip=UPLINK_IP)
    )


@pytest.mark.parametrize("transport", ["direct", "vxlan"])
def test_netlink_converges_and_cleans_up(netns: str, transport: str) -> None:
    before = _routing(netns)
    applier = NetlinkApplier(netns=netns)
    desired = _desired("node-1", transport)
    # node-1 is a director towards node-2 and the gateway of .201.
    spec = render_netlink(
        desired, transport=transport, cfg=RoutingConfig(uplink="eth0", uplink_ip=UPLINK_IP)
    )
    first = asyncio.run(applier.apply(spec, phase="add"))
    fin = asyncio.run(applier.apply(spec, phase="finish"))
    assert not first.errors, first.errors
    assert not fin.errors, fin.errors
    assert fin.new_addresses == (IPv4Address("198.51.100.201"),)
    rules = _sh("ip", "-n", netns, "rule", "show")
    assert "fwmark 0x1000000/0x3f000000 lookup 7301 proto 210" in rules
    route = _sh("ip", "-n", netns, "route", "show", "table", "7301")
    dev = "segress0" if transport == "vxlan" else "eth0"
    assert f"default via 198.51.100.12 dev {dev} proto 210 onlink" in route
    assert "198.51.100.201/32" in _sh("ip", "-n", netns, "addr", "show", "dev", "eth0")
    if transport == "vxlan":
        assert "to 198.51.100.12 lookup main proto 210" in rules
        link = asyncio.run(applier.link_info("segress0"))
        assert link == {"mtu": 1450, "address": vtep_mac(UPLINK_IP), "vni": 4097, "port": 4790}
        assert vtep_mac(IPv4Address("198.51.100.12")) in _sh(
            "ip", "-n", netns, "neigh", "show", "dev", "segress0"
        )
    # Converged: a second pass changes nothing.
    again = asyncio.run(applier.apply(spec, phase="add"))
    again_fin = asyncio.run(applier.apply(spec, phase="finish"))
    assert (again.added, again.removed, again_fin.added, again_fin.removed) == (0, 0, 0, 0)
    # Everything we made goes away, and nothing else.
    done = asyncio.run(applier.cleanup("eth0"))
    assert not done.errors
    assert _routing(netns) == before


def test_incompatible_tunnel_is_recreated(netns: str) -> None:
    _sh(
        "ip",
        "-n",
        netns,
        "link",
        "add",
        "segress0",
        "type",
        "vxlan",
        "id",
        "7",
        "dstport",
        "4789",
        "local",
        str(UPLINK_IP),
        "dev",
        "eth0",
    )
    applier = NetlinkApplier(netns=netns)
    spec = render_netlink(
        _desired("node-1", "vxlan"),
        transport="vxlan",
        cfg=RoutingConfig(uplink="eth0", uplink_ip=UPLINK_IP),
    )
    res = asyncio.run(applier.apply(spec, phase="add"))
    assert not res.errors
    assert asyncio.run(applier.link_info("segress0"))["vni"] == 4097  # type: ignore[index]
    assert res.removed == 1


def test_reference_table_in_nft_dir_is_current() -> None:
    reference = Path(__file__).parents[2] / "nft" / "example-director-and-gateway.nft"
    assert reference.read_text() == (GOLDEN / "mixed.node-1.vxlan.nft").read_text()


def _kernel_element(ns: str, map_name: str, key: str) -> str | None:
    """The verdict of the kernel's element of `map_name` covering `key` (this nft
    prints `get element` as text even with -j), or None when none covers it."""
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "nft",
            "get",
            "element",
            "ip",
            "staticegress",
            map_name,
            f"{{ {key} }}",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        assert "No such file or directory" in done.stderr, done.stderr
        return None
    found = re.findall(r"elements = \{ \S+ : ((?:goto|jump) \S+|accept|drop) \}", done.stdout)
    assert len(found) == 1, done.stdout
    return str(found[0])


def _kernel_verdict(ns: str, kind: str, pod: str, dst: str) -> str | None:
    """What the kernel decides for pod . dst: the pod's class, then the verdict
    for dst in that class's map, as two lookups in the kernel's own maps."""
    cls = _kernel_element(ns, f"{kind}_pods", pod)
    if cls is None:
        return None
    assert cls.startswith(f"jump {kind}_class_"), cls
    verdict = _kernel_element(ns, f"{cls.removeprefix('jump ')}_dst", dst)
    return verdict.removeprefix("goto ") if verdict else None


def test_the_kernel_lookup_gives_the_first_rule(netns: str) -> None:
    """Overlapping rules with an exclusion, resolved into pieces, looked up by
    the kernel itself: each pod . destination gets the first selecting rule's
    verdict, on the director and on the gateway."""
    desired = compute_desired(*scenario.overlapping("node-1"))
    asyncio.run(NftApplier(NetnsRunner(netns)).apply(render_ruleset(desired, transport="direct")))
    slot = {g.node: g.slot for g in desired.gateways}["node-2"]
    expect_steer = {
        "203.0.113.5": f"steer_to_gateway_{slot}",  # the older rule, via node-2
        "203.0.113.200": "accept",  # excluded by the older rule: the younger, here
        "192.0.2.9": "accept",
        "198.18.0.1": None,  # no rule
    }
    for dst, want in expect_steer.items():
        assert _kernel_verdict(netns, "steer", "10.244.1.2", dst) == want, dst
    # The remote pod: this gateway SNATs only what the younger rule wins.
    assert _kernel_verdict(netns, "snat", "10.244.3.2", "203.0.113.5") is None
    snat_chain = "snat_to_198_51_100_201"
    assert _kernel_verdict(netns, "snat", "10.244.3.2", "203.0.113.200") == snat_chain
    chain = _sh(
        "ip", "netns", "exec", netns, "nft", "list", "chain", "ip", "staticegress", snat_chain
    )
    assert "snat to 198.51.100.201" in chain
