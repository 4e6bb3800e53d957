"""The agent's two watchdogs on the lab, in both CNI modes: our nftables tables
removed behind the agent's back (a whole-ruleset flush, or just our table) on
a director and on a gateway while a selected pod probes every 10 ms; and the
API server blackholed for one node (its packets dropped, no reset), which
that node's /healthz must report while /livez and the traffic stay up."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from e2e.labkit import Lab, client_lab, require_root, wait_for
from e2e.test_agent import probe, probe_result
from staticegress.controlplane.binaries import Binaries
from staticegress.lab import lab as lablib
from staticegress.lab import plan

pytestmark = pytest.mark.lab

SERVER = "203.0.113.10"
NODE_IP = {p.name: str(p.underlay_ip) for p in plan.node_plans(3)}
# The lab CNI's masquerade, as `lab up` installs it; a ruleset flush removes it.
MASQUERADE = [
    "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", str(plan.CLUSTER_CIDR),
    "!", "-d", str(plan.CLUSTER_CIDR), "-m", "comment", "--comment", "{comment}",
    "-j", "MASQUERADE",
]  # fmt: skip


def in_node(node: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", f"{plan.PREFIX}-{node}", *argv],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def http(node: str, path: str) -> tuple[int, str]:
    proc = subprocess.run(
        [
            "curl",
            "-s",
            "-m",
            "2",
            "-w",
            "\n%{http_code}",
            f"http://{NODE_IP[node]}:{lablib.AGENT_PORT}{path}",
        ],
        capture_output=True,
        text=True,
    )
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body.strip()


def metric(node: str, name: str) -> float:
    _, text = http(node, "/metrics")
    m = re.search(rf"^staticegress_{name} (\S+)$", text, re.MULTILINE)
    if m is None:
        raise AssertionError(f"no metric {name} on {node}")
    return float(m.group(1))


def gateway_of(lab: Lab, eip: str) -> str | None:
    obj = lab.get("staticegressip", "watchdogs")
    for e in (obj.get("status") or {}).get("egressIPs", []):
        if e["egressIP"] == eip:
            return e.get("gateway")  # type: ignore[no-any-return]
    return None


EIP = "198.51.100.200"


@pytest.fixture(scope="module", params=plan.CNIS)
def world(request: pytest.FixtureRequest, binaries: Binaries) -> Iterator[dict[str, Any]]:
    require_root()
    with client_lab(binaries, request.param, name="watchdogs", eips=(EIP,), server=SERVER) as (
        lab,
        pods,
    ):
        gateway = wait_for("a gateway", lambda: gateway_of(lab, EIP), seconds=30)
        director = sorted(n for n in pods if n != gateway)[0]
        yield {"lab": lab, "pod": pods[director], "gateway": gateway, "director": director}


@pytest.mark.parametrize("role", ["director", "gateway"])
@pytest.mark.parametrize(
    "removal",
    [("flush", "ruleset"), ("delete", "table", "ip", "staticegress")],
    ids=["flush-ruleset", "delete-our-table"],
)
def test_a_removed_table_is_restored_within_a_second(
    world: dict[str, Any], role: str, removal: tuple[str, ...]
) -> None:
    lab: Lab = world["lab"]
    node = world[role]
    assert gateway_of(lab, EIP) == world["gateway"], "the gateway moved: the lab is not settled"
    restores = metric(node, "nft_restores_total")
    proc = probe(world["pod"], duration=3.0)
    time.sleep(1.0)
    start = time.monotonic()
    in_node(node, "nft", *removal)
    removed = time.monotonic()
    wait_for(
        "the agent's restore",
        lambda: metric(node, "nft_restores_total") > restores,
        seconds=5,
        every=0.01,
    )
    seen = time.monotonic() - removed
    took = metric(node, "nft_last_restore_seconds")
    res = probe_result(proc)
    if removal[0] == "flush":
        # The flush also took the lab CNI's masquerade: put it back as `lab up` made it.
        in_node(node, *(a.format(comment=f"lab cni ({lab.cni}) masquerade") for a in MASQUERADE))
    in_node(node, "nft", "list", "table", "ip", "staticegress")
    wrong = {src: n for src, n in res["sources"].items() if src != EIP}
    print(
        f"\n{' '.join(removal)} on the {role} ({lab.cni}): restored {took * 1000:.0f} ms after "
        f"notice, seen from outside after {seen * 1000:.0f} ms (command took "
        f"{(removed - start) * 1000:.0f} ms); probes: {res['sent']} sent, {res['lost']} lost "
        f"(longest gap {res['longest_gap_ms']:.0f} ms), wrong source {sum(wrong.values())} {wrong}"
    )
    assert not wrong, f"replies with another source: {wrong}"
    assert took < 1.0
    assert seen < 1.0
    assert res["received"] > res["sent"] // 2, res


def test_a_blackholed_api_server_shows_on_healthz_and_nothing_else_changes(
    world: dict[str, Any],
) -> None:
    lab: Lab = world["lab"]
    node = world["director"]
    state = lablib.load_state()
    assert state is not None
    api = urlsplit(state.server)
    assert http(node, "/healthz") == (200, "ok")
    proc = probe(world["pod"], duration=30.0, interval=0.05)
    time.sleep(1.0)
    # Drop this node's packets to the API server only (the managers' probes and
    # grants to the same host keep flowing): no reset, the watches just go quiet.
    in_node(
        node,
        "nft",
        f"add table inet watchdog_blackhole; add chain inet watchdog_blackhole out "
        f"{{ type filter hook output priority 0; }}; add rule inet watchdog_blackhole out "
        f"ip daddr {api.hostname} tcp dport {api.port} drop",
    )
    dropped = time.monotonic()
    try:
        code, body = wait_for(
            "/healthz to report the silent watches",
            lambda: (r := http(node, "/healthz"))[0] == 503 and r,
            seconds=20,
            every=0.2,
        )
        noticed = time.monotonic() - dropped
        assert re.match(r"watches silent: ([\w-]+ \d+s)(, [\w-]+ \d+s)*$", body), body
        assert http(node, "/livez") == (200, "ok")
        time.sleep(5.0)
        assert http(node, "/livez") == (200, "ok")
    finally:
        in_node(node, "nft", "delete", "table", "inet", "watchdog_blackhole")
    healed = time.monotonic()
    wait_for("/healthz ok again", lambda: http(node, "/healthz") == (200, "ok"), seconds=30)
    back = time.monotonic() - healed
    res = probe_result(proc)
    log = (lablib.state_dir() / "logs" / f"agent-{node}.log").read_text()
    replaced = len(re.findall(r"nothing heard for \S+: replacing the watch", log))
    print(
        f"\nAPI blackholed for {node} ({lab.cni}): /healthz 503 after {noticed:.1f}s "
        f"({body.strip()}), ok again {back:.1f}s after the heal; {replaced} silent watches "
        f"replaced; probes {res['sent']} sent, {res['lost']} lost, sources {res['sources']}"
    )
    assert code == 503
    assert noticed < 15.0
    assert replaced >= 1
    assert set(res["sources"]) == {EIP}
    assert res["lost"] <= 2, res
