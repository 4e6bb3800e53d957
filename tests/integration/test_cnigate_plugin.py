"""The real `staticegress-gate` binary, built from its Go source and run as a
container runtime runs a CNI plugin: the command in CNI_COMMAND, the network
configuration (with the previous plugin's result) on stdin, the result or a
CNI error document on stdout."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from staticegress.cnigate import ensure_gate_binary
from staticegress.dataplane.cnigate import read_boot_id, write_ready

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/var/run/netns/cni-1234"},
        {"name": "veth0a1b2c3d", "mac": "aa:bb:cc:dd:ee:02"},
    ],
    "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
}


@pytest.fixture(scope="module")
def plugin() -> Path:
    return ensure_gate_binary()


def _conf(ready: Path, *, wait: float | None = 1, prev: Any = PREV, **extra: Any) -> bytes:
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "staticegress-gate",
        "readyFile": str(ready),
        **extra,
    }
    if wait is not None:
        conf["waitSeconds"] = wait
    if prev is not None:
        conf["prevResult"] = prev
    return json.dumps(conf).encode()


def _run(
    plugin: Path, command: str, stdin: bytes, timeout: float = 10
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "f00dcafe",
        "CNI_NETNS": "/var/run/netns/cni-1234",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(plugin.parent),
    }
    start = time.monotonic()
    proc = subprocess.run(
        [str(plugin)], input=stdin, env=env, capture_output=True, timeout=timeout, check=False
    )
    return proc, time.monotonic() - start


def _error(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert proc.returncode == 1, proc
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert set(doc) <= {"cniVersion", "code", "msg", "details"}
    assert isinstance(doc["code"], int)
    assert doc["msg"]
    return doc


def test_version(plugin: Path) -> None:
    proc, _ = _run(plugin, "VERSION", b'{"cniVersion": "1.1.0"}')
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert doc["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    assert doc["cniVersion"] in doc["supportedVersions"]


def test_add_passes_the_previous_result_when_ready(plugin: Path, tmp_path: Path) -> None:
    ready = tmp_path / "agent-ready"
    write_ready(ready, read_boot_id())
    proc, took = _run(plugin, "ADD", _conf(ready, wait=20))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == PREV
    assert took < 1.0, "no waiting when the node is programmed"

    # The runtime converted prevResult to the config's version; only that is ours to set.
    proc, _ = _run(plugin, "ADD", _conf(ready, cniVersion="1.1.0"))
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {**PREV, "cniVersion": "1.1.0"}


@pytest.mark.parametrize("content", [None, "0d7b4fd6-d4a8-4e1c-9a53-5c1a2b3c4d5e\n", ""])
def test_add_holds_the_pod_without_this_boots_ready_file(
    plugin: Path, tmp_path: Path, content: str | None
) -> None:
    ready = tmp_path / "agent-ready"
    if content is not None:
        ready.write_text(content)  # None: missing; else an earlier boot's id, or empty
    proc, took = _run(plugin, "ADD", _conf(ready, wait=1))
    err = _error(proc)
    assert err["code"] == 11, "try again later: kubelet retries the sandbox"
    assert "has not programmed this node since boot" in err["msg"]
    assert str(ready) in err["details"]
    assert err["cniVersion"] == "1.0.0"
    assert 0.9 <= took < 3.0, f"waited {took:.2f}s for a 1 s waitSeconds"


def test_add_passes_once_the_agent_writes_the_ready_file(plugin: Path, tmp_path: Path) -> None:
    ready = tmp_path / "run" / "agent-ready"
    writer = threading.Timer(0.7, write_ready, args=(ready, read_boot_id()))
    writer.start()
    try:
        proc, took = _run(plugin, "ADD", _conf(ready, wait=5))
    finally:
        writer.cancel()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == PREV
    assert 0.6 <= took < 2.0, f"passed after {took:.2f}s; the file appeared after 0.7 s"


def test_add_refuses_to_be_the_first_plugin(plugin: Path, tmp_path: Path) -> None:
    ready = tmp_path / "agent-ready"
    write_ready(ready, read_boot_id())
    err = _error(_run(plugin, "ADD", _conf(ready, prev=None))[0])
    assert err["code"] == 7
    assert "chained" in err["msg"]


@pytest.mark.parametrize("command", ["DEL", "CHECK", "STATUS", "GC"])
def test_other_commands_never_wait(plugin: Path, tmp_path: Path, command: str) -> None:
    proc, took = _run(plugin, command, _conf(tmp_path / "missing", wait=20))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == b""
    assert took < 1.0


@pytest.mark.parametrize(
    "stdin",
    [b"", b"garbage", b"\x00\xff\xfe", b"[1,2,3]", b'{"cniVersion": 5}', b'{"cniVersion":'],
)
def test_garbage_input_gives_an_error_document(plugin: Path, stdin: bytes) -> None:
    proc, took = _run(plugin, "ADD", stdin)
    err = _error(proc)
    assert err["code"] in (1, 6, 7)
    assert b"panic" not in proc.stderr
    assert took < 1.0
    # A teardown succeeds whatever it is given.
    assert _run(plugin, "DEL", stdin)[0].returncode == 0


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (b'{"cniVersion": "9.9.9", "prevResult": {}}', 1),
        (b'{"cniVersion": "1.0.0", "waitSeconds": -1, "prevResult": {}}', 7),
        (b'{"cniVersion": "1.0.0", "waitSeconds": "20", "prevResult": {}}', 6),
        (b'{"cniVersion": "1.0.0", "prevResult": [1]}', 6),
    ],
)
def test_bad_configs_are_refused(plugin: Path, stdin: bytes, code: int) -> None:
    assert _error(_run(plugin, "ADD", stdin)[0])["code"] == code


def test_unknown_or_missing_command(plugin: Path) -> None:
    assert _error(_run(plugin, "FROB", b"{}")[0])["code"] == 4
    assert _error(_run(plugin, "", b"{}")[0])["code"] == 4
