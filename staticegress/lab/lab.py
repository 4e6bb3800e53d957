"""`staticegress lab`: a small Kubernetes cluster made of network namespaces.

Layout (names and addresses from `staticegress.lab.plan`):

    host ns ── selab-host 198.51.100.2 (API server) ─┐
    selab-ext  eth0 198.51.100.1, lo 203.0.113.10/.20 ├─ br0 in selab-ul (the underlay)
    selab-node-i eth0 198.51.100.(10+i) ──────────────┘
        └─ pods: selab-pod-<uid> eth0 10.244.i.x/32, default via 169.254.1.1

`up` builds the namespaces and links, starts the control plane (detached: it
outlives the command), one lab kubelet per node and the external servers,
waits until every node is Ready, and records all of it in
`/run/selab/state.json`. `down` removes everything `up` made; it
also works from a half-built or crashed lab, because it finds the lab's
pieces by name, not only through the state file.

Process model: everything long-running is a detached child recorded by pid
in the state file; a pid is only signalled while its command line still
names this program (pids get recycled).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.api.pools import POOL_KIND, POOL_PLURAL
from staticegress.api.v1alpha1 import API_VERSION, GROUP, VERSION
from staticegress.controlplane.binaries import Binaries, ensure_binaries
from staticegress.controlplane.cluster import ControlPlane, pid_alive
from staticegress.dataplane.grants import new_key
from staticegress.k8s.client import REQUEST_TIMEOUT, api_client
from staticegress.k8s.crd import install_crd
from staticegress.k8s.manifests import deploy_dir
from staticegress.lab import plan, realnode
from staticegress.lab.kubelet import load_realized
from staticegress.lab.netns import (
    LabError,
    delete_netns,
    ip_batch,
    kill_netns_processes,
    kill_pids,
    netns_exists,
    netns_list,
    run,
    sysctl,
)

Progress = Callable[[str], None]
STATE_FILE = "state.json"


def _quiet(_: str) -> None:
    pass


@dataclass
class LabState:
    """What `lab up` made, for every later lab command."""

    nodes: int
    cni: plan.CNI
    server: str
    admin_kubeconfig: str
    controlplane_dir: str
    processes: dict[str, int] = field(default_factory=dict)
    """Long-running children: `kubelet/<node>`, `servers` -> pid."""
    killed: list[str] = field(default_factory=list)
    partitioned: list[str] = field(default_factory=list)
    agents: bool = True
    """`lab up` started the staticegress agent on every node, as its DaemonSet would;
    without it, `lab agent start NODE` starts them one by one."""
    runtime: str = "netns"
    """netns: pods are namespaces and the product runs as host processes;
    containerd: real kubelets and containerd, the product installed from its image."""
    image: str = ""
    """containerd runtime: the product image imported into every node."""
    pool: bool = True
    """`lab up` created the StaticEgressIPPool `lab` (LAB_POOL) that grants the
    lab's egress range to every namespace; without it (`--no-pool`) no egress IP
    is honoured until an administrator creates a pool, as on a fresh install."""

    def node_plans(self) -> tuple[plan.NodePlan, ...]:
        return plan.node_plans(self.nodes)


def state_dir() -> Path:
    return Path(os.environ.get("STATICEGRESS_LAB_DIR", str(plan.STATE_DIR)))


def load_state() -> LabState | None:
    path = state_dir() / STATE_FILE
    if not path.exists():
        return None
    return LabState(**json.loads(path.read_text()))


def _save_state(state: LabState) -> None:
    path = state_dir() / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialize lab commands: two `up`s at once would fight over the same names."""
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def require_root() -> None:
    if sys.platform != "linux":
        raise LabError("the lab needs Linux network namespaces")
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root (sudo)")
    for tool in ("ip", "bridge", "iptables", "sysctl"):
        if shutil.which(tool) is None:
            raise LabError(
                f"{tool} not found: run ./scripts/setup.sh (it installs iproute2, "
                "iptables) or install it with apt-get"
            )


def _ours(pid: int) -> bool:
    """True if `pid` is alive and still one of this program's processes."""
    if not pid_alive(pid):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if not cmd:
        # Empty for a moment while `ip netns exec` replaces itself with our
        # program, and for good once a child has died unreaped (a zombie).
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]
    return b"staticegress" in cmd


def _self_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "staticegress", *args]


def _spawn(name: str, argv: list[str]) -> int:
    logs = state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name.replace('/', '-')}.log", "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


# --------------------------------------------------------------------- topology


def _build_underlay(progress: Progress) -> None:
    progress(f"underlay: bridge {plan.BRIDGE} in {plan.NS_UNDERLAY}, {plan.UNDERLAY}")
    run("ip", "netns", "add", plan.NS_UNDERLAY)
    ip_batch(
        [
            "link set lo up",
            f"link add {plan.BRIDGE} type bridge stp_state 0 mcast_snooping 0",
            f"link set {plan.BRIDGE} up",
        ],
        netns=plan.NS_UNDERLAY,
    )
    run(
        "ip",
        "link",
        "add",
        plan.HOST_LINK,
        "type",
        "veth",
        "peer",
        "name",
        "ul-host",
        "netns",
        plan.NS_UNDERLAY,
    )
    ip_batch(
        [
            f"addr add {plan.HOST_IP}/{plan.UNDERLAY.prefixlen} dev {plan.HOST_LINK}",
            f"link set {plan.HOST_LINK} up",
        ]
    )
    ip_batch([f"link set ul-host master {plan.BRIDGE} up"], netns=plan.NS_UNDERLAY)


def _attach(netns: str, port: str) -> None:
    run("ip", "netns", "add", netns)
    run(
        "ip",
        "link",
        "add",
        port,
        "netns",
        plan.NS_UNDERLAY,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        netns,
    )
    ip_batch([f"link set {port} master {plan.BRIDGE} up"], netns=plan.NS_UNDERLAY)


def _build_external(progress: Progress) -> None:
    servers = ", ".join(str(s) for s in plan.SERVER_IPS)
    progress(f"router/external host {plan.NS_EXTERNAL}: {plan.ROUTER_IP}, servers {servers}")
    _attach(plan.NS_EXTERNAL, "ul-ext")
    ip_batch(
        [
            "link set lo up",
            "link set eth0 up",
            f"addr add {plan.ROUTER_IP}/{plan.UNDERLAY.prefixlen} dev eth0",
            *(f"addr add {s}/32 dev lo" for s in plan.SERVER_IPS),
        ],
        netns=plan.NS_EXTERNAL,
    )


def _build_node(node: plan.NodePlan, cni: plan.CNI) -> None:
    _attach(node.netns, node.bridge_port)
    ip_batch(
        [
            "link set lo up",
            "link set eth0 up",
            f"addr add {node.underlay_ip}/{plan.UNDERLAY.prefixlen} dev eth0",
            # Pods reach 169.254.1.1 only if the node itself has a route
            # covering it; the default route through the router does.
            f"route add default via {plan.ROUTER_IP} dev eth0",
        ],
        netns=node.netns,
    )
    sysctl(node.netns, "net.ipv4.ip_forward", 1)
    for scope in ("all", "default", "eth0"):
        sysctl(node.netns, f"net.ipv4.conf.{scope}.rp_filter", 0)
    # The masquerade every real CNI installs for pod-to-outside traffic: the
    # baseline staticegress changes for selected pods.
    run(
        "ip",
        "netns",
        "exec",
        node.netns,
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        str(plan.CLUSTER_CIDR),
        "!",
        "-d",
        str(plan.CLUSTER_CIDR),
        "-m",
        "comment",
        "--comment",
        f"lab cni ({cni}) masquerade",
        "-j",
        "MASQUERADE",
    )


# ------------------------------------------------------------------- processes


def _start_kubelet(state: LabState, node: plan.NodePlan) -> None:
    kubeconfig = state_dir() / "kubeconfigs" / f"{node.name}.kubeconfig"
    state.processes[f"kubelet/{node.name}"] = _spawn(
        f"kubelet/{node.name}",
        _self_argv(
            "lab",
            "kubelet",
            "--node",
            node.name,
            "--nodes",
            str(state.nodes),
            "--cni",
            state.cni,
            "--kubeconfig",
            str(kubeconfig),
            "--state-dir",
            str(state_dir()),
        ),
    )


AGENT_PORT = 9744
"""The agent's health port (its default, `agent.agent.AGENT_HEALTH_PORT`)."""


def _start_agent(state: LabState, node: plan.NodePlan) -> None:
    """The agent runs inside the node's namespace, as a DaemonSet pod with host
    network would, and reaches the API server over the underlay."""
    kubeconfig = state_dir() / "kubeconfigs" / "agent.kubeconfig"
    argv = [
        "ip",
        "netns",
        "exec",
        node.netns,
        *_self_argv(
            "agent",
            "--node",
            node.name,
            "--kubeconfig",
            str(kubeconfig),
            "--health-port",
            str(AGENT_PORT),
            # A lab without managers (`--no-agents`: tests write statuses by
            # hand) has nobody to grant or to publish the selection: its
            # agents follow the status alone and select every pod themselves.
            *(
                (
                    *("--grant-key-file", str(grant_key_path())),
                    *("--grant-address", str(node.underlay_ip)),
                )
                if state.agents
                else ("--ownership", "status-only", "--selection", "local")
            ),
        ),
    ]
    state.processes[f"agent/{node.name}"] = _spawn(f"agent/{node.name}", argv)


MANAGERS = 2
MANAGER_PORT = 9745
"""The first manager's health port (the default, `manager.manager.MANAGER_HEALTH_PORT`);
the second, which shares the host namespace, listens on the next one."""


def _start_manager(state: LabState, index: int) -> None:
    """Managers run in the host namespace, which sits on the underlay like a node."""
    kubeconfig = state_dir() / "kubeconfigs" / "manager.kubeconfig"
    key = f"manager/{index}"
    state.processes[key] = _spawn(
        key,
        _self_argv(
            "manager",
            "--kubeconfig",
            str(kubeconfig),
            "--identity",
            f"manager-{index}",
            "--health-address",
            str(plan.HOST_IP),
            "--health-port",
            str(MANAGER_PORT + index - 1),
            "--grant-key-file",
            str(grant_key_path()),
        ),
    )


def _private_copy(src: Path | str, dest: Path) -> Path:
    """Copy a credential where only root may read it."""
    shutil.copyfile(src, dest)
    dest.chmod(0o600)
    return dest


def _node_kubeconfig(cp: ControlPlane, kube_dir: Path, node: plan.NodePlan) -> Path:
    """A kubelet's credentials: user system:node:NAME in group system:nodes."""
    minted = cp.kubeconfig_for_user(f"system:node:{node.name}", ("system:nodes",))
    return _private_copy(minted, kube_dir / f"{node.name}.kubeconfig")


def _ensure_grant_key() -> None:
    """The lab's grant key, made once per lab."""
    if not grant_key_path().exists():
        grant_key_path().write_text(new_key() + "\n")
        grant_key_path().chmod(0o600)


def grant_key_path() -> Path:
    """The lab's grant key, as a Secret mounted in every agent and manager would be."""
    return state_dir() / "grant.key"


def _wait_agents(
    state: LabState, plans: tuple[plan.NodePlan, ...], progress: Progress, wait: float = 30
) -> None:
    """Every agent ready (first sync applied), or an error with the log of one that died."""
    deadline = time.monotonic() + wait
    pending = {p.name: p for p in plans}
    while pending:
        for name, node in list(pending.items()):
            pid = state.processes.get(f"agent/{name}", 0)
            if not _ours(pid):
                log = state_dir() / "logs" / f"agent-{name}.log"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise LabError(f"the agent of {name} exited:\n{tail}")
            try:
                url = f"http://{node.underlay_ip}:{AGENT_PORT}/readyz"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        del pending[name]
            except OSError:
                pass
        if pending and time.monotonic() > deadline:
            raise LabError(f"agents not ready after {wait:.0f}s: {', '.join(pending)}")
        time.sleep(0.2)
    progress("every agent is ready")


def _start_servers(state: LabState) -> None:
    argv = ["ip", "netns", "exec", plan.NS_EXTERNAL, *_self_argv("lab", "serve")]
    for s in plan.SERVER_IPS:
        argv += ["--address", str(s)]
    state.processes["servers"] = _spawn("servers", argv)


def _apply_manifest(binaries: Binaries, kubeconfig: Path, relative: str) -> None:
    run(
        str(binaries.kubectl),
        "--kubeconfig",
        str(kubeconfig),
        "apply",
        "-f",
        str(deploy_dir() / relative),
    )


LAB_POOL: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": POOL_KIND,
    "metadata": {"name": "lab"},
    "spec": {
        # The lab's egress range: .192-.223 of the underlay, where no node,
        # router or control plane lives (the manager would refuse those anyway).
        "cidrs": ["198.51.100.192/27"],
        "namespaceSelector": {},
        "podNamespaceSelector": {},
    },
}
"""The pool `lab up` creates unless --no-pool: the lab is one tenant's playground."""


async def _create_lab_pool(kubeconfig: Path, progress: Progress) -> None:
    api = await api_client(kubeconfig)
    try:
        custom = client.CustomObjectsApi(api)
        try:
            await custom.create_cluster_custom_object(
                GROUP, VERSION, POOL_PLURAL, LAB_POOL, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
        progress(
            f"StaticEgressIPPool lab grants {', '.join(LAB_POOL['spec']['cidrs'])} "
            "to every namespace"
        )
    finally:
        await api.close()


async def _prepare_cluster(
    kubeconfig: Path, progress: Progress, *, crd: bool = True, pool: bool = True
) -> None:
    api = await api_client(kubeconfig)
    try:
        if crd:
            await install_crd(api)
            progress("StaticEgressIP and StaticEgressIPPool CRDs installed")
            if pool:
                await _create_lab_pool(kubeconfig, progress)
        rbac = client.RbacAuthorizationV1Api(api)
        # Kubelets authenticate as system:node:<name> in group system:nodes;
        # with RBAC alone (no Node authorizer) the group needs this binding.
        binding = {
            "metadata": {"name": "staticegress-lab:nodes"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:node",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}
            ],
        }
        with contextlib.suppress(ApiException):
            await rbac.create_cluster_role_binding(binding, _request_timeout=REQUEST_TIMEOUT)
    finally:
        await api.close()


async def _wait_ready(
    kubeconfig: Path,
    names: list[str],
    progress: Progress,
    wait_seconds: float = 90,
    logs: Callable[[str], str] | None = None,
    gone: Callable[[str], bool] | None = None,
) -> None:
    """Wait until every node is Ready and schedulable, and pods can be admitted.

    On timeout, or as soon as `gone` says a pending node's own processes have
    died (it will never turn Ready then), the error carries each pending node's
    Ready condition and, through `logs`, whatever the node's own processes said:
    the lab is torn down after a failed start, so this is the only trace a CI
    run keeps."""
    api = await api_client(kubeconfig)
    core = client.CoreV1Api(api)
    start = time.monotonic()
    last = ""
    try:
        while True:
            pending = []
            why: dict[str, str] = {}
            nodes = {n.metadata.name: n for n in (await core.list_node()).items}
            for name in names:
                n = nodes.get(name)
                cond = (
                    next((c for c in (n.status.conditions or []) if c.type == "Ready"), None)
                    if n is not None
                    else None
                )
                ready = cond is not None and cond.status == "True"
                tainted = n is not None and any(
                    t.key.startswith("node.kubernetes.io/") for t in n.spec.taints or []
                )
                if not ready or tainted:
                    state = "tainted" if ready else "not registered" if n is None else "not ready"
                    pending.append(f"{name}({state})")
                    why[name] = (
                        "never registered"
                        if n is None
                        else f"Ready={cond.status if cond else 'absent'}"
                        f" {cond.reason if cond else ''}: {cond.message if cond else ''}"
                    )
            try:
                await core.read_namespaced_service_account("default", "default")
            except ApiException:
                pending.append("default service account")
            if not pending:
                return
            note = ", ".join(pending)
            if note != last:
                progress(f"  waiting for {note}")
                last = note
            dead = [name for name in why if gone is not None and gone(name)]
            if dead or time.monotonic() - start > wait_seconds:
                if dead:
                    note = f"{', '.join(dead)} stopped: its node processes exited"
                detail = "".join(
                    f"\n  {name}: {reason}" + (f"\n{logs(name)}" if logs else "")
                    for name, reason in why.items()
                )
                took = time.monotonic() - start
                raise LabError(f"lab not ready after {took:.0f}s: {note}{detail}")
            await asyncio.sleep(0.5)
    finally:
        await api.close()


# ------------------------------------------------------------------- commands


def health(state: LabState) -> list[str]:
    """What is wrong with a lab that should be up; empty when it is healthy."""
    problems = []
    for name, pid in state.processes.items():
        node = name.split("/", 1)[1] if "/" in name else ""
        if node in state.killed:
            continue
        if not _ours(pid):
            problems.append(f"{name} (pid {pid}) is not running")
    cp = Path(state.controlplane_dir)
    if not cp.is_dir():
        problems.append("control plane directory is gone")
    else:
        pids = [int(pid) for pid in (cp / "children.pid").read_text().split()]
        if not all(pid_alive(pid) for pid in pids):
            problems.append("a control-plane component is not running")
    for p in state.node_plans():
        if not netns_exists(p.netns):
            problems.append(f"namespace {p.netns} is missing")
    return problems


def up(
    *,
    nodes: int,
    cni: plan.CNI,
    progress: Progress,
    binaries: Binaries | None = None,
    agents: bool = True,
    runtime: str = "netns",
    pool: bool = True,
) -> LabState:
    """Bring the lab up, or confirm it is up with the same settings."""
    require_root()
    plans = plan.node_plans(nodes)
    with _locked():
        existing = load_state()
        if existing is not None:
            settings = (existing.nodes, existing.cni, existing.agents, existing.runtime)
            if settings != (nodes, cni, agents, runtime) or existing.pool != pool:
                raise LabError(
                    f"the lab is already up with --nodes {existing.nodes} --cni {existing.cni}"
                    f" --runtime {existing.runtime}"
                    f"{'' if existing.agents else ' --no-agents'}"
                    f"{'' if existing.pool else ' --no-pool'}; "
                    "run `staticegress lab down` first to change them"
                )
            problems = health(existing)
            if not problems:
                progress("the lab is already up")
                return existing
            progress(f"the lab is broken ({'; '.join(problems)}): rebuilding it")
            _down(progress)
        elif any(n.startswith(f"{plan.PREFIX}-") for n in netns_list()) or (
            realnode.NODE_ROOT.exists()
        ):
            progress("removing leftovers of an earlier lab")
            _down(progress)
        try:
            return _up(plans, cni, progress, binaries, agents, runtime, pool)
        except BaseException:
            progress("lab up failed: removing what was built")
            _down(_quiet)
            raise


def _up(
    plans: tuple[plan.NodePlan, ...],
    cni: plan.CNI,
    progress: Progress,
    binaries: Binaries | None,
    agents: bool,
    runtime: str,
    pool: bool,
) -> LabState:
    t0 = time.monotonic()
    binaries = binaries or ensure_binaries(progress=progress)
    assets = _node_assets(progress) if runtime == "containerd" else None
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    _build_underlay(progress)
    _build_external(progress)
    progress(f"nodes: {', '.join(p.name for p in plans)} ({cni})")
    for p in plans:
        _build_node(p, cni)

    progress(f"control plane on {plan.HOST_IP}")
    cp = ControlPlane(
        binaries=binaries,
        bind_address=str(plan.HOST_IP),
        die_with_parent=False,
        workdir=d / "controlplane",
        progress=progress,
    )
    cp.start()
    admin = _private_copy(cp.admin_kubeconfig, d / "admin.kubeconfig")
    state = LabState(
        nodes=len(plans),
        cni=cni,
        server=cp.server,
        admin_kubeconfig=str(admin),
        controlplane_dir=str(cp.workdir),
        agents=agents,
        runtime=runtime,
        pool=pool,
    )
    _save_state(state)
    # The containerd runtime installs the CRDs with the rest of deploy/.
    asyncio.run(_prepare_cluster(admin, progress, crd=assets is None, pool=pool))
    if assets is not None:
        _up_real(state, cp, binaries, assets, plans, progress)
        progress(f"lab up in {time.monotonic() - t0:.1f}s")
        return state

    kube_dir = d / "kubeconfigs"
    kube_dir.mkdir(exist_ok=True)
    _ensure_grant_key()
    # The agents' identity exists even when they start later (`lab agent start`).
    _apply_manifest(binaries, admin, "namespace.yaml")
    _apply_manifest(binaries, admin, "rbac/agent.yaml")
    _private_copy(
        cp.kubeconfig_for_service_account(
            "staticegress-system", "staticegress-agent", expiration_seconds=7 * 86400
        ),
        kube_dir / "agent.kubeconfig",
    )
    _apply_manifest(binaries, admin, "rbac/manager.yaml")
    _private_copy(
        cp.kubeconfig_for_service_account(
            "staticegress-system", "staticegress-manager", expiration_seconds=7 * 86400
        ),
        kube_dir / "manager.kubeconfig",
    )
    for p in plans:
        _node_kubeconfig(cp, kube_dir, p)
    progress("starting the external servers and one lab kubelet per node")
    _start_servers(state)
    for p in plans:
        _start_kubelet(state, p)
    _save_state(state)
    asyncio.run(_wait_ready(admin, [p.name for p in plans], progress))
    if state.agents:
        # After the nodes are Ready, so the CNI's routes exist when each agent
        # looks at them to choose its transport.
        progress("starting the staticegress agent on every node")
        for p in plans:
            _start_agent(state, p)
        progress(f"starting {MANAGERS} gateway managers")
        for i in range(1, MANAGERS + 1):
            _start_manager(state, i)
        _save_state(state)
        _wait_agents(state, plans, progress)
    progress(f"lab up in {time.monotonic() - t0:.1f}s")
    return state


def down(*, progress: Progress) -> None:
    """Remove everything the lab made: processes, namespaces, links, files."""
    require_root()
    with _locked():
        _down(progress)


def _down(progress: Progress) -> None:
    state = load_state()
    # Real-runtime nodes first: their containers run in the node namespaces.
    if stopped := _kill_holders(state):
        progress(f"stopped {stopped} real-runtime nodes (containers included)")
    if state is not None:
        ours = [pid for pid in state.processes.values() if _ours(pid)]
        if ours:
            progress(f"stopping {len(ours)} lab processes")
            kill_pids(ours)
        cp_dir = Path(state.controlplane_dir)
        if cp_dir.exists():
            progress("stopping the control plane")
            ControlPlane.stop_detached(cp_dir)
    cp_dir = state_dir() / "controlplane"
    if cp_dir.exists():  # a crash between starting it and saving the state
        ControlPlane.stop_detached(cp_dir)
    spaces = [n for n in netns_list() if n.startswith(f"{plan.PREFIX}-")]
    if spaces:
        progress(f"deleting {len(spaces)} network namespaces")
    for name in spaces:
        # Processes first: a namespace with a live process would linger.
        kill_netns_processes(name, grace=1.0)
    for name in spaces:
        delete_netns(name)
    run("ip", "link", "delete", plan.HOST_LINK, check=False)
    _remove_node_root(progress)
    if state_dir().exists():
        shutil.rmtree(state_dir(), ignore_errors=True)
    lock = state_dir().parent / f".{state_dir().name}.lock"
    lock.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state_dir().parent.rmdir()  # only if empty: other users of the parent stay
    progress("lab down: nothing left")


def clear_stale(*, progress: Progress) -> bool:
    """Take down a lab whose every recorded process is gone (its owner was killed
    before `lab down`), so that the next run starts clean; True if one was. A lab
    with any live process belongs to someone and is left alone."""
    require_root()
    if load_state() is None:
        return False  # and the lock, which would leave the state directory behind, untaken
    with _locked():
        state = load_state()
        if state is None or any(_ours(pid) for pid in state.processes.values()):
            return False
        progress("a lab left behind by a process that is gone: taking it down")
        _down(progress)
        return True


def status() -> str:
    """A human-readable report: nodes, pods, processes."""
    state = load_state()
    if state is None:
        return "the lab is down (staticegress lab up brings it up)"
    lines = [
        f"lab: {state.nodes} nodes, cni {state.cni}, runtime {state.runtime}, "
        f"API server {state.server}",
        f"kubeconfig: {state.admin_kubeconfig}",
        "",
        "NODE      UNDERLAY        PODCIDR          STATE        KUBELET",
    ]
    for node in state.node_plans():
        pid = state.processes.get(f"kubelet/{node.name}", 0) or state.processes.get(
            f"node/{node.name}", 0
        )
        cond = (
            "killed"
            if node.name in state.killed
            else "partitioned"
            if node.name in state.partitioned
            else "up"
        )
        kubelet = f"pid {pid}" if _ours(pid) else "stopped"
        lines.append(
            f"{node.name:9} {node.underlay_ip!s:15} {node.pod_cidr!s:16} {cond:12} {kubelet}"
        )
    if state.runtime == "containerd":
        with contextlib.suppress(LabError):
            lines += [
                "",
                _kubectl(
                    ensure_binaries(),
                    Path(state.admin_kubeconfig),
                    "get",
                    "pods",
                    "-A",
                    "-o",
                    "wide",
                ),
            ]
    lines += ["", "POD                                      NODE      IP"]
    for pod in load_realized(state_dir()):
        lines.append(f"{pod.namespace + '/' + pod.name:40} {pod.node:9} {pod.ip}")
    lines += ["", "PROCESS                 PID      RUNNING"]
    for name, pid in sorted(state.processes.items()):
        lines.append(f"{name:23} {pid:<8} {'yes' if _ours(pid) else 'no'}")
    cp = Path(state.controlplane_dir) / "children.pid"
    if cp.exists():
        names = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
        for name, pid_s in zip(names, cp.read_text().split(), strict=False):
            lines.append(f"{name:23} {pid_s:8} {'yes' if pid_alive(int(pid_s)) else 'no'}")
    return "\n".join(lines)


def _node(state: LabState, name: str) -> plan.NodePlan:
    try:
        return plan.node_by_name(name, state.nodes)
    except KeyError:
        raise LabError(f"no node {name} in the lab (see `staticegress lab status`)") from None


def _require_state() -> LabState:
    state = load_state()
    if state is None:
        raise LabError("the lab is down: run `staticegress lab up` first")
    return state


def exec_argv(target: str, command: list[str]) -> list[str]:
    """The argv that runs `command` inside a node (`node-1`) or a pod (`ns/pod`)."""
    state = _require_state()
    if not command:
        raise LabError("nothing to run: lab exec TARGET -- COMMAND [ARGS...]")
    if "/" in target and state.runtime == "containerd":
        namespace, name = target.split("/", 1)
        pod_ip = _real_pod_ip(state, namespace, name)
        return ["nsenter", "-t", str(realnode.pod_pid(pod_ip)), "-n", *command]
    if "/" in target:
        namespace, name = target.split("/", 1)
        for pod in load_realized(state_dir()):
            if (pod.namespace, pod.name) == (namespace, name):
                return ["ip", "netns", "exec", pod.netns, *command]
        raise LabError(f"no pod {target} runs in the lab (see `staticegress lab status`)")
    try:
        node = plan.node_by_name(target, state.nodes)
    except KeyError:
        raise LabError(f"no node {target} in the lab") from None
    return ["ip", "netns", "exec", node.netns, *command]


def _node_netns_all(state: LabState, node: plan.NodePlan) -> list[str]:
    return [
        node.netns,
        *(p.netns for p in load_realized(state_dir(), node.name) if not p.host_network),
    ]


def _set_cable(node: plan.NodePlan, up_: bool) -> None:
    run("ip", "-n", plan.NS_UNDERLAY, "link", "set", node.bridge_port, "up" if up_ else "down")


def node_kill(name: str, *, progress: Progress) -> None:
    """Pull the plug: the kubelet and every process on the node stop, its link goes down."""
    require_root()
    with _locked():
        state = _require_state()
        node = _node(state, name)
        pid = state.processes.get(f"kubelet/{name}", 0)
        if _ours(pid):
            kill_pids([pid], grace=0)
        holder = state.processes.get(f"node/{name}", 0)
        if _ours(holder):
            realnode.kill_node(holder)
        stopped = sum(kill_netns_processes(ns, grace=0) for ns in _node_netns_all(state, node))
        _set_cable(node, False)
        if name not in state.killed:
            state.killed.append(name)
        _save_state(state)
        progress(f"{name} killed: kubelet and {stopped} processes stopped, underlay link down")


def node_restore(name: str, *, progress: Progress) -> None:
    """Power a killed node back on: link up, kubelet started again."""
    require_root()
    with _locked():
        state = _require_state()
        node = _node(state, name)
        _set_cable(node, True)
        if state.runtime == "containerd":
            if not _ours(state.processes.get(f"node/{name}", 0)):
                # Powered back on: what lived in /run is gone, as after any boot.
                realnode.wipe_volatile(name)
                _start_node(state, node)
        elif not _ours(state.processes.get(f"kubelet/{name}", 0)):
            _start_kubelet(state, node)
        if f"agent/{name}" in state.processes and not _ours(state.processes[f"agent/{name}"]):
            _start_agent(state, node)
        state.killed = [n for n in state.killed if n != name]
        state.partitioned = [n for n in state.partitioned if n != name]
        _save_state(state)
        progress(f"{name} restored")


def node_reboot(name: str, *, progress: Progress) -> None:
    """Reboot a real-runtime node: every process stops, the kernel state (nft
    tables, routes, links, addresses) and /run are lost, then the node boots
    and kubelet starts its pods again."""
    require_root()
    with _locked():
        state = _require_state()
        if state.runtime != "containerd":
            raise LabError("lab node reboot needs a lab with --runtime containerd")
        node = _node(state, name)
        holder = state.processes.get(f"node/{name}", 0)
        if _ours(holder):
            realnode.kill_node(holder)
        # A new network namespace is a node whose kernel forgot everything. Its
        # cable goes first: a dying namespace frees its veth only later.
        run("ip", "-n", plan.NS_UNDERLAY, "link", "delete", node.bridge_port, check=False)
        delete_netns(node.netns)
        _build_node(node, state.cni)
        if name in state.partitioned or name in state.killed:
            _set_cable(node, False)
        realnode.wipe_volatile(name)
        _start_node(state, node)
        _save_state(state)
        progress(f"{name} rebooted: kernel state and /run cleared, node booting")


def _real_pod_ip(state: LabState, namespace: str, name: str) -> str:
    binaries = ensure_binaries()
    out = _kubectl(
        binaries,
        Path(state.admin_kubeconfig),
        "-n",
        namespace,
        "get",
        "pod",
        name,
        "-o",
        "jsonpath={.status.podIP}",
    ).strip()
    if not out:
        raise LabError(f"pod {namespace}/{name} has no IP yet")
    return out


def _real_control(state: LabState, role: str, node: plan.NodePlan, *, kill: bool) -> int:
    """Stop the product's `role` container on `node` as a crash (SIGKILL) or a
    clean exit (SIGTERM) would; kubelet restarts it."""
    pids = realnode.agent_pids(node.netns, role)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    return len(pids)


def _process_control(
    key: str,
    label: str,
    starter: Callable[[LabState], None],
    *,
    start: bool,
    kill: bool,
    progress: Progress,
) -> None:
    """Start one lab process, or stop it with SIGTERM (or SIGKILL, as a crash would)."""
    require_root()
    with _locked():
        state = _require_state()
        pid = state.processes.get(key, 0)
        if start:
            if not _ours(pid):
                starter(state)
            progress(f"{label} running (pid {state.processes[key]})")
        else:
            if _ours(pid):
                if kill:
                    os.kill(pid, signal.SIGKILL)
                else:
                    kill_pids([pid])
            progress(f"{label} stopped{' with SIGKILL' if kill else ''}")
        _save_state(state)


def manager_control(index: int, *, start: bool, kill: bool, progress: Progress) -> None:
    """Stop or start one of the lab's managers."""
    state = _require_state()
    if state.runtime == "containerd":
        if start:
            progress("managers are Deployment pods: kubelet restarts them on their own")
            return
        hosts = [n for n in state.node_plans() if realnode.agent_pids(n.netns, "manager")]
        if index > len(hosts):
            raise LabError(f"manager {index} is not running")
        _real_control(state, "manager", hosts[index - 1], kill=kill)
        progress(f"the manager container on {hosts[index - 1].name} stopped")
        return
    _process_control(
        f"manager/{index}",
        f"manager {index}",
        lambda state: _start_manager(state, index),
        start=start,
        kill=kill,
        progress=progress,
    )


def apiserver_control(*, start: bool, progress: Progress) -> None:
    """Stop or start the lab's kube-apiserver (etcd and the rest keep running)."""
    require_root()
    with _locked():
        state = _require_state()
        ControlPlane.control_detached(Path(state.controlplane_dir), "kube-apiserver", start=start)
        progress(f"kube-apiserver {'started' if start else 'stopped'}")


def agent_control(name: str, *, start: bool, kill: bool, progress: Progress) -> None:
    """Stop or start one node's agent; stopping leaves its dataplane in place."""
    state = _require_state()
    node = _node(state, name)
    if state.runtime == "containerd":
        if start:
            progress("the agent is a DaemonSet pod: kubelet restarts it on its own")
            return
        stopped = _real_control(state, "agent", node, kill=kill)
        if not stopped:
            raise LabError(f"no agent process runs on {name}")
        progress(f"the agent container of {name} stopped{' with SIGKILL' if kill else ''}")
        return
    _process_control(
        f"agent/{name}",
        f"the agent of {name}",
        lambda state: _start_agent(state, node),
        start=start,
        kill=kill,
        progress=progress,
    )


def node_partition(name: str, *, heal: bool, progress: Progress) -> None:
    """Cut (or reconnect) the node's underlay link; its processes keep running."""
    require_root()
    with _locked():
        state = _require_state()
        node = _node(state, name)
        _set_cable(node, heal)
        state.partitioned = [n for n in state.partitioned if n != name]
        if not heal:
            state.partitioned.append(name)
        _save_state(state)
        progress(f"{name} {'healed' if heal else 'partitioned'}")


def describe(state: LabState, kubectl: Path | None) -> str:
    """How to reach the lab, printed at the end of `lab up`."""
    kc = kubectl or "kubectl"
    me = shutil.which("staticegress")
    mine = Path(sys.executable).parent / "staticegress"
    se = "staticegress" if me and Path(me) == mine else str(mine)
    return (
        f"\nThe lab is up: {state.nodes} nodes, cni {state.cni}. Point kubectl at it:\n"
        f"  export KUBECONFIG={state.admin_kubeconfig}\n"
        f"  {kc} get nodes -o wide\n"
        f"Run a command in a node or a pod:\n"
        f"  {se} lab exec node-1 -- ip route\n"
        f"  {se} lab exec default/POD -- curl -s http://{plan.SERVER_IPS[0]}/\n"
        f"  {se} lab status\n"
        f"Remove everything: {se} lab down\n"
    )


def snapshot_host() -> dict[str, Any]:
    """What the lab could leave on the host: namespaces, host links, state files."""
    links = json.loads(run("ip", "-j", "link", "show") or "[]")
    return {
        "netns": sorted(netns_list()),
        "links": sorted(str(link["ifname"]) for link in links),
        "state": state_dir().exists(),
    }


# ------------------------------------------------------- containerd runtime

OVERLAY_DIR = "kustomize"
DEPLOY_WAIT = 240.0


def _node_assets(progress: Progress) -> tuple[realnode.NodeTools, realnode.NodeImages]:
    """Node binaries and the two images, found or built (cached outside the repo)."""
    from staticegress.controlplane.binaries import ensure_node_binaries
    from staticegress.controlplane.images import ensure_pause_image, ensure_product_image

    nb = ensure_node_binaries(progress=progress)
    pause = ensure_pause_image(progress=progress)
    product = ensure_product_image(progress=progress)
    tools = realnode.NodeTools(
        kubelet=str(nb.kubelet),
        kube_proxy=str(nb.kube_proxy),
        containerd=str(nb.containerd),
        ctr=str(nb.ctr),
        shim=str(nb.shim),
        runc=str(nb.runc),
        cni_plugins=str(nb.cni_bin_dir),
    )
    images = realnode.NodeImages(
        pause_archive=str(pause.archive),
        pause_ref=pause.ref,
        product_archive=str(product.archive),
        product_ref=product.ref,
    )
    return tools, images


def _start_node(state: LabState, node: plan.NodePlan) -> None:
    key = f"node/{node.name}"
    state.processes[key] = _spawn(key, realnode.holder_argv(node, state.cni, state.nodes))


def _kubectl(binaries: Binaries, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    return run(str(binaries.kubectl), "--kubeconfig", str(kubeconfig), *args, stdin=stdin)


def _up_real(
    state: LabState,
    cp: ControlPlane,
    binaries: Binaries,
    assets: tuple[realnode.NodeTools, realnode.NodeImages],
    plans: tuple[plan.NodePlan, ...],
    progress: Progress,
) -> None:
    """Real kubelets and containerd on every node, then the product from its image."""
    tools, images = assets
    d = state_dir()
    admin = Path(state.admin_kubeconfig)
    kube_dir = d / "kubeconfigs"
    kube_dir.mkdir(exist_ok=True)
    proxy = _private_copy(
        cp.kubeconfig_for_user("system:kube-proxy", ()), kube_dir / "kube-proxy.kubeconfig"
    )
    realnode.NODE_ROOT.mkdir(parents=True, exist_ok=True)
    created = realnode.host_mountpoints()
    (realnode.NODE_ROOT / "mountpoints.json").write_text(json.dumps(created))
    (realnode.NODE_ROOT / "cgroups.json").write_text(json.dumps(realnode.container_cgroups()))
    for p in plans:
        node_kc = _node_kubeconfig(cp, kube_dir, p)
        realnode.prepare_node(
            p,
            state.cni,
            tools=tools,
            images=images,
            kubelet_kubeconfig=node_kc,
            proxy_kubeconfig=proxy,
            cni_kubeconfig=node_kc,
        )
    progress("starting the external servers, and containerd, kubelet and kube-proxy per node")
    _start_servers(state)
    for p in plans:
        _start_node(state, p)
    _save_state(state)
    asyncio.run(
        _wait_ready(
            admin,
            [p.name for p in plans],
            progress,
            wait_seconds=180,
            logs=realnode.log_tails,
            gone=lambda name: not _ours(state.processes.get(f"node/{name}", 0)),
        )
    )
    _wait_kube_proxies(plans, progress)

    state.image = images.product_ref
    _save_state(state)
    if state.agents:
        _install_real(state, binaries, progress)


def install(*, progress: Progress) -> None:
    """`lab install`: install the product on a containerd-runtime lab brought up
    with --no-agents, as an operator would (kubectl apply -k deploy/)."""
    require_root()
    with _locked():
        state = _require_state()
        if state.runtime != "containerd":
            raise LabError("lab install needs a lab with --runtime containerd")
        _install_real(state, ensure_binaries(), progress)


def _install_real(state: LabState, binaries: Binaries, progress: Progress) -> None:
    d = state_dir()
    admin = Path(state.admin_kubeconfig)
    overlay = d / OVERLAY_DIR
    overlay.mkdir(exist_ok=True)
    name, _, tag = state.image.rpartition(":")
    # deploy/ unchanged; only the image points at the one imported into the nodes.
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        # kustomize refuses an absolute path to a base: give it a relative one.
        f"resources:\n- {os.path.relpath(deploy_dir(), overlay)}\n"
        f"images:\n- name: staticegress\n  newName: {name}\n  newTag: '{tag}'\n"
    )
    progress("installing staticegress: kubectl apply -k deploy/ (image override only)")
    _kubectl(binaries, admin, "apply", "-k", str(overlay))
    _ensure_grant_key()
    secret = _kubectl(
        binaries,
        admin,
        "-n",
        "staticegress-system",
        "create",
        "secret",
        "generic",
        "staticegress-grant-key",
        f"--from-file=key={grant_key_path()}",
        "--dry-run=client",
        "-o",
        "yaml",
    )
    _kubectl(binaries, admin, "apply", "-f", "-", stdin=secret)
    if state.pool:
        asyncio.run(_create_lab_pool(admin, progress))
    wait_deployed(binaries, admin, progress)


def _wait_kube_proxies(plans: tuple[plan.NodePlan, ...], progress: Progress) -> None:
    """Every node's kube-proxy has programmed its table: it answers its healthz
    and its nftables table exists (its healthz says healthy before the first
    sync). Before that, Service addresses such as the API server's lead nowhere."""
    deadline = time.monotonic() + 120
    pending = list(plans)
    while pending:
        node = pending[0]
        try:
            url = f"http://{node.underlay_ip}:10256/healthz"
            with urllib.request.urlopen(url, timeout=1) as resp:
                healthy = resp.status == 200
        except OSError:
            healthy = False
        listed = subprocess.run(
            ["ip", "netns", "exec", node.netns, "nft", "list", "table", "ip", "kube-proxy"],
            capture_output=True,
            check=False,
        )
        if healthy and listed.returncode == 0:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise LabError(f"kube-proxy not healthy on {', '.join(p.name for p in pending)}")
        time.sleep(0.2)
    progress("kube-proxy has programmed every node")


def wait_deployed(
    binaries: Binaries, kubeconfig: Path, progress: Progress, timeout: float = DEPLOY_WAIT
) -> None:
    """Every agent pod and both manager pods Ready."""
    for kind in ("daemonset/staticegress-agent", "deployment/staticegress-manager"):
        progress(f"  waiting for {kind} to be ready")
        try:
            _kubectl(
                binaries,
                kubeconfig,
                "-n",
                "staticegress-system",
                "rollout",
                "status",
                kind,
                f"--timeout={int(timeout)}s",
            )
        except LabError as exc:
            pods = _kubectl(
                binaries, kubeconfig, "-n", "staticegress-system", "get", "pods", "-o", "wide"
            )
            raise LabError(f"{kind} not ready: {exc}\n{pods}") from None
    progress("every agent and manager pod is ready")


def _kill_holders(state: LabState | None) -> int:
    """Stop every real-runtime node, also when the state file is gone."""
    holders = [
        pid for key, pid in (state.processes.items() if state else []) if key.startswith("node/")
    ]
    # Inits of nodes whose holder is unknown (a crashed `up`): found by command line.
    for entry in realnode.processes():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"node-init" in argv and b"staticegress" in argv:
                holders.append(int(entry.name))
    stopped = 0
    for pid in holders:
        if _ours(pid):
            realnode.kill_node(pid)
            stopped += 1
    return stopped


def _remove_node_root(progress: Progress) -> None:
    root = realnode.NODE_ROOT
    if not root.exists():
        return
    marker = root / "mountpoints.json"
    created = json.loads(marker.read_text()) if marker.exists() else []
    cgroups = root / "cgroups.json"
    if cgroups.exists():
        removed = realnode.remove_cgroups(json.loads(cgroups.read_text()))
        progress(f"removed {removed} container cgroups")
    progress(f"removing {root}")
    shutil.rmtree(root, ignore_errors=True)
    realnode.remove_mountpoints(created)
