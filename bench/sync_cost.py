"""Benchmark: where one agent sync's time goes, phase by phase, at the sizes of
the realization bench, with the interpreter's default collector settings and
with the ones the agent and manager run with (`cli.service.tune_gc`).

A sync here is what the agent runs on its thread after a pod appears: the
snapshot from the (warm) parse cache, the desired state, the nftables batch,
the table model of that batch, and the in-place update against the previous
one. The cluster is `bench/resync.py`'s, on 3 nodes like the lab (every node a
gateway: the measured node steers a third of the selected pods and SNATs a
third). Wall-clock seconds, since the collector's pauses land on the sync's
thread; both settings run interleaved in one process, side by side, because
these machines are noisy.

    python bench/sync_cost.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from typing import Any

from _cluster import snapshot
from resync import cluster

from staticegress.agent.agent import RELEASE_SETS
from staticegress.api.types import NodeName
from staticegress.cli.service import GC_YOUNGEST
from staticegress.k8s.snapshot import ParseCache
from staticegress.model.desired import AgentConfig, compute_desired
from staticegress.render.nft import render_ruleset
from staticegress.render.nftdiff import incremental_update, table_state

NODES = 3
PHASES = ("parse", "compute", "render", "state", "diff", "total")
SIZES = ((2_000, 200), (10_000, 1_000))


def _with_new_pod(objs: dict[str, dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """`objs` plus one more pod on the measured node, selected by rule 0."""
    out = dict(objs)
    out["pods"] = dict(objs["pods"])
    pod = copy.deepcopy(objs["pods"]["default/p0"])
    host = 60_000 + n
    ip = f"10.100.{host // 256}.{host % 256}"
    pod["metadata"].update(name=f"new{n}", resourceVersion=str(10_000_000 + n))
    pod["status"].update(podIP=ip, podIPs=[{"ip": ip}])
    out["pods"][f"default/new{n}"] = pod
    return out


def one_sync(
    objs: dict[str, dict[str, Any]], cache: ParseCache, previous: Any
) -> tuple[dict[str, float], Any]:
    times: dict[str, float] = {}
    t = time.perf_counter()
    snap, _ = snapshot(objs, cache)
    times["parse"] = time.perf_counter() - t
    t = time.perf_counter()
    desired = compute_desired(snap, AgentConfig(node=NodeName("node-0"), transport="vxlan"))
    times["compute"] = time.perf_counter() - t
    t = time.perf_counter()
    batch = render_ruleset(desired, transport="vxlan")
    times["render"] = time.perf_counter() - t
    t = time.perf_counter()
    state = table_state([batch])
    times["state"] = time.perf_counter() - t
    t = time.perf_counter()
    if previous is not None:
        incremental_update(previous, state, release=RELEASE_SETS)
    times["diff"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    return times, state


def measure(pods: int, rules: int, repeat: int) -> dict[str, dict[str, float]]:
    base = cluster(pods, rules, nodes=NODES, gateways=NODES)
    settings = {"default": gc.get_threshold(), "tuned": (GC_YOUNGEST, *gc.get_threshold()[1:])}
    cache = ParseCache()
    _, state = one_sync(base, cache, None)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for n in range(repeat):
        for name, threshold in settings.items():
            objs = _with_new_pod(base, n * len(settings) + len(runs[name]))
            gc.collect()
            gc.set_threshold(*threshold)
            try:
                times, _ = one_sync(objs, cache, state)
            finally:
                gc.set_threshold(*settings["default"])
            runs[name].append(times)
    return {
        name: {p: statistics.median(r[p] for r in results) for p in PHASES}
        for name, results in runs.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"one agent sync after a new pod, {NODES} nodes, median of {args.repeat}, wall seconds")
    print(f"{'pods':>6} {'rules':>6} {'collector':>10}" + "".join(f"{p:>9}" for p in PHASES))
    for pods, rules in SIZES:
        print(f"  building {pods} pods, {rules} rules ...", file=sys.stderr, flush=True)
        res = measure(pods, rules, args.repeat)
        for name, med in res.items():
            print(f"{pods:>6} {rules:>6} {name:>10}" + "".join(f"{med[p]:>9.3f}" for p in PHASES))
        ratio = res["tuned"]["total"] / res["default"]["total"]
        print(f"{'':>25}tuned / default total: {ratio:.2f}x")


if __name__ == "__main__":
    main()
