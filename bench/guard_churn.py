"""Benchmark: the kernel's time to take pods out of the guard, by the guard's
set layout, side by side in one run.

The guard (render.nft.render_guard) must know, per selected pod, the
destinations its rules steer it for. Two layouts say the same:

- `concatenated`: one `ipv4_addr . ipv4_addr` interval set of pod . range
  (the kernel's pipapo set type; the layout before this bench);
- `classes`: pods with the same destinations share a class, a map sends a pod
  to its class's chain, and each class has a small interval set (the layout
  now).

The change measured is the one that stalled every agent of the 10,000-pod lab
for up to a minute: a node stops being the gateway of some of its egress IPs,
and their pods leave the guard. The synthetic cluster is bench/resync.py's on
3 nodes (the measured node SNATs a third of the pods); the classes' figure is
the agent's own in-place update of both tables (render.nftdiff), the
concatenated one only the deletion of the same pods' elements. Kernel time
(system CPU of the thread that applies) and wall time, in a throwaway network namespace
each. Root only.

    python bench/guard_churn.py [--pods 10000 --rules 1000 --moved 0.05 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import resource
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Any

from _cluster import snapshot
from resync import cluster

from staticegress.agent.agent import RELEASE_SETS
from staticegress.api.types import NodeName
from staticegress.dataplane.netns import NetnsRunner
from staticegress.k8s.snapshot import ParseCache
from staticegress.model.desired import AgentConfig, DesiredState, compute_desired
from staticegress.render.nft import render_ruleset
from staticegress.render.nftdiff import incremental_update, table_state

NODES = 3


def _desired(objs: dict[str, dict[str, Any]], cache: ParseCache) -> DesiredState:
    snap, _ = snapshot(objs, cache)
    return compute_desired(snap, AgentConfig(node=NodeName("node-0"), transport="vxlan"))


def _moved(objs: dict[str, dict[str, Any]], share: float) -> dict[str, dict[str, Any]]:
    """`objs` with `share` of the StaticEgressIPs' node-0 egress IPs moved to node-1."""
    out = copy.deepcopy(objs)
    names = sorted(out["policies"])
    for name in names[: int(len(names) * share)]:
        pol = out["policies"][name]
        for entry in pol["status"]["egressIPs"]:
            if entry["gateway"] == "node-0":
                entry["gateway"] = "node-1"
        pol["metadata"]["resourceVersion"] += "-moved"
    return out


def _guarded(desired: DesiredState) -> dict[IPv4Address, list[IPv4Network]]:
    """Pod -> the ranges the guard holds for it (its pieces, collapsed)."""
    nets: dict[IPv4Address, list[IPv4Network]] = defaultdict(list)
    for ip, net, _ in (*desired.steer_pieces, *desired.snat_pieces):
        nets[ip].append(net)
    return {ip: list(collapse_addresses(n)) for ip, n in nets.items()}


def _pairs(desired: DesiredState) -> list[str]:
    """The concatenated layout's elements, in nft's syntax."""
    return [f"{ip} . {net}" for ip, nets in _guarded(desired).items() for net in nets]


def _in_netns(work: Callable[[], None]) -> None:
    """Run `work` in a fresh network namespace, on a thread of its own."""
    name = f"sebench-guard-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    runner = NetnsRunner(name)
    try:
        asyncio.run(runner.run(work))
    finally:
        runner.close()
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _timed(run: Callable[[Any], None], arg: Any) -> tuple[float, float]:
    r0, t = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
    run(arg)
    r1 = resource.getrusage(resource.RUSAGE_THREAD)
    return time.perf_counter() - t, r1.ru_stime - r0.ru_stime


def measure(pods: int, rules: int, share: float) -> dict[str, Any]:
    import nftables

    base = cluster(pods, rules, nodes=NODES, gateways=NODES)
    cache = ParseCache()
    before, after = _desired(base, cache), _desired(_moved(base, share), cache)
    old_batch = render_ruleset(before, transport="vxlan")
    new_batch = render_ruleset(after, transport="vxlan")
    removed = sorted(set(_pairs(before)) - set(_pairs(after)))
    out: dict[str, Any] = {
        "pods guarded": f"{len(_guarded(before))} -> {len(_guarded(after))}",
        "pod . range removed": len(removed),
    }
    figures: dict[str, tuple[float, float]] = {}

    def ctx() -> Any:
        c = nftables.Nftables()
        c.set_json_output(True)
        return c

    def json_run(c: Any, doc: Any) -> None:
        rc, _, err = c.json_cmd(doc)
        if rc != 0:
            raise RuntimeError(f"nft refused a batch: {err}")

    def text_run(c: Any, text: str) -> None:
        rc, _, err = c.cmd(text)
        if rc != 0:
            raise RuntimeError(f"nft refused a batch: {err}")

    def classes() -> None:
        c = ctx()
        json_run(c, old_batch)
        updates = incremental_update(
            table_state([old_batch]), table_state([new_batch]), release=RELEASE_SETS
        )
        wall, kernel = _timed(lambda ups: [json_run(c, u) for u in ups], updates)
        figures["classes"] = (wall, kernel)

    def concatenated() -> None:
        c = ctx()
        text_run(
            c,
            "add table ip bench_guard; add set ip bench_guard pod_destinations "
            "{ type ipv4_addr . ipv4_addr; flags interval; }",
        )
        text_run(
            c, "add element ip bench_guard pod_destinations { " + ", ".join(_pairs(before)) + " }"
        )
        wall, kernel = _timed(
            lambda elems: text_run(
                c, "delete element ip bench_guard pod_destinations { " + ", ".join(elems) + " }"
            ),
            removed,
        )
        figures["concatenated"] = (wall, kernel)

    for name, work in (("classes", classes), ("concatenated", concatenated)):
        print(f"  {name}: {len(removed)} pod . range pairs out ...", file=sys.stderr, flush=True)
        _in_netns(work)
    out.update(figures)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--rules", type=int, default=1_000)
    ap.add_argument("--moved", type=float, nargs="+", default=[0.05, 0.2])
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/guard_churn.py needs root (network namespaces)")
    print(f"pods leaving the guard, {args.pods} pods, {args.rules} rules, {NODES} nodes")
    print(
        f"{'moved':>6} {'guarded':>13} {'removed':>8}   {'layout':<13}{'wall s':>9}{'kernel s':>10}"
    )
    for share in args.moved:
        res = measure(args.pods, args.rules, share)
        for layout in ("concatenated", "classes"):
            wall, kernel = res[layout]
            print(
                f"{share:>6.0%} {res['pods guarded']:>13} {res['pod . range removed']:>8}   "
                f"{layout:<13}{wall:>9.3f}{kernel:>10.3f}"
            )
        ratio = res["concatenated"][0] / max(res["classes"][0], 1e-6)
        print(f"{'':>31}concatenated / classes (wall): {ratio:.0f}x", flush=True)


if __name__ == "__main__":
    main()
