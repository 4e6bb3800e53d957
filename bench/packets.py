"""Benchmark: the per-packet cost of our nftables dataplane on a director and on
a gateway, as the number of rules grows, against a node without our table.

The cluster is synthetic (see bench/_cluster.py): 10,000 selected pods on 100
nodes, 10 of them gateways, each rule with two destination ranges of its own
(some shared, some with an exclusion) and one egress IP. The measured node is
node-0: director for its own selected pods (towards 9 remote gateways) and
gateway for the egress IPs the status gives it. Its tables and routing are
built by the product itself: `compute_desired` on the snapshot, then
`render_ruleset` and `render_netlink`, applied with the agent's appliers; so
the benchmark measures whatever the product renders.

Topology, in network namespaces `sebench-<tag>-*`, one path per configuration
(no table; and per rule count, node-0's dataplane when the last rule's
gateway is elsewhere, and when it is node-0), each programmed once:

    client (pod addresses 10.244.x.y) -- node (node-0: forwarding, the CNI's
    masquerade, our table and routing) -- server (203.0.113.10, also answering
    for the gateway nodes' addresses, so that a gateway slot's route ends there)

Cases, each measured at every rule count (0 = no table: the baseline, a node
as the CNI leaves it, forwarding and masquerade):
- director: a node-0 pod selected by the rule that comes last in the global
  order (the worst case), steered to a remote gateway's slot (the server
  must see the pod's own address);
- gateway: a node-1 pod (a remote director's pod, arriving at node-0)
  selected by the last rule, whose egress IP node-0 owns and SNATs to (the
  server must see the egress IP);
- unselected: a node-0 pod no rule selects (it pays only the cheap exit; the
  server must see the node's address).
A case whose traffic reaches the server with another source address fails
the run: it took the wrong path.

Each is measured with iperf3: 64-byte UDP at an unlimited rate (packets per
second the server received) and one TCP stream (Gbit/s). The machines are
noisy: the runs of one case go baseline, 100, 1,000 rules back to back, for
`--repeat` rounds (the order reversed every other round), and each ratio is
the median over the rounds of that round's figure over that round's
baseline. The target: at least 0.9x at 1,000 rules. The size of the
programmed ruleset (rules, set and map elements) is printed per row.

Needs root; takes the machine's lab lock (/tmp/staticegress-lab.lock). About
3 minutes with the defaults.

    python bench/packets.py [--rules 0,100,1000] [--duration 2] [--repeat 3]
                            [--pods 10000] [--cases director,unselected,gateway]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

import _cluster as cl
from _netns import BenchError, Iperf, Lab, NftSize, lab, nft_size, progress

CASES = ("director", "unselected", "gateway")
TARGET = 0.9


@dataclass(frozen=True)
class Path:
    """client -> node -> server, the node programmed for one configuration."""

    client: str
    node: str
    iperf: Iperf
    size: NftSize


def build_path(bench: Lab, name: str, *, masquerade: bool, seconds: float) -> Path:
    client = bench.netns(f"{name}-client")
    node = bench.netns(f"{name}-node", forwarding=True)
    server = bench.netns(f"{name}-server")
    bench.veth(client, "eth0", node, "pods")
    bench.veth(node, cl.UPLINK, server, "eth0")
    me = cl.node_ip(0)
    bench.ip(
        client,
        *(f"addr add {a}/32 dev eth0" for a in (cl.LOCAL_SELECTED, cl.REMOTE_SELECTED)),
        f"addr add {cl.UNSELECTED}/32 dev eth0",
        "route add 10.244.0.1/32 dev eth0",
        "route add default via 10.244.0.1 dev eth0",
    )
    bench.ip(
        node,
        "addr add 10.244.0.1/32 dev pods",
        f"route add {cl.POD_SUPERNET} dev pods",
        f"addr add {me}/{cl.UNDERLAY.prefixlen} dev {cl.UPLINK}",
        f"route add {cl.SERVER_RANGE} via {cl.ROUTER}",
    )
    # The server also answers for the other nodes' addresses: a gateway slot's
    # route ("default via <gateway node> onlink") then delivers to it.
    bench.ip(
        server,
        f"addr add {cl.ROUTER}/{cl.UNDERLAY.prefixlen} dev eth0",
        f"addr add {cl.SERVER}/32 dev eth0",
        *(f"addr add {cl.node_ip(i)}/32 dev eth0" for i in range(1, 10)),
        f"route add {cl.POD_SUPERNET} via {me}",
        f"route add {cl.EGRESS_SUPERNET} via {me}",
    )
    if masquerade:
        bench.nft(node, cl.cni_masquerade())
    iperf = Iperf(bench, server, cl.SERVER, seconds=seconds)
    iperf.start()
    return Path(client, node, iperf, (0, 0))


def source_of(case: str, rules: int, *, masquerade: bool) -> tuple[IPv4Address, str]:
    """The client's address for `case`, and the source the server must see."""
    client = {"director": cl.LOCAL_SELECTED, "gateway": cl.REMOTE_SELECTED}.get(case, cl.UNSELECTED)
    if rules and case == "director":
        return client, str(client)  # steered: the identity SNAT keeps the pod's address
    if rules and case == "gateway":
        return client, str(cl.egress_ip(rules - 1))
    return client, str(cl.node_ip(0)) if masquerade else str(client)


def path_key(case: str, rules: int) -> tuple[int, int]:
    """(rules, the last rule's gateway): the configuration a case runs on."""
    if rules == 0:
        return 0, 0
    return rules, 0 if case == "gateway" else 1


@dataclass(frozen=True)
class Row:
    case: str
    rules: int
    size: NftSize
    pps: float
    pps_ratio: float
    gbps: float
    gbps_ratio: float
    seen: str


def run(args: argparse.Namespace) -> list[Row]:
    samples: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    paths: dict[tuple[int, int], Path] = {}
    with lab() as bench:
        for case in args.cases:
            for rules in args.rules:
                key = path_key(case, rules)
                if key in paths:
                    continue
                name = f"r{key[0]}g{key[1]}"
                path = build_path(bench, name, masquerade=args.masquerade, seconds=args.duration)
                if rules:
                    progress(f"rules {rules}: rendering and applying node-0's dataplane ({case})")
                    cluster = cl.build(
                        pods=args.pods, rules=rules, last_gateway=key[1], nodes=args.nodes
                    )
                    cl.apply(path.node, cl.render(cluster, node=0, transport="direct"))
                size = nft_size(path.node, skip=(cl.CNI_TABLE,))
                paths[key] = replace(path, size=size)
        for round_ in range(args.repeat):
            for case in args.cases:
                for rules in args.rules if round_ % 2 == 0 else args.rules[::-1]:
                    path = paths[path_key(case, rules)]
                    src, want = source_of(case, rules, masquerade=args.masquerade)
                    progress(f"round {round_ + 1}/{args.repeat}: {case}, {rules} rules")
                    pps, seen_udp = path.iperf.udp_pps(path.client, src)
                    gbps, seen_tcp = path.iperf.tcp_gbps(path.client, src)
                    if {seen_udp, seen_tcp} != {want}:
                        raise BenchError(
                            f"{case} at {rules} rules: the server saw {seen_udp} (UDP) and "
                            f"{seen_tcp} (TCP), not {want}: the traffic took the wrong path"
                        )
                    samples[(case, rules)].append((pps, gbps))
    rows = []
    for case in args.cases:
        base = samples[(case, 0)]
        for rules in args.rules:
            runs = samples[(case, rules)]
            rows.append(
                Row(
                    case=case,
                    rules=rules,
                    size=paths[path_key(case, rules)].size,
                    pps=statistics.median(p for p, _ in runs),
                    pps_ratio=statistics.median(
                        p / b[0] for (p, _), b in zip(runs, base, strict=True)
                    ),
                    gbps=statistics.median(g for _, g in runs),
                    gbps_ratio=statistics.median(
                        g / b[1] for (_, g), b in zip(runs, base, strict=True)
                    ),
                    seen=source_of(case, rules, masquerade=args.masquerade)[1],
                )
            )
    return rows


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        f"per-packet cost of the dataplane: {args.pods} selected pods, {args.nodes} nodes; "
        f"iperf3 {args.duration:g} s per run (after 1 s left out), median of {args.repeat} "
        f"rounds; kernel {platform.release()}"
    )
    print(
        "baseline (0 rules): no table of ours; "
        + ("the CNI's masquerade on the node" if args.masquerade else "plain forwarding")
    )
    head = (
        f"{'case':12}{'rules':>6}{'nft rules':>10}{'elements':>10}{'UDP pps':>12}{'ratio':>8}"
        f"{'TCP Gbit/s':>12}{'ratio':>8}  source seen by the server"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.case:12}{r.rules:>6}{r.size[0]:>10}{r.size[1]:>10}"
            f"{r.pps:>12,.0f}{r.pps_ratio:>7.2f}x{r.gbps:>12.2f}{r.gbps_ratio:>7.2f}x  {r.seen}"
        )
    top = max(args.rules)
    if not top:
        return
    print(f"\ntarget at {top} rules: >= {TARGET:.1f}x of the baseline")
    for r in rows:
        if r.rules == top:
            verdict = "PASS" if min(r.pps_ratio, r.gbps_ratio) >= TARGET else "MISSED"
            print(f"  {r.case:12} UDP {r.pps_ratio:.2f}x, TCP {r.gbps_ratio:.2f}x: {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rules", default="0,100,1000", help="comma-separated; 0 is the baseline")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median is kept")
    ap.add_argument("--pods", type=int, default=10_000, help="selected pods in the cluster")
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--cases", default=",".join(CASES), help=f"among {','.join(CASES)}")
    ap.add_argument(
        "--no-masquerade",
        dest="masquerade",
        action="store_false",
        help="no CNI masquerade on the node (then the baseline has no NAT at all)",
    )
    args = ap.parse_args()
    args.rules = sorted({0, *(int(r) for r in args.rules.split(",") if r.strip())})
    args.cases = [c for c in args.cases.split(",") if c]
    if unknown := set(args.cases) - set(CASES):
        ap.error(f"unknown cases: {', '.join(sorted(unknown))}")
    try:
        rows = run(args)
    except BenchError as exc:
        sys.exit(f"bench failed: {exc}")
    report(rows, args)


if __name__ == "__main__":
    main()
