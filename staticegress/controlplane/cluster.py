"""Run a real, local Kubernetes control plane: etcd, kube-apiserver (RBAC, client-cert
auth, service-account keys), kube-controller-manager and kube-scheduler.

Invariants:
- every component listens on a free port chosen at start, on `bind_address`
  (the API server) or loopback (everything else);
- all state (etcd data, PKI, kubeconfigs, logs) lives in one work directory
  `staticegress-cp-*` under the system temp dir, removed by `stop()`;
- `stop()` leaves no process behind; with `die_with_parent=True` the kernel
  also kills the components if the owning thread dies without calling it, and
  the next `start()` sweeps directories (and the processes that name them)
  whose owner has died;
- blocking and synchronous on purpose: it is driven by pytest fixtures and the
  lab's command line, both outside any event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from staticegress.controlplane.binaries import Binaries, Progress
from staticegress.controlplane.pki import CertificateAuthority, KeyPair, service_account_keys

WORKDIR_PREFIX = "staticegress-cp-"
SERVICE_CIDR = "10.96.0.0/16"
_PR_SET_PDEATHSIG = 1
STOP_GRACE = 2.0
"""Seconds components get to exit on SIGTERM before SIGKILL. kube-apiserver
drains open watches for up to its request timeout (60 s) on SIGTERM; its state
is throwaway here, so it is not worth the wait."""


def _stderr_progress(line: str) -> None:
    print(f"[staticegress] {line}", file=sys.stderr, flush=True)


class ControlPlaneError(RuntimeError):
    """A component failed to start; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. The signal fires when the
    # thread that forked exits, so components of a crashed test run die too.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def sweep_stale_workdirs(*, progress: Progress = _stderr_progress) -> int:
    """Remove work directories whose owner died, killing only processes that name them."""
    removed = 0
    for d in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            owner = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(owner):
            continue
        for line in (
            (d / "children.pid").read_text().split() if (d / "children.pid").exists() else []
        ):
            pid = int(line)
            # A recycled pid belongs to someone else: kill only what names our dir.
            if pid_alive(pid) and str(d) in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        progress(f"removed leftovers of a dead control plane: {d}")
        removed += 1
    return removed


@dataclass
class _Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class ControlPlane:
    """A local control plane. Use as a context manager, or call `start()` and `stop()`."""

    binaries: Binaries
    bind_address: str = "127.0.0.1"
    advertise_address: str | None = None
    extra_sans: tuple[str, ...] = ()
    controllers: bool = True
    """Also run kube-controller-manager and kube-scheduler."""
    die_with_parent: bool = True
    apiserver_args: tuple[str, ...] = ()
    controller_manager_args: tuple[str, ...] = ()
    progress: Progress = _stderr_progress
    workdir: Path | None = None
    api_port: int = 0
    _procs: list[_Proc] = field(default_factory=list)
    _ca: CertificateAuthority | None = None

    # ----------------------------------------------------------------- paths

    @property
    def server(self) -> str:
        """The API server's URL, as clients reach it."""
        host = self.advertise_address or self.bind_address
        return f"https://{host}:{self.api_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        """A kubeconfig for a member of `system:masters`."""
        return self._dir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self._dir / "pki" / "ca.crt"

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise ControlPlaneError("the control plane is not started")
        return self.workdir

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every component and wait until each reports ready."""
        sweep_stale_workdirs(progress=self.progress)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        else:
            self.workdir.mkdir(mode=0o700, parents=True)
        if self.die_with_parent:
            # Only a control plane tied to its owner may be swept when the
            # owner is gone; a detached one (the lab's) outlives its starter.
            (self.workdir / "owner.pid").write_text(str(os.getpid()))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        t0 = time.monotonic()
        pki = self._dir / "pki"
        pki.mkdir()
        self._ca = CertificateAuthority()
        self._ca.pair.write(pki, "ca")
        host = self.advertise_address or self.bind_address
        sans = [
            host,
            self.bind_address,
            "127.0.0.1",
            "localhost",
            "10.96.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            *self.extra_sans,
        ]
        self._ca.serving(hosts=list(dict.fromkeys(sans))).write(pki, "apiserver")
        sa_pub, sa_key = service_account_keys().write(pki, "sa")

        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=default",
                f"--data-dir={self._dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", lambda: _http_ok(f"{etcd_url}/health"))

        self.api_port = self.api_port or free_port(self.bind_address)
        self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={self.bind_address}",
                f"--secure-port={self.api_port}",
                f"--advertise-address={host}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--authorization-mode=RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # Real kubelets (the lab's containerd runtime) are reached for logs
                # and exec by address: node names resolve nowhere.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--cert-dir={self._dir / 'apiserver-certs'}",
                *self.apiserver_args,
            ],
        )
        self._write_kubeconfig("admin", self._ca.client("admin", ("system:masters",)))
        ctx = self._ssl_context(admin_pair=True)
        self._wait("kube-apiserver", lambda: _http_ok(f"{self.server}/readyz", ctx))

        if self.controllers:
            self._start_controllers(sa_key)
        self.progress(f"control plane ready at {self.server} in {time.monotonic() - t0:.1f}s")

    def _start_controllers(self, sa_key: Path) -> None:
        assert self._ca is not None
        kcm = self._write_kubeconfig(
            "kube-controller-manager", self._ca.client("system:kube-controller-manager")
        )
        kcm_port = free_port()
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={kcm}",
                f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={self.ca_file}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--controllers=*",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={self._dir / 'kcm-certs'}",
                *self.controller_manager_args,
            ],
        )
        sched = self._write_kubeconfig("kube-scheduler", self._ca.client("system:kube-scheduler"))
        sched_port = free_port()
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                f"--kubeconfig={sched}",
                f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                f"--cert-dir={self._dir / 'scheduler-certs'}",
            ],
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        self._wait(
            "kube-controller-manager",
            lambda: _http_ok(f"https://127.0.0.1:{kcm_port}/healthz", insecure),
        )
        self._wait(
            "kube-scheduler",
            lambda: _http_ok(f"https://127.0.0.1:{sched_port}/healthz", insecure),
        )

    def stop(self) -> None:
        """Stop every component (newest first) and remove the work directory."""
        for proc in reversed(self._procs):
            if proc.popen.poll() is None:
                proc.popen.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for proc in reversed(self._procs):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self._procs.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    @staticmethod
    def stop_detached(workdir: Path, *, grace: float = 0.0) -> None:
        """Stop a control plane started by another process, given its work directory.

        Only processes whose command line names `workdir` are signalled, so a
        recycled pid is never hit.
        """
        pids_file = workdir / "children.pid"
        pids = [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []
        ours = [p for p in pids if pid_alive(p) and str(workdir) in _cmdline(p)]
        for pid in reversed(ours):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + (grace or STOP_GRACE)
        while time.monotonic() < deadline and any(
            pid_alive(p) and str(workdir) in _cmdline(p) for p in ours
        ):
            time.sleep(0.1)
        for pid in ours:
            if pid_alive(pid) and str(workdir) in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def control_detached(workdir: Path, name: str, *, start: bool) -> None:
        """Stop or start one component of a detached control plane (outage tests)."""
        components = workdir / "components.json"
        known = json.loads(components.read_text())
        entry = known[name]
        pid = int(entry["pid"])
        alive = pid_alive(pid) and str(workdir) in _cmdline(pid)
        if not start:
            if alive:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + STOP_GRACE
                while (
                    time.monotonic() < deadline and pid_alive(pid) and str(workdir) in _cmdline(pid)
                ):
                    time.sleep(0.05)
                if pid_alive(pid) and str(workdir) in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
            return
        if alive:
            return
        with open(entry["log"], "ab") as out:
            popen = subprocess.Popen(
                entry["argv"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        entry["pid"] = popen.pid
        components.write_text(json.dumps(known))
        with open(workdir / "children.pid", "a") as f:
            f.write(f"{popen.pid}\n")

    def running(self) -> dict[str, bool]:
        """Whether each started component is still running."""
        return {p.name: p.popen.poll() is None for p in self._procs}

    def stop_component(self, name: str) -> None:
        """Stop one component (for outage tests); `start_component` brings it back."""
        for proc in self._procs:
            if proc.name == name and proc.popen.poll() is None:
                proc.popen.terminate()
                proc.popen.wait(timeout=10)

    def start_component(self, name: str) -> None:
        """Start a stopped component again with the arguments it first had."""
        for i, proc in enumerate(self._procs):
            if proc.name == name and proc.popen.poll() is not None:
                self._procs[i] = self._launch(name, proc.argv)

    # --------------------------------------------------------------- helpers

    def _spawn(self, name: str, argv: list[str]) -> None:
        self._procs.append(self._launch(name, argv))

    def _launch(self, name: str, argv: list[str]) -> _Proc:
        logs = self._dir / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}.log"
        self.progress(f"starting {name}")
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
                start_new_session=True,
            )
        with open(self._dir / "children.pid", "a") as f:
            f.write(f"{popen.pid}\n")
        components = self._dir / "components.json"
        known = json.loads(components.read_text()) if components.exists() else {}
        known[name] = {"argv": argv, "pid": popen.pid, "log": str(log)}
        components.write_text(json.dumps(known))
        return _Proc(name, argv, popen, log)

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float = 90) -> None:
        proc = next(p for p in self._procs if p.name == name)
        start = time.monotonic()
        last_note = start
        while not ready():
            if proc.popen.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.popen.returncode}:\n{_tail(proc.log)}"
                )
            now = time.monotonic()
            if now - start > timeout:
                raise ControlPlaneError(
                    f"{name} not ready after {timeout:.0f}s:\n{_tail(proc.log)}"
                )
            if now - last_note > 10:
                self.progress(f"  still waiting for {name} ({now - start:.0f}s)")
                last_note = now
            time.sleep(0.2)
        self.progress(f"{name} ready in {time.monotonic() - start:.1f}s")

    def _ssl_context(self, *, admin_pair: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if admin_pair:
            pki = self._dir / "pki"
            ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def _write_kubeconfig(
        self,
        stem: str,
        pair: KeyPair | None,
        *,
        token: str | None = None,
        user: str | None = None,
    ) -> Path:
        """Write `<stem>.kubeconfig` with embedded credentials; return its path."""
        import base64

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        creds: dict[str, Any] = {}
        if pair is not None:
            pair.write(self._dir / "pki", stem)
            creds = {
                "client-certificate-data": b64(pair.cert_pem),
                "client-key-data": b64(pair.key_pem),
            }
        if token is not None:
            creds = {"token": token}
        name = user or stem
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "staticegress",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(self.ca_file.read_bytes()),
                    },
                }
            ],
            "users": [{"name": name, "user": creds}],
            "contexts": [{"name": name, "context": {"cluster": "staticegress", "user": name}}],
            "current-context": name,
        }
        path = self._dir / f"{stem}.kubeconfig"
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config))
        return path

    # --------------------------------------------------------- identities

    def kubeconfig_for_user(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """Mint a client certificate for `user` in `groups`; return a kubeconfig using it."""
        if self._ca is None:
            raise ControlPlaneError("the control plane is not started")
        stem = "user-" + "".join(c if c.isalnum() else "_" for c in user)
        return self._write_kubeconfig(stem, self._ca.client(user, groups), user=user)

    def kubeconfig_for_service_account(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> Path:
        """Create the ServiceAccount if needed, request a token, return a kubeconfig using it."""
        ctx = self._ssl_context(admin_pair=True)
        base = f"{self.server}/api/v1/namespaces/{namespace}"
        for url, body in (
            (f"{self.server}/api/v1/namespaces", {"metadata": {"name": namespace}}),
            (f"{base}/serviceaccounts", {"metadata": {"name": name}}),
        ):
            _post(url, {"apiVersion": "v1", **body}, ctx, ok_conflict=True)
        resp = _post(
            f"{base}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
            ctx,
        )
        token = str(resp["status"]["token"])
        stem = f"sa-{namespace}-{name}"
        return self._write_kubeconfig(
            stem, None, token=token, user=f"system:serviceaccount:{namespace}:{name}"
        )

    def logs(self) -> Iterator[tuple[str, Path]]:
        """Each component's log file."""
        for proc in self._procs:
            yield proc.name, proc.log


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _post(
    url: str, body: dict[str, Any], ctx: ssl.SSLContext, *, ok_conflict: bool = False
) -> dict[str, Any]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result
    except urllib.error.HTTPError as exc:
        if ok_conflict and exc.code == 409:
            return {}
        raise ControlPlaneError(f"POST {url}: {exc.code} {exc.read().decode()[:500]}") from None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
