"""The CNI gate on this node: install it, keep it installed, open it, remove it.

Our fail-closed state lives in the kernel, so a reboot erases it, and kubelet
starts pods long before a restarted agent has listed anything. The gate is a
chained CNI plugin, `staticegress-gate` (Go source in `staticegress/cnigate/`),
appended to the node's active conflist: a new pod's sandbox is held until the
ready file holds this boot's id, which the agent writes once its first
complete sync since boot is in the kernel (`write_ready`).

Invariants:
- The binary is in the runtime's bin dir before any conflist names it, and
  stays there until no conflist names it: a runtime that cannot find a plugin
  fails every ADD and, worse, every DEL, so pods could not even be removed.
- Only the active conflist is edited (the runtime uses the lexically first
  `*.conf`, `*.conflist` or `*.json` in the conf dir), and only by appending
  our entry to its `plugins`; everything else is kept as it was (the JSON is
  rewritten, so the file's formatting is not). A single-plugin `.conf` is
  refused, not converted: the CNI that wrote it owns its format. Every write
  goes to a temporary name in the same directory, then is renamed over the
  file, so the runtime never reads half a file.
- CNI daemons rewrite their conflist when they restart, dropping our entry,
  so `GateKeeper` checks again every few seconds, by stat, reading a file
  only when it changed.
- The ready file is left in place when the agent stops: the kernel state
  survives an agent restart, and only a reboot clears it. The boot id in it
  covers nodes whose /run is not a tmpfs.

Errors are reported (log, and a callback for the agent's Node Event) and
retried, never raised into the agent: without a conflist yet (the CNI has not
written one), the keeper waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLUGIN_TYPE = "staticegress-gate"
DEFAULT_READY_FILE = Path("/run/staticegress/agent-ready")
DEFAULT_BINARY = Path("/opt/staticegress/cni/staticegress-gate")
"""Where the image carries the plugin; the agent copies it into the bin dir."""
DEFAULT_WAIT_SECONDS = 20
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
CONF_SUFFIXES = (".conf", ".conflist", ".json")
"""The extensions the runtime's CNI library loads, in the same order of preference."""


@dataclass(frozen=True)
class GateConfig:
    """Where the gate goes on this node and how it behaves."""

    conf_dir: Path
    """The runtime's CNI configuration directory (e.g. /etc/cni/net.d, as mounted)."""
    bin_dir: Path
    """The runtime's CNI plugin directory (e.g. /opt/cni/bin, as mounted)."""
    binary: Path = DEFAULT_BINARY
    """The plugin binary to copy into `bin_dir`."""
    ready_file: Path = DEFAULT_READY_FILE
    """The ready file; the same path on the host and in the agent's container
    (the DaemonSet mounts the host's /run/staticegress at /run/staticegress),
    since the plugin reads it on the host."""
    wait_seconds: int = DEFAULT_WAIT_SECONDS

    @property
    def installed_binary(self) -> Path:
        return self.bin_dir / PLUGIN_TYPE

    def entry(self) -> dict[str, Any]:
        """Our entry in the conflist's `plugins`."""
        return {
            "type": PLUGIN_TYPE,
            "readyFile": str(self.ready_file),
            "waitSeconds": self.wait_seconds,
        }


class GateError(Exception):
    """Why the gate is not installed; the message is meant for the operator."""

    def __init__(self, message: str, *, waiting: bool = False) -> None:
        super().__init__(message)
        self.waiting = waiting
        """True when nothing is wrong yet: the CNI has not written its config."""


class _ChangedUnderneathError(Exception):
    """The file changed while we edited it; start again from what is there now."""


# ------------------------------------------------------------------- files


def config_files(conf_dir: Path) -> list[Path]:
    """The CNI configuration files in `conf_dir`, in the order the runtime ranks them."""
    try:
        entries = list(os.scandir(conf_dir))
    except FileNotFoundError:
        return []
    return sorted(
        (Path(e.path) for e in entries if e.name.endswith(CONF_SUFFIXES) and e.is_file()),
        key=str,
    )


def active_conflist(conf_dir: Path) -> Path | None:
    """The file the runtime uses: the lexically first configuration file."""
    files = config_files(conf_dir)
    return files[0] if files else None


def _atomic_write(path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None) -> None:
    """Write `data` to `path` through a temporary name in the same directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.staticegress.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


# ------------------------------------------------------------------ binary


def install_binary(cfg: GateConfig) -> bool:
    """Copy the plugin into the bin dir unless an identical copy is there; True if it copied."""
    try:
        data = cfg.binary.read_bytes()
    except OSError as exc:
        raise GateError(f"cannot read the gate binary {cfg.binary}: {exc.strerror}") from exc
    dst = cfg.installed_binary
    with contextlib.suppress(OSError):
        if dst.stat().st_mode & 0o777 == 0o755 and dst.read_bytes() == data:
            return False
    if not cfg.bin_dir.is_dir():
        raise GateError(f"the CNI bin dir {cfg.bin_dir} does not exist or is not a directory")
    try:
        # A new file renamed into place, never a write into the old one: the
        # runtime may be executing it right now (ETXTBSY).
        _atomic_write(dst, data, mode=0o755, owner=None)
    except OSError as exc:
        raise GateError(f"cannot install {dst}: {exc.strerror or exc}") from exc
    log.info("cni gate: installed %s", dst)
    return True


# ---------------------------------------------------------------- conflist


def _load_conflist(path: Path) -> tuple[dict[str, Any], os.stat_result]:
    """The conflist at `path` and the stat it was read under."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except OSError as exc:
        raise GateError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GateError(f"{path} is not valid JSON ({exc}); the gate is not installed") from exc
    if not isinstance(doc, dict):
        raise GateError(f"{path} is not a CNI configuration (not a JSON object)")
    plugins = doc.get("plugins")
    if plugins is None and "type" in doc:
        raise GateError(
            f"{path} is a single-plugin CNI configuration, which the gate does not support: "
            "configure the CNI to write a conflist (with a `plugins` list)"
        )
    if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
        raise GateError(f"{path} is not a CNI conflist (`plugins` is not a list of objects)")
    return doc, st


def _is_gate(plugin: dict[str, Any]) -> bool:
    return plugin.get("type") == PLUGIN_TYPE


def _write_conflist(path: Path, doc: dict[str, Any], read_under: os.stat_result) -> None:
    data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
    try:
        now = os.stat(path)
    except FileNotFoundError as exc:
        raise _ChangedUnderneathError() from exc
    if _stat_key(now) != _stat_key(read_under):
        # The CNI rewrote it since we read it: ours would bring back its old content.
        raise _ChangedUnderneathError()
    # Through a symlink, the file it points to: the link is the CNI's to keep.
    target = Path(os.path.realpath(path))
    try:
        _atomic_write(
            target, data, mode=read_under.st_mode & 0o7777, owner=(now.st_uid, now.st_gid)
        )
    except OSError as exc:
        raise GateError(f"cannot write {path}: {exc.strerror or exc}") from exc


def ensure_conflist(cfg: GateConfig) -> Path | None:
    """Make the active conflist end with our entry; return its path if it was rewritten."""
    for _ in range(3):
        path = active_conflist(cfg.conf_dir)
        if path is None:
            raise GateError(
                f"no CNI configuration in {cfg.conf_dir} yet; waiting for the CNI to write one",
                waiting=True,
            )
        doc, st = _load_conflist(path)
        plugins: list[dict[str, Any]] = doc["plugins"]
        entry = cfg.entry()
        others = [p for p in plugins if not _is_gate(p)]
        if not others:
            raise GateError(f"{path} has no plugin to chain the gate after")
        if plugins[-1] == entry and len(others) == len(plugins) - 1:
            return None
        doc["plugins"] = [*others, entry]
        try:
            _write_conflist(path, doc, st)
        except _ChangedUnderneathError:
            continue
        log.info("cni gate: appended %s to %s", PLUGIN_TYPE, path)
        return path
    raise GateError(f"{cfg.conf_dir} keeps changing; will try again")


def install(cfg: GateConfig) -> list[str]:
    """Binary first, then the conflist; return what changed. Raises `GateError`."""
    changed: list[str] = []
    if install_binary(cfg):
        changed.append(f"installed {cfg.installed_binary}")
    if (path := ensure_conflist(cfg)) is not None:
        changed.append(f"appended {PLUGIN_TYPE} to {path}")
    return changed


def uninstall(cfg: GateConfig) -> tuple[list[str], list[str]]:
    """Remove the gate from every conflist, then the binary, then the ready file.

    Returns (what was removed, what failed). The binary stays if any conflist
    still names it, and the ready file stays while the binary does, so a
    failure never leaves a runtime calling a plugin that is gone, nor a gate
    that holds every pod."""
    removed: list[str] = []
    errors: list[str] = []
    for path in config_files(cfg.conf_dir):
        for _ in range(3):
            try:
                doc, st = _load_conflist(path)
            except GateError:
                break  # not a conflist of ours to edit: never touch it
            plugins: list[dict[str, Any]] = doc["plugins"]
            if not any(_is_gate(p) for p in plugins):
                break
            doc["plugins"] = [p for p in plugins if not _is_gate(p)]
            try:
                _write_conflist(path, doc, st)
            except _ChangedUnderneathError:
                continue
            except GateError as exc:
                errors.append(str(exc))
                break
            removed.append(f"removed {PLUGIN_TYPE} from {path}")
            break
        else:
            errors.append(f"{path} kept changing; {PLUGIN_TYPE} may still be in it")
    if errors:
        return removed, [*errors, f"kept {cfg.installed_binary} and {cfg.ready_file}"]
    for path in (cfg.installed_binary, cfg.ready_file):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"cannot remove {path}: {exc.strerror}")
            break
        removed.append(f"removed {path}")
    return removed, errors


# -------------------------------------------------------------- ready file


def read_boot_id(path: Path = BOOT_ID_FILE) -> str:
    """This boot's id: the same in every namespace and container on the node."""
    return path.read_text().strip()


def write_ready(path: Path, boot_id: str) -> None:
    """Open the gate for this boot. Raises `OSError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, f"{boot_id}\n".encode(), mode=0o644, owner=None)


# ------------------------------------------------------------------ keeper


class GateKeeper:
    """Installs the gate at once and keeps it installed; one `check` every `interval`.

    `check` does the file I/O (`run` gives it a worker thread); `report` then
    calls `on_problem(message)`, in the caller's thread, when a problem
    appears or changes, for the agent's Node Event. A missing conflist counts
    only once it has lasted `waiting_grace` seconds (a new node's CNI takes a
    moment)."""

    def __init__(
        self,
        cfg: GateConfig,
        *,
        interval: float = 3.0,
        on_problem: Callable[[str], None] | None = None,
        waiting_grace: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.interval = interval
        self._on_problem = on_problem
        self._grace = waiting_grace
        self._clock = clock
        self._seen: tuple[object, ...] | None = None
        self.problem: str | None = None
        """Why the gate is not installed now; None when it is."""
        self._waiting = False
        self._problem_since = 0.0
        self._reported: str | None = None

    def _fingerprint(self) -> tuple[object, ...] | None:
        """What `check` last verified: the binary's and the active conflist's stat."""
        try:
            binary = _stat_key(self.cfg.installed_binary.stat())
            path = active_conflist(self.cfg.conf_dir)
            conf = _stat_key(path.stat()) if path is not None else None
        except OSError:
            return None
        return (binary, path, conf)

    def check(self) -> bool:
        """Install whatever is missing; True when the gate is in place. Never raises."""
        before = self._fingerprint()
        if before is not None and before == self._seen:
            return True
        try:
            install(self.cfg)
        except GateError as exc:
            self._seen = None
            self._set_problem(str(exc), waiting=exc.waiting)
            return False
        except Exception as exc:
            # Anything else is a bug; the agent must go on regardless.
            log.exception("cni gate: unexpected error")
            self._seen = None
            self._set_problem(f"unexpected error: {exc}", waiting=False)
            return False
        self._seen = self._fingerprint()
        if self.problem is not None:
            log.info("cni gate: in place in %s", self.cfg.conf_dir)
        self.problem = None
        self._reported = None
        return True

    def _set_problem(self, message: str, *, waiting: bool) -> None:
        if message != self.problem:
            (log.warning if waiting else log.error)("cni gate: %s", message)
            self._problem_since = self._clock()
            self.problem = message
            self._waiting = waiting

    def report(self) -> None:
        """Pass the current problem to `on_problem`, once, when it is due."""
        message = self.problem
        if message is None or message == self._reported or self._on_problem is None:
            return
        if self._waiting and self._clock() - self._problem_since < self._grace:
            return
        self._reported = message
        self._on_problem(message)

    async def run(self) -> None:
        """Check every `interval` seconds, forever."""
        while True:
            await asyncio.to_thread(self.check)
            self.report()
            await asyncio.sleep(self.interval)
