"""`staticegress lab ...`: argument parsing and output for the lab's subcommands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from ipaddress import IPv4Address
from pathlib import Path

from staticegress.controlplane.binaries import COMPONENTS, find
from staticegress.lab import lab, plan
from staticegress.lab.kubelet import run_kubelet
from staticegress.lab.probe import probe_command, run_probe
from staticegress.lab.servers import serve


def _say(line: str) -> None:
    print(f"[lab] {line}", file=sys.stderr, flush=True)


def _up(args: argparse.Namespace) -> int:
    state = lab.up(
        nodes=args.nodes,
        cni=args.cni,
        progress=_say,
        agents=not args.no_agents,
        runtime=args.runtime,
        pool=not args.no_pool,
    )
    kubectl = find(next(c for c in COMPONENTS if c.name == "kubectl"))
    print(lab.describe(state, kubectl))
    return 0


def _down(args: argparse.Namespace) -> int:
    lab.down(progress=_say)
    return 0


def _status(args: argparse.Namespace) -> int:
    print(lab.status())
    return 0


def _exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    argv = lab.exec_argv(args.target, command)
    os.execvp(argv[0], argv)


def _node(args: argparse.Namespace) -> int:
    if args.action == "kill":
        lab.node_kill(args.name, progress=_say)
    elif args.action == "reboot":
        lab.node_reboot(args.name, progress=_say)
    elif args.action == "restore":
        lab.node_restore(args.name, progress=_say)
    else:
        lab.node_partition(args.name, heal=args.action == "heal", progress=_say)
    return 0


def _probe(args: argparse.Namespace) -> int:
    inner = probe_command(
        server=args.server, port=args.port, interval=args.interval, duration=args.duration
    )
    argv = lab.exec_argv(args.target, inner)
    os.execvp(argv[0], argv)


def _probe_run(args: argparse.Namespace) -> int:
    res = run_probe(
        server=args.server, port=args.port, interval=args.interval, duration=args.duration
    )
    print(res.to_json())
    return 0


def _agent(args: argparse.Namespace) -> int:
    lab.agent_control(args.name, start=args.action == "start", kill=args.kill, progress=_say)
    return 0


def _manager(args: argparse.Namespace) -> int:
    lab.manager_control(args.index, start=args.action == "start", kill=args.kill, progress=_say)
    return 0


def _apiserver(args: argparse.Namespace) -> int:
    lab.apiserver_control(start=args.action == "start", progress=_say)
    return 0


def _kubelet(args: argparse.Namespace) -> int:
    node = plan.node_by_name(args.node, args.nodes)
    asyncio.run(
        run_kubelet(
            kubeconfig=Path(args.kubeconfig),
            node=node,
            cni=args.cni,
            state_dir=Path(args.state_dir),
            routes_only=args.routes_only,
        )
    )
    return 0


def _install(args: argparse.Namespace) -> int:
    lab.install(progress=_say)
    return 0


def _node_init(args: argparse.Namespace) -> int:
    from staticegress.lab.realnode import node_init

    return node_init(args.node, args.cni, args.nodes)


def _serve(args: argparse.Namespace) -> int:
    asyncio.run(
        serve(
            [IPv4Address(a) for a in args.address], http_port=args.http_port, udp_port=args.udp_port
        )
    )
    return 0


def _node_identity(p: argparse.ArgumentParser) -> None:
    """Which lab node an internal per-node process serves."""
    p.add_argument("--node", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--cni", choices=plan.CNIS, required=True)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab",
        help="a local cluster of network-namespace nodes and pods (root, Linux)",
        description="A small Kubernetes cluster made of network namespaces, driven by a real "
        "control plane: the local demo and the e2e test bed. Pods are network namespaces; "
        "no container images are run.",
    )
    lsub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    up = lsub.add_parser(
        "up",
        help="bring the lab up (idempotent)",
        description="Build the underlay, the router with the external "
        "servers, N nodes, the control plane and the lab kubelets; wait until "
        "every node is Ready. Running it again on a healthy lab changes "
        "nothing; a broken lab is rebuilt.",
    )
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    up.add_argument(
        "--cni",
        choices=plan.CNIS,
        default="host-gw",
        help="pod networking: routed over the underlay (host-gw) or a VXLAN "
        "overlay (vxlan) (default: host-gw)",
    )
    up.add_argument(
        "--no-agents", action="store_true", help="do not run the staticegress agent on the nodes"
    )
    up.add_argument(
        "--no-pool",
        action="store_true",
        help="do not create the StaticEgressIPPool `lab` (198.51.100.192/27 for every "
        "namespace): no egress IP is honoured until you create a pool",
    )
    up.add_argument(
        "--runtime",
        choices=["netns", "containerd"],
        default="netns",
        help="netns: pods are bare network namespaces and the product runs as host "
        "processes (fast); containerd: every node runs a real kubelet, containerd, runc, "
        "CNI plugins and kube-proxy, and the product is installed from its image with "
        "`kubectl apply -k deploy/` (default: netns)",
    )
    up.set_defaults(func=_up)

    lsub.add_parser(
        "down",
        help="remove everything the lab made",
        description="Stop every lab process and the control plane, delete the "
        "namespaces, links and files.",
    ).set_defaults(func=_down)
    lsub.add_parser(
        "install",
        help="install staticegress on a containerd-runtime lab (kubectl apply -k deploy/)",
        description="For a lab brought up with --runtime containerd --no-agents: install the "
        "product from its image with kubectl apply -k deploy/ and the grant-key Secret, "
        "then wait until every agent and manager pod is Ready.",
    ).set_defaults(func=_install)
    lsub.add_parser(
        "status",
        help="show nodes, pods and processes",
        description="Show the lab's nodes, pods and processes.",
    ).set_defaults(func=_status)

    ex = lsub.add_parser(
        "exec",
        help="run a command in a node or a pod",
        description="Run a command in a node's namespace (NODE) or a pod's "
        "(NAMESPACE/POD), e.g. `lab exec default/web-1 -- curl -s "
        "http://203.0.113.10/`.",
    )
    ex.add_argument("target", metavar="NODE|NAMESPACE/POD")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    ex.set_defaults(func=_exec)

    node = lsub.add_parser(
        "node",
        help="fail or recover a node",
        description="kill: the kubelet and every process on the node stop "
        "and its underlay link goes down. restore: link up, kubelet back. "
        "partition: underlay link down only, processes keep running. heal: "
        "link up again. reboot (containerd runtime): the node loses its kernel state "
        "and its /run, then boots again; pods restart under the same kubelet.",
    )
    node.add_argument("action", choices=["kill", "restore", "partition", "heal", "reboot"])
    node.add_argument("name", metavar="NODE")
    node.set_defaults(func=_node)

    pr = lsub.add_parser(
        "probe",
        help="probe an external server from a pod over UDP",
        description="Send a numbered datagram every INTERVAL seconds from "
        "the pod to the server for DURATION seconds; print a JSON summary: "
        "sent, received, lost, the source addresses the server saw, and the "
        "longest run of losses.",
    )
    pr.add_argument("target", metavar="NODE|NAMESPACE/POD")
    pr.add_argument("--server", default=str(plan.SERVER_IPS[0]))
    pr.add_argument("--port", type=int, default=plan.UDP_PORT)
    pr.add_argument("--interval", type=float, default=0.01)
    pr.add_argument("--duration", type=float, default=5.0)
    pr.set_defaults(func=_probe)
    prr = lsub.add_parser("probe-run", help="(internal) the prober, inside the pod")
    prr.add_argument("--server", required=True)
    prr.add_argument("--port", type=int, required=True)
    prr.add_argument("--interval", type=float, required=True)
    prr.add_argument("--duration", type=float, required=True)
    prr.set_defaults(func=_probe_run)

    ag = lsub.add_parser(
        "agent",
        help="stop or start the staticegress agent of a node",
        description="stop: end the node's agent (SIGTERM, or SIGKILL with "
        "--kill), leaving its dataplane in place; start: run it again.",
    )
    ag.add_argument("action", choices=["start", "stop"])
    ag.add_argument("name", metavar="NODE")
    ag.add_argument("--kill", action="store_true", help="stop with SIGKILL, as a crash would")
    ag.set_defaults(func=_agent)

    mg = lsub.add_parser(
        "manager",
        help="stop or start one of the lab's two managers",
        description="stop: end manager N (SIGTERM, or SIGKILL with --kill); start: run it again.",
    )
    mg.add_argument("action", choices=["start", "stop"])
    mg.add_argument("index", type=int, choices=[1, 2], metavar="N")
    mg.add_argument("--kill", action="store_true", help="stop with SIGKILL, as a crash would")
    mg.set_defaults(func=_manager)

    aps = lsub.add_parser(
        "apiserver",
        help="stop or start the lab's kube-apiserver",
        description="Stop or start kube-apiserver alone, to see the "
        "dataplane ride out a control-plane outage.",
    )
    aps.add_argument("action", choices=["start", "stop"])
    aps.set_defaults(func=_apiserver)

    kl = lsub.add_parser(
        "kubelet",
        help="(internal) the lab kubelet of one node",
        description="Run the lab kubelet and CNI for one node; `lab up` starts one per node.",
    )
    _node_identity(kl)
    kl.add_argument("--kubeconfig", required=True)
    kl.add_argument("--state-dir", required=True)
    kl.add_argument(
        "--routes-only",
        action="store_true",
        help="only the CNI's routes between nodes (a real kubelet runs the node)",
    )
    kl.set_defaults(func=_kubelet)

    ni = lsub.add_parser(
        "node-init",
        help="(internal) init of a real-runtime node",
        description="PID 1 of a node's namespaces: mounts, containerd, kubelet, kube-proxy.",
    )
    _node_identity(ni)
    ni.set_defaults(func=_node_init)

    sv = lsub.add_parser(
        "serve",
        help="(internal) the external echo servers",
        description="Answer HTTP with the client's source address and UDP "
        "with '<source> <payload>'.",
    )
    sv.add_argument("--address", action="append", required=True)
    sv.add_argument("--http-port", type=int, default=plan.HTTP_PORT)
    sv.add_argument("--udp-port", type=int, default=plan.UDP_PORT)
    sv.set_defaults(func=_serve)
