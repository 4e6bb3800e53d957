"""Benchmark: one full agent resync at scale, in CPU seconds, and how it grows.

A synthetic cluster of N pods on 100 nodes and R rules (5 per StaticEgressIP,
10 pods each, 10 gateway nodes); the measured node hosts 1% of the pods and is
one of the gateways. One resync = parse the raw objects (the API edge),
compute the desired state, render the nftables batch and the routing spec;
with root it also applies the batch to a throwaway network namespace (kernel
time is not agent CPU, so it is printed apart).

Figures are printed side by side for a small and a large cluster in one run:
the machines are noisy, so the ratio between them says more than either
number. The target: the large case (10,000 pods, 1,000 rules) well under one
second of agent CPU, and a table that grows with rules, not pods x rules.

    python bench/resync.py [--pods 10000 --rules 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
import uuid
from ipaddress import IPv4Address
from typing import Any

from _cluster import snapshot

from staticegress.api.types import NodeName
from staticegress.k8s.snapshot import ParseCache
from staticegress.model.desired import AgentConfig, compute_desired
from staticegress.render.netlink import RoutingConfig, render_netlink
from staticegress.render.nft import render_ruleset

NODES = 100
GATEWAYS = 10


def cluster(
    pods: int, rules: int, *, nodes: int = NODES, gateways: int = GATEWAYS
) -> dict[str, dict[str, Any]]:
    """Raw objects of the synthetic cluster: node i's pods in 10.(100+i).0.0/16."""
    assert nodes <= 150
    apps = rules
    node_objs = {
        f"node-{i}": {
            "metadata": {"name": f"node-{i}"},
            "spec": {"podCIDR": f"10.{100 + i}.0.0/16"},
            "status": {"addresses": [{"type": "InternalIP", "address": f"172.20.0.{i + 1}"}]},
        }
        for i in range(nodes)
    }
    pod_objs = {}
    for p in range(pods):
        node = p % nodes
        host = 2 + p // nodes
        ip = f"10.{100 + node}.{host // 256}.{host % 256}"
        pod_objs[f"default/p{p}"] = {
            "metadata": {
                "namespace": "default",
                "name": f"p{p}",
                "labels": {"app": f"app-{p % apps}"},
            },
            "spec": {"nodeName": f"node-{node}"},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }
    policies = {}
    per_cr = 5
    for c in range(rules // per_cr):
        rule_list, status = [], []
        for r in range(per_cr):
            k = c * per_cr + r
            eip = str(IPv4Address("100.64.0.0") + k)
            rule_list.append(
                {
                    "egressip": eip,
                    "pod-selector": {"matchLabels": {"app": f"app-{k}"}},
                    "cidrs": [f"203.0.{k % 256}.0/24", f"198.18.{k % 256}.0/24"],
                }
            )
            status.append({"egressIP": eip, "gateway": f"node-{k % gateways}"})
        policies[f"default/cr{c}"] = {
            "apiVersion": "staticegressips.io/v1alpha1",
            "kind": "StaticEgressIP",
            "metadata": {
                "namespace": "default",
                "name": f"cr{c}",
                "uid": str(c),
                "generation": 1,
                "creationTimestamp": f"2026-01-01T00:{c // 60 % 60:02d}:{c % 60:02d}Z",
            },
            "spec": {"rules": rule_list},
            "status": {"egressIPs": status},
        }
    # Every stored object has a resourceVersion; the parse cache keys on it.
    for i, obj in enumerate([*policies.values(), *pod_objs.values(), *node_objs.values()]):
        obj["metadata"]["resourceVersion"] = str(1000 + i)
    return {"policies": policies, "pods": pod_objs, "nodes": node_objs}


def resync(
    objs: dict[str, dict[str, Any]], cache: ParseCache | None = None
) -> tuple[dict[str, float], Any, Any]:
    times: dict[str, float] = {}
    t = time.process_time()
    snap, _ = snapshot(objs, cache)
    times["parse"] = time.process_time() - t
    t = time.process_time()
    desired = compute_desired(snap, AgentConfig(node=NodeName("node-0"), transport="vxlan"))
    times["compute"] = time.process_time() - t
    t = time.process_time()
    batch = render_ruleset(desired, transport="vxlan")
    spec = render_netlink(
        desired,
        transport="vxlan",
        cfg=RoutingConfig(uplink="eth0", uplink_ip=IPv4Address("172.20.0.1")),
    )
    times["render"] = time.process_time() - t
    times["total"] = sum(times.values())
    return times, batch, (desired, spec)


def apply_seconds(batch: dict[str, Any]) -> float | None:
    if os.geteuid() != 0:
        return None
    from staticegress.dataplane.netns import NetnsRunner
    from staticegress.dataplane.nft import NftApplier

    ns = f"sebench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nft = NftApplier(NetnsRunner(ns))
        t = time.perf_counter()
        asyncio.run(nft.apply(batch))
        return time.perf_counter() - t
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def measure(pods: int, rules: int, repeat: int) -> dict[str, Any]:
    objs = cluster(pods, rules)
    runs = [resync(objs) for _ in range(repeat)]  # cold: every object parsed
    med = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
    cache = ParseCache()
    resync(objs, cache)
    # Warm: the agent's steady state, where a resync re-parses only what changed.
    med["warm_total"] = statistics.median(resync(objs, cache)[0]["total"] for _ in range(repeat))
    batch, (desired, spec) = runs[0][1], runs[0][2]
    cmds = batch["nftables"]
    return {
        "pods": pods,
        "rules": rules,
        **med,
        "nft_rules": sum(1 for c in cmds if "rule" in c.get("add", {})),
        "nft_elements": sum(
            len(c["add"][k].get("elem", []))
            for c in cmds
            for k in ("set", "map")
            if k in c.get("add", {})
        ),
        "steered": desired.pods_steered,
        "snat": desired.pods_snat,
        "routes": len(spec.routes),
        "apply": apply_seconds(batch),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--rules", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    small = measure(args.pods // 10, args.rules // 10, args.repeat)
    large = measure(args.pods, args.rules, args.repeat)
    print(f"full resync, median of {args.repeat}, agent CPU seconds (process time)")
    print(f"{'':24}{'small':>12}{'large':>12}{'ratio':>9}")
    for key in (
        "pods",
        "rules",
        "parse",
        "compute",
        "render",
        "total",
        "warm_total",
        "nft_rules",
        "nft_elements",
        "steered",
        "snat",
        "routes",
        "apply",
    ):
        a, b = small[key], large[key]
        if a is None or b is None:
            print(f"{key:24}{'-':>12}{'-':>12}   (needs root)")
            continue
        fmt = "{:>12.4f}" if isinstance(a, float) else "{:>12}"
        ratio = f"{b / a:>8.1f}x" if a else ""
        print(f"{key:24}" + fmt.format(a) + fmt.format(b) + ratio)
    verdict = "PASS" if large["total"] < 1.0 else "OVER"
    print(
        f"\nlarge resync: {large['total']:.3f} s agent CPU with every object parsed, "
        f"{large['warm_total']:.3f} s in steady state (target < 1 s: {verdict}); "
        f"{large['nft_rules']} nft rules for {large['rules']} rules and {large['pods']} pods"
    )


if __name__ == "__main__":
    main()
