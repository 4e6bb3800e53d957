"""Lab nodes on a real container runtime: kubelet, containerd, runc, the CNI
plugins and kube-proxy (nftables mode), one set per node.

A node is four namespaces, made by one holder process:

- the node's network namespace on the lab underlay (built as for the netns
  runtime, so `lab node kill|partition` and the probes work the same);
- a mount namespace, a slave of the host's, in which per-node directories are
  bind-mounted over the paths a real node owns (`/var/lib/kubelet`,
  `/run/containerd`, `/etc/cni/net.d`, `/opt/cni/bin`, `/run/staticegress`, ...).
  kubelet and containerd share it, so the volumes kubelet mounts are the ones
  the runtime hands to containers, and the product's hostPath volumes land in
  this node's directories, not the host's;
- a PID namespace whose init is `lab node-init`. Killing the holder kills
  the whole node, containers included, the way pulling the plug would;
- a time namespace whose boot clock starts at zero when the node boots, so
  everything on the node, containers included, sees the node's own boot time
  (/proc/uptime, `btime` in /proc/stat), as after a real boot: the agent
  trusts only pod addresses kubelet reported since then.

`lab node-init` mounts, starts containerd, imports the lab's images, then
starts kubelet, kube-proxy and the lab's route daemon (`lab cni`), and
restarts any of them that exits, as a node's init system would.

Paths: each node's directories live under `/var/lib/selab/<node>`. The
`run-*` ones are what a tmpfs /run would hold: `lab node reboot` empties them,
together with the node's kernel state, and nothing else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from staticegress.lab import plan
from staticegress.lab.netns import LabError

NODE_ROOT = Path("/var/lib/selab")
"""Every real-runtime node's directories; `lab down` removes it."""

MOUNTS: tuple[tuple[str, str], ...] = (
    ("/run/containerd", "run-containerd"),
    ("/run/staticegress", "run-staticegress"),
    ("/var/lib/kubelet", "kubelet"),
    ("/var/lib/cni", "cni-state"),
    ("/var/log/pods", "log-pods"),
    ("/var/log/containers", "log-containers"),
    ("/etc/cni/net.d", "cni-conf"),
    ("/opt/cni/bin", "cni-bin"),
)
"""Host path -> per-node directory bound over it inside the node."""

VOLATILE = ("run-containerd", "run-staticegress")
"""What a reboot loses (tmpfs on a real node)."""

CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
"""The socket's path inside the node (the host sees it under the node's directory)."""

CNI_NETWORK = "selab"

HOST_DEFAULTS = ("/run/nri", "/opt/containerd")
"""Host paths containerd creates by default, outside the node's bind mounts: the
lab configures it away from them, so nodes share neither and `lab down` has
nothing there to remove."""

WORKLOAD_IMAGE = "lab.invalid/none:0"
"""The image the lab's test workloads name; on real nodes it is the pause image."""


@dataclass(frozen=True)
class NodeImages:
    """OCI archives imported into every node's containerd, and their names."""

    pause_archive: str
    pause_ref: str
    product_archive: str
    product_ref: str


@dataclass(frozen=True)
class NodeTools:
    """The node binaries a real-runtime node runs."""

    kubelet: str
    kube_proxy: str
    containerd: str
    ctr: str
    shim: str
    runc: str
    cni_plugins: str
    """Directory holding the standard CNI plugins (ptp, host-local, ...)."""


def node_dir(name: str) -> Path:
    return NODE_ROOT / name


def log_tails(name: str, lines: int = 25) -> str:
    """Whether a node's init still runs, and the last lines of its own, containerd's
    and kubelet's logs, indented, for an error message: a failed start removes
    the node directory that holds them."""
    pid = node_init_pid(name)
    out = [f"    node-init: {f'running (pid {pid})' if pid else 'not running: the node is down'}"]
    for process in ("node-init", "containerd", "kubelet"):
        path = node_dir(name) / "logs" / f"{process}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            tail = [f"(no log: {exc})"]
        out.append(f"    --- {process} ---")
        out.extend(f"    {line[:400]}" for line in tail)
    return "\n".join(out)


def host_mountpoints() -> list[str]:
    """Create the mount points the nodes bind over; return those this call created
    (innermost last), so `lab down` can remove exactly them."""
    created: list[str] = []
    for target, _ in MOUNTS:
        missing: list[Path] = []
        p = Path(target)
        while not p.exists():
            missing.append(p)
            p = p.parent
        for path in reversed(missing):
            path.mkdir()
            created.append(str(path))
    return created


def remove_mountpoints(created: list[str]) -> None:
    """Remove the mount points `host_mountpoints` created, if they are still empty."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            Path(path).rmdir()


CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "k8s.io"
"""Where containerd puts containers in every cgroup v1 hierarchy when kubelet
runs without per-QoS cgroups."""


def container_cgroups() -> list[str]:
    """Every container cgroup directory there is now (all hierarchies)."""
    found: list[str] = []
    for parent in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}"):
        found.append(str(parent))
        found += [str(d) for d in parent.iterdir() if d.is_dir()]
    return sorted(found)


def remove_cgroups(before: list[str]) -> int:
    """rmdir the container cgroups that appeared since `before`, deepest first.

    The kernel refuses to remove a cgroup that still has processes, so this
    never touches anything alive; the lab's nodes are stopped before it runs."""
    keep = set(before)
    removed = 0
    for path in sorted(set(container_cgroups()) - keep, key=len, reverse=True):
        with contextlib.suppress(OSError):
            Path(path).rmdir()
            removed += 1
    return removed


# ------------------------------------------------------------------ configs


def _containerd_config(node: plan.NodePlan, tools: NodeTools, images: NodeImages) -> str:
    base = node_dir(node.name)
    return f"""\
# containerd for lab node {node.name}: its own root, state and socket.
version = 3
root = "{base / "containerd"}"
state = "/run/containerd/state"

[grpc]
  address = "{CONTAINERD_SOCKET}"

[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"

[plugins."io.containerd.cri.v1.runtime"]
  # This sandbox lacks CAP_SYS_RESOURCE: never lower oom_score_adj, or every
  # sandbox fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{tools.runc}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"

[plugins."io.containerd.cri.v1.images"]
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{images.pause_ref}"

[plugins."io.containerd.grpc.v1.cri"]
  # Pod network namespaces are mounted under the node's state, not in the
  # host's /run/netns, where `ip netns` would list them.
  netns_mounts_under_state_dir = true

# Two defaults name host paths outside the node's bind mounts, so every node
# would share them and `lab down` would leave them behind.
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"

[plugins."io.containerd.nri.v1.nri"]
  # NRI's socket is /var/run/nri/nri.sock for every node. Each containerd
  # unlinks it and binds its own; when nodes boot together two can unlink
  # before either binds, and the loser's CRI plugin exits containerd with
  # "listen unix /var/run/nri/nri.sock: bind: address already in use".
  # The lab runs no NRI plugin.
  disable = true
"""


def _kubelet_config(node: plan.NodePlan) -> str:
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        # This host has a cgroup v1 hybrid layout and no systemd for the lab.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "evictionHard": {},
        "failSwapOn": False,
        "address": str(node.underlay_ip),
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        # The API server reaches kubelets for logs and exec without client
        # certificates in the lab; the lab's underlay is private to the host.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "nodeStatusUpdateFrequency": "4s",
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "imageMinimumGCAge": "87600h",
        "serializeImagePulls": False,
        "resolvConf": "/etc/resolv.conf",
        "shutdownGracePeriod": "0s",
        "localStorageCapacityIsolation": False,
    }
    return json.dumps(config, indent=2)


def _kube_proxy_config(node: plan.NodePlan) -> str:
    base = node_dir(node.name)
    config: dict[str, Any] = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": str(base / "etc" / "kube-proxy.kubeconfig")},
        "hostnameOverride": node.name,
        "clusterCIDR": str(plan.CLUSTER_CIDR),
        "bindAddress": str(node.underlay_ip),
        "healthzBindAddress": f"{node.underlay_ip}:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": ["primary"],
        # No CAP_SYS_RESOURCE-style host tuning in the lab: leave conntrack alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
    return json.dumps(config, indent=2)


def _cni_conflist(node: plan.NodePlan, cni: plan.CNI) -> str:
    """Point-to-point veths with addresses from the node's pod range; the
    routes between nodes (host-gw or VXLAN) come from `lab cni`."""
    mtu = plan.VXLAN_MTU if cni == "vxlan" else 1500
    config = {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "ptp",
                "mtu": mtu,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(node.pod_cidr)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }
    return json.dumps(config, indent=2)


def prepare_node(
    node: plan.NodePlan,
    cni: plan.CNI,
    *,
    tools: NodeTools,
    images: NodeImages,
    kubelet_kubeconfig: Path,
    proxy_kubeconfig: Path,
    cni_kubeconfig: Path,
) -> None:
    """Write one node's directories and configuration (idempotent)."""
    base = node_dir(node.name)
    for _, sub in MOUNTS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    etc = base / "etc"
    etc.mkdir(exist_ok=True)
    (base / "logs").mkdir(exist_ok=True)
    (etc / "containerd.toml").write_text(_containerd_config(node, tools, images))
    (etc / "kubelet.yaml").write_text(_kubelet_config(node))
    (etc / "kube-proxy.yaml").write_text(_kube_proxy_config(node))
    for src, name in (
        (kubelet_kubeconfig, "kubelet.kubeconfig"),
        (proxy_kubeconfig, "kube-proxy.kubeconfig"),
        (cni_kubeconfig, "cni.kubeconfig"),
    ):
        shutil.copyfile(src, etc / name)
        (etc / name).chmod(0o600)
    conf = base / "cni-conf" / f"10-{CNI_NETWORK}.conflist"
    if not conf.exists():
        conf.write_text(_cni_conflist(node, cni))
    bins = base / "cni-bin"
    for plugin in Path(tools.cni_plugins).iterdir():
        link = bins / plugin.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(plugin)
    (etc / "tools.json").write_text(json.dumps(tools.__dict__))
    (etc / "images.json").write_text(json.dumps(images.__dict__))


def wipe_volatile(name: str) -> None:
    """What a reboot clears: the node's tmpfs-like directories, and the cgroups of
    its dead containers (cgroupfs forgets them at boot; left in place, kubelet's
    container stats stall its start for close to a minute)."""
    base = node_dir(name)
    cri = base / "containerd" / "io.containerd.grpc.v1.cri"
    ids = {
        d.name
        for sub in ("containers", "sandboxes")
        if (cri / sub).is_dir()
        for d in (cri / sub).iterdir()
    }
    for parent in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}"):
        for cid in ids:
            with contextlib.suppress(OSError):
                (parent / cid).rmdir()
    for sub in VOLATILE:
        shutil.rmtree(base / sub, ignore_errors=True)
        (base / sub).mkdir(parents=True, exist_ok=True)


def holder_argv(
    node: plan.NodePlan, cni: plan.CNI, nodes: int, *, uptime: float | None = None
) -> list[str]:
    """The command that boots one node: enter its network namespace, make its
    mount, PID and time namespaces, and run `lab node-init` as their init.

    The time namespace's boot clock is offset by the host's `uptime` (read
    now unless given), whole seconds down, so the node's clock starts within a
    second after zero (the kernel refuses an offset that makes it negative)."""
    host_up = uptime if uptime is not None else host_uptime()
    return [
        "nsenter",
        f"--net=/run/netns/{node.netns}",
        "--",
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "--pid",
        "--fork",
        "--mount-proc",
        "--time",
        f"--boottime=-{int(host_up)}",
        # The init dies with the holder, and every process of the node with it.
        "--kill-child=SIGKILL",
        "--",
        sys.executable,
        "-m",
        "staticegress",
        "lab",
        "node-init",
        "--node",
        node.name,
        "--nodes",
        str(nodes),
        "--cni",
        cni,
    ]


def host_uptime() -> float:
    """Seconds since the host booted, as its boot clock counts them."""
    return float(Path("/proc/uptime").read_text().split()[0])


def node_init_pid(name: str) -> int | None:
    """The host pid of a node's `lab node-init`, if it runs (its holder, whose
    command line names it too, is not it)."""
    for entry in processes():
        with contextlib.suppress(OSError, ValueError, IndexError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv[1:5] == [b"-m", b"staticegress", b"lab", b"node-init"] and (
                argv[argv.index(b"--node") + 1] == name.encode()
            ):
                return int(entry.name)
    return None


def node_pidns(holder: int) -> str | None:
    """The PID namespace of a node, read from its init (the holder's child)."""
    try:
        children = Path(f"/proc/{holder}/task/{holder}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        with contextlib.suppress(OSError):
            return os.readlink(f"/proc/{child}/ns/pid")
    return None


def processes() -> Iterator[Path]:
    """Every process's /proc directory."""
    return (entry for entry in Path("/proc").iterdir() if entry.name.isdigit())


def pids_in_pidns(pidns: str) -> list[int]:
    """Processes whose PID namespace is `pidns` (not counting nested ones)."""
    found = []
    for entry in processes():
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns" / "pid") == pidns:
                found.append(int(entry.name))
    return found


def kill_node(holder: int, *, wait: float = 10.0) -> None:
    """SIGKILL a node's holder: its init follows, and the kernel kills every
    process of the node's PID namespace, containers included."""
    pidns = node_pidns(holder)
    with contextlib.suppress(ProcessLookupError):
        os.kill(holder, signal.SIGKILL)
    if pidns is None:
        return
    deadline = time.monotonic() + wait
    while pids_in_pidns(pidns):
        if time.monotonic() > deadline:
            raise LabError(f"processes of PID namespace {pidns} outlived its init")
        time.sleep(0.05)


# -------------------------------------------------------------- pod lookup


def _net_inode(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def pod_pid(pod_ip: str) -> int:
    """A process inside the pod whose address is `pod_ip`: its sandbox's pause.

    Pod network namespaces are mounted inside the node, invisible to the host,
    so they are found through the process that holds each one."""
    seen: set[str] = set()
    for entry in processes():
        try:
            if (entry / "comm").read_text().strip() != "pause":
                continue
        except OSError:
            continue
        pid = int(entry.name)
        inode = _net_inode(pid)
        if inode is None or inode in seen:
            continue
        seen.add(inode)
        out = subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "ip", "-j", "-4", "addr", "show"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        with contextlib.suppress(ValueError):
            for link in json.loads(out or "[]"):
                for addr in link.get("addr_info", []):
                    if addr.get("local") == pod_ip:
                        return pid
    raise LabError(f"no running pod sandbox holds {pod_ip}")


def agent_pids(netns: str, role: str) -> list[int]:
    """The product's `role` processes (agent or manager) running on a node."""
    node_inode = None
    with contextlib.suppress(OSError):
        node_inode = os.stat(f"/run/netns/{netns}").st_ino
    found = []
    for entry in processes():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            inode = os.stat(entry / "ns" / "net").st_ino
        except OSError:
            continue
        if inode != node_inode:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if any(Path(w).name == "staticegress" for w in words[:2]) and role in words[1:3]:
            found.append(int(entry.name))
    return found


# ---------------------------------------------------------------- node-init


class NodeInit:
    """PID 1 of one node: mounts, daemons, reaping."""

    def __init__(self, node: plan.NodePlan, cni: plan.CNI, nodes: int) -> None:
        self.node = node
        self.cni = cni
        self.nodes = nodes
        self.base = node_dir(node.name)
        etc = self.base / "etc"
        self.tools = NodeTools(**json.loads((etc / "tools.json").read_text()))
        self.images = NodeImages(**json.loads((etc / "images.json").read_text()))
        self.children: dict[int, str] = {}
        self.stopping = False

    def say(self, line: str) -> None:
        """Log a line to the holder's log and, timestamped as containerd and
        kubelet stamp theirs, to the node's own `logs/node-init.log`."""
        print(f"[node-init {self.node.name}] {line}", flush=True)
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        with open(self.base / "logs" / "node-init.log", "a") as log:
            log.write(f"{stamp} {line}\n")

    def mount(self) -> None:
        for target, sub in MOUNTS:
            subprocess.run(["mount", "--bind", str(self.base / sub), target], check=True)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # containerd finds its shim, and the shim finds runc, through PATH.
        dirs = [str(Path(self.tools.shim).parent), str(Path(self.tools.runc).parent)]
        env["PATH"] = ":".join([*dirs, env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        return env

    def _argv(self, name: str) -> list[str]:
        etc = self.base / "etc"
        node = self.node
        if name == "containerd":
            return [self.tools.containerd, "--config", str(etc / "containerd.toml")]
        if name == "kubelet":
            return [
                self.tools.kubelet,
                "--config",
                str(etc / "kubelet.yaml"),
                "--kubeconfig",
                str(etc / "kubelet.kubeconfig"),
                "--hostname-override",
                node.name,
                "--node-ip",
                str(node.underlay_ip),
                "--node-labels",
                f"{plan.LAB_LABEL}=true,staticegress.io/gateway=true",
                "--v",
                "1",
            ]
        if name == "kube-proxy":
            return [self.tools.kube_proxy, "--config", str(etc / "kube-proxy.yaml")]
        if name == "cni":
            return [
                sys.executable,
                "-m",
                "staticegress",
                "lab",
                "kubelet",
                "--routes-only",
                "--node",
                node.name,
                "--nodes",
                str(self.nodes),
                "--cni",
                self.cni,
                "--kubeconfig",
                str(etc / "cni.kubeconfig"),
                "--state-dir",
                str(self.base),
            ]
        raise ValueError(name)

    def start(self, name: str) -> None:
        log = open(self.base / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            self._argv(name),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
        )
        log.close()
        self.children[proc.pid] = name
        self.say(f"started {name} (pid {proc.pid})")

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.tools.ctr, "--address", CONTAINERD_SOCKET, "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            check=False,
        )

    def wait_containerd(self) -> None:
        """Until containerd answers, restarting it whenever it exits."""
        deadline = time.monotonic() + 60
        while self._ctr("version").returncode != 0:
            self.reap()
            if time.monotonic() > deadline:
                raise LabError("containerd did not answer within 60s")
            time.sleep(0.2)

    def import_images(self, attempts: int = 3) -> None:
        """Import the lab's images, again after a failure: containerd can exit
        under an import (`reap` restarts it), and a node whose init gives up
        here never starts kubelet, so it never registers."""
        failure = None
        for attempt in range(1, attempts + 1):
            self.wait_containerd()
            failure = self._import_missing()
            if failure is None:
                return
            self.say(f"{failure} (attempt {attempt} of {attempts})")
            time.sleep(1)
        raise LabError(f"images not imported: {failure}")

    def _import_missing(self) -> str | None:
        """Import what containerd lacks; the first failure, or None."""
        listed = self._ctr("images", "ls", "-q")
        if listed.returncode != 0:
            return f"listing images: {listed.stderr.strip()}"
        present = set(listed.stdout.split())
        for archive, ref in (
            (self.images.pause_archive, self.images.pause_ref),
            (self.images.product_archive, self.images.product_ref),
        ):
            if ref in present:
                continue
            res = self._ctr(
                "images", "import", "--base-name", ref.rsplit(":", 1)[0], "--digests", archive
            )
            if res.returncode != 0:
                return f"importing {archive}: {res.stderr.strip()}"
            self.say(f"imported {ref}")
        # The tests' workloads name this image in both runtimes: here it runs pause.
        if WORKLOAD_IMAGE not in present:
            res = self._ctr("images", "tag", "--force", self.images.pause_ref, WORKLOAD_IMAGE)
            if res.returncode != 0:
                return f"tagging {WORKLOAD_IMAGE}: {res.stderr.strip()}"
        return None

    def reap(self) -> None:
        """Reap every exited child (orphaned shims land here too); restart ours."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            name = self.children.pop(pid, None)
            if name is not None and not self.stopping:
                self.say(f"{name} exited ({status:#x}): restarting it in 1s")
                time.sleep(1)
                self.start(name)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        self.mount()
        self.start("cni")
        self.start("containerd")
        self.import_images()
        for name in ("kubelet", "kube-proxy"):
            self.start(name)
        while not self.stopping:
            self.reap()
            time.sleep(0.2)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(1)
        return 0

    def _stop(self, *_: object) -> None:
        self.stopping = True


def node_init(name: str, cni: plan.CNI, nodes: int) -> int:
    """Entry point of `lab node-init`."""
    if os.getpid() != 1:
        raise LabError("lab node-init runs as the init of a node's PID namespace")
    init = NodeInit(plan.node_by_name(name, nodes), cni, nodes)
    try:
        return init.run()
    except BaseException as exc:
        # The node dies with its init: say why where `lab up` looks for it.
        init.say(f"node-init failed, the node is down: {exc!r}")
        raise
