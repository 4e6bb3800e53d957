"""Benchmark: TCP throughput of the egress path, in both transports, against the
same pod leaving through its own node with a plain masquerade.

The cluster is synthetic (see bench/_cluster.py; by default 10 rules, 100
selected pods, 10 nodes of which node-0 and node-1 are gateways). The client
is a pod on node-0 selected by the last rule, whose egress IP node-1 owns.
Both nodes' tables and routing are built by the product itself:
`compute_desired` for node-0 (the director) and for node-1 (the gateway),
then `render_ruleset` and `render_netlink`, applied with the agent's
appliers (for `vxlan`, that includes the product's tunnel link and its
return routes).

Topology, in network namespaces `sebench-<tag>-*`, one set per path, all
built before the first run:

    masquerade: pod -- node-0 (CNI masquerade) -- lan bridge -- server
    direct:     pod -- node-0 (director) -- lan -- node-1 (gateway, SNAT) -- lan -- server
    vxlan:      the same, node-0 to node-1 through the product's VXLAN tunnel

The nodes share one L2 segment (the `lan` namespace's bridge) with the server
(203.0.113.10, behind 172.20.255.254), which reaches an egress IP by ARP, as
in a real segment. Every node has the CNI's masquerade too: our SNATs must
win over it. With `direct`, node-1 routes node-0's pod range via node-0
(host-gw); with `vxlan` it has no such route, and replies go back through
the product's return routes in the tunnel. The server must see the node's
address (masquerade) or the egress IP (direct, vxlan); anything else fails
the run.

Each path is measured with one iperf3 TCP stream; the paths take turns, for
`--repeat` rounds, and each ratio is the median over the rounds of that
round's figure over that round's masquerade (the machines are noisy). The
target: at least 0.9x in both transports.

Needs root; takes the machine's lab lock (/tmp/staticegress-lab.lock). About
a minute with the defaults.

    python bench/throughput.py [--duration 5] [--repeat 3] [--rules 10 --pods 100]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections import defaultdict

import _cluster as cl
from _netns import BenchError, Iperf, Lab, lab, progress

from staticegress.model.desired import Transport

PATHS = ("masquerade", "direct", "vxlan")
TARGET = 0.9
DIRECTOR, GATEWAY = 0, 1


def build_path(
    bench: Lab, name: str, cluster: cl.Cluster | None, seconds: float
) -> tuple[str, Iperf]:
    """One path's namespaces, programmed; `cluster` None: plain masquerade.
    Returns the pod's namespace and the iperf3 server at the end, listening."""
    transports: dict[str, Transport] = {"direct": "direct", "vxlan": "vxlan"}
    transport = transports.get(name)
    lan = bench.netns(f"{name}-lan")
    pod = bench.netns(f"{name}-pod")
    nodes = [bench.netns(f"{name}-node{i}", forwarding=True) for i in (DIRECTOR, GATEWAY)]
    server = bench.netns(f"{name}-server")
    bench.ip(lan, "link add br0 type bridge", "link set br0 up")
    for port, ns in (("n0", nodes[0]), ("n1", nodes[1]), ("srv", server)):
        bench.veth(lan, port, ns, cl.UPLINK)
        bench.ip(lan, f"link set {port} master br0")
    bench.veth(pod, "eth0", nodes[0], "pods")
    bench.ip(
        pod,
        f"addr add {cl.LOCAL_SELECTED}/32 dev eth0",
        "route add 10.244.0.1/32 dev eth0",
        "route add default via 10.244.0.1 dev eth0",
    )
    for i, ns in enumerate(nodes):
        bench.ip(
            ns,
            f"addr add {cl.node_ip(i)}/{cl.UNDERLAY.prefixlen} dev {cl.UPLINK}",
            f"route add {cl.SERVER_RANGE} via {cl.ROUTER}",
        )
        bench.nft(ns, cl.cni_masquerade())
    bench.ip(
        nodes[0],
        f"addr add {cl.pod_range(0).network_address + 1}/32 dev pods",
        f"route add {cl.pod_range(0)} dev pods",
    )
    if transport == "direct":  # host-gw: pod ranges routed via their node
        bench.ip(nodes[1], f"route add {cl.pod_range(0)} via {cl.node_ip(0)}")
    bench.ip(
        server,
        f"addr add {cl.ROUTER}/{cl.UNDERLAY.prefixlen} dev {cl.UPLINK}",
        f"addr add {cl.SERVER}/32 dev {cl.UPLINK}",
        f"route add {cl.EGRESS_SUPERNET} dev {cl.UPLINK}",  # egress IPs answer ARP
    )
    if cluster is not None and transport is not None:
        for i, ns in enumerate(nodes):
            progress(f"{name}: rendering and applying node-{i}'s dataplane")
            cl.apply(ns, cl.render(cluster, node=i, transport=transport))
    iperf = Iperf(bench, server, cl.SERVER, seconds=seconds)
    iperf.start()
    return pod, iperf


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median is kept")
    ap.add_argument("--rules", type=int, default=10)
    ap.add_argument("--pods", type=int, default=100, help="selected pods in the cluster")
    ap.add_argument("--nodes", type=int, default=10)
    args = ap.parse_args()
    cluster = cl.build(
        pods=args.pods, rules=args.rules, last_gateway=GATEWAY, nodes=args.nodes, gateways=2
    )
    eip = str(cl.egress_ip(args.rules - 1))
    want = {"masquerade": str(cl.node_ip(DIRECTOR)), "direct": eip, "vxlan": eip}
    samples: dict[str, list[float]] = defaultdict(list)
    try:
        with lab() as bench:
            paths = {
                name: build_path(
                    bench, name, None if name == "masquerade" else cluster, args.duration
                )
                for name in PATHS
            }
            for round_ in range(args.repeat):
                for name in PATHS if round_ % 2 == 0 else PATHS[::-1]:
                    progress(f"round {round_ + 1}/{args.repeat}: {name}")
                    client, iperf = paths[name]
                    gbps, seen = iperf.tcp_gbps(client, cl.LOCAL_SELECTED)
                    if seen != want[name]:
                        raise BenchError(
                            f"{name}: the server saw {seen}, not {want[name]}: wrong path"
                        )
                    samples[name].append(gbps)
    except BenchError as exc:
        sys.exit(f"bench failed: {exc}")

    base = samples["masquerade"]
    print(
        f"egress path throughput: one TCP stream, iperf3 {args.duration:g} s per run "
        f"(after 1 s left out), median of {args.repeat} rounds; {args.rules} rules, "
        f"{cluster.selected_pods} selected pods, {args.nodes} nodes; kernel {platform.release()}"
    )
    head = f"{'path':12}{'Gbit/s':>10}{'ratio':>8}  {'runs (Gbit/s)':24}source seen by the server"
    print(head)
    print("-" * len(head))
    ratios = {}
    for name in PATHS:
        runs = samples[name]
        ratios[name] = statistics.median(g / b for g, b in zip(runs, base, strict=True))
        shown = " ".join(f"{g:.2f}" for g in runs)
        print(
            f"{name:12}{statistics.median(runs):>10.2f}{ratios[name]:>7.2f}x  {shown:24}"
            f"{want[name]}"
        )
    print(f"\ntarget: >= {TARGET:.1f}x of the masquerade")
    for name in ("direct", "vxlan"):
        verdict = "PASS" if ratios[name] >= TARGET else "MISSED"
        print(f"  {name:10} {ratios[name]:.2f}x: {verdict}")


if __name__ == "__main__":
    main()
