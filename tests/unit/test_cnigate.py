"""Installing and removing the CNI gate, on real files in temporary directories:
which conflist is edited, what is kept, the order of binary and config, and
what removal leaves behind; and the agent's hooks (with in-memory fakes for the
kernel): the gate goes in first, and opens only after a successful sync."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import stat
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from staticegress.agent.agent import Agent, AgentOptions
from staticegress.agent.sync import TemporaryError
from staticegress.cli.agent import _cni_gate, add_parser
from staticegress.dataplane import cnigate as g
from staticegress.dataplane.host import Uplink
from staticegress.dataplane.netlink import ApplyResult
from staticegress.dataplane.nft import NftError
from tests.unit.test_agent_sync import FakeNft

FLANNEL: dict[str, Any] = {
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
    "x-vendor": {"nested": [1, 2.5, "é", None]},
}
BINARY = b"\x7fELF pretend plugin\n"


@pytest.fixture
def cfg(tmp_path: Path) -> g.GateConfig:
    (tmp_path / "net.d").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "staticegress-gate").write_bytes(BINARY)
    return g.GateConfig(
        conf_dir=tmp_path / "net.d",
        bin_dir=tmp_path / "bin",
        binary=tmp_path / "image" / "staticegress-gate",
        ready_file=tmp_path / "run" / "agent-ready",
        wait_seconds=7,
    )


def _write(path: Path, doc: Any) -> bytes:
    data = (json.dumps(doc) if not isinstance(doc, str) else doc).encode()
    path.write_bytes(data)
    return data


def _plugins(path: Path) -> list[dict[str, Any]]:
    plugins: list[dict[str, Any]] = json.loads(path.read_bytes())["plugins"]
    return plugins


def test_install_appends_once_and_is_idempotent(cfg: g.GateConfig) -> None:
    conf = cfg.conf_dir / "10-flannel.conflist"
    _write(conf, FLANNEL)

    changed = g.install(cfg)
    assert changed == [f"installed {cfg.installed_binary}", f"appended {g.PLUGIN_TYPE} to {conf}"]
    after = conf.read_bytes()
    assert _plugins(conf)[-1] == {
        "type": "staticegress-gate",
        "readyFile": str(cfg.ready_file),
        "waitSeconds": 7,
    }
    assert g.install(cfg) == []
    assert g.install(cfg) == []
    assert conf.read_bytes() == after
    assert [p["type"] for p in _plugins(conf)] == ["flannel", "portmap", "staticegress-gate"]


def test_everything_else_is_kept(cfg: g.GateConfig) -> None:
    conf = cfg.conf_dir / "10-flannel.conflist"
    _write(conf, FLANNEL)
    conf.chmod(0o600)
    g.install(cfg)
    doc = json.loads(conf.read_bytes())
    assert doc["plugins"][:-1] == FLANNEL["plugins"]
    assert {k: v for k, v in doc.items() if k != "plugins"} == {
        k: v for k, v in FLANNEL.items() if k != "plugins"
    }
    assert list(doc) == list(FLANNEL), "key order kept"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert not [p.name for p in cfg.conf_dir.iterdir() if p.name.startswith(".")], "no temp left"


def test_only_the_lexically_first_config_file_is_edited(cfg: g.GateConfig) -> None:
    first = cfg.conf_dir / "05-cilium.conflist"
    second = cfg.conf_dir / "10-flannel.conflist"
    third = cfg.conf_dir / "99-loopback.json"
    not_cni = cfg.conf_dir / "00-notes.txt"
    (cfg.conf_dir / "01-dir.conf").mkdir()
    untouched = {
        second: _write(second, FLANNEL),
        third: _write(third, {"cniVersion": "1.0.0", "plugins": [{"type": "loopback"}]}),
        not_cni: _write(not_cni, "not json"),
    }
    _write(first, {"cniVersion": "1.0.0", "name": "cilium", "plugins": [{"type": "cilium-cni"}]})

    assert g.active_conflist(cfg.conf_dir) == first
    g.install(cfg)
    assert [p["type"] for p in _plugins(first)] == ["cilium-cni", "staticegress-gate"]
    for path, data in untouched.items():
        assert path.read_bytes() == data, path


def test_rewritten_conflist_gets_the_gate_again(cfg: g.GateConfig) -> None:
    conf = cfg.conf_dir / "10-flannel.conflist"
    original = _write(conf, FLANNEL)
    keeper = g.GateKeeper(cfg)
    assert keeper.check()
    assert _plugins(conf)[-1]["type"] == "staticegress-gate"

    # The CNI daemon restarts and writes its own file again (a new inode).
    tmp = cfg.conf_dir / "tmp-cni"
    tmp.write_bytes(original)
    os.replace(tmp, conf)
    assert keeper.check()
    assert [p["type"] for p in _plugins(conf)] == ["flannel", "portmap", "staticegress-gate"]

    # Or written over in place (the same inode).
    assert keeper.check()
    conf.write_bytes(original)
    assert keeper.check()
    assert _plugins(conf)[-1]["type"] == "staticegress-gate"

    # The binary removed behind our back comes back too.
    cfg.installed_binary.unlink()
    assert keeper.check()
    assert cfg.installed_binary.read_bytes() == BINARY


def test_a_symlinked_conflist_stays_a_symlink(cfg: g.GateConfig, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere" / "flannel.conflist"
    real.parent.mkdir()
    _write(real, FLANNEL)
    link = cfg.conf_dir / "10-flannel.conflist"
    link.symlink_to(real)
    g.install(cfg)
    assert link.is_symlink()
    assert _plugins(real)[-1]["type"] == "staticegress-gate"
    g.uninstall(cfg)
    assert link.is_symlink()
    assert json.loads(real.read_bytes()) == FLANNEL


def test_a_stale_or_misplaced_entry_is_replaced_by_one_at_the_end(cfg: g.GateConfig) -> None:
    conf = cfg.conf_dir / "10-flannel.conflist"
    old = {"type": "staticegress-gate", "readyFile": "/elsewhere", "waitSeconds": 1}
    _write(conf, {**FLANNEL, "plugins": [FLANNEL["plugins"][0], old, FLANNEL["plugins"][1]]})
    g.install(cfg)
    assert _plugins(conf) == [*FLANNEL["plugins"], cfg.entry()]


def test_removal_restores_the_plugin_list(cfg: g.GateConfig) -> None:
    conf = cfg.conf_dir / "10-flannel.conflist"
    other = cfg.conf_dir / "20-old.conflist"
    _write(conf, FLANNEL)
    # A conflist that was active once, and still names the gate.
    _write(other, {"cniVersion": "1.0.0", "plugins": [{"type": "ptp"}, cfg.entry()]})
    g.install(cfg)
    g.write_ready(cfg.ready_file, "boot-1")

    removed, errors = g.uninstall(cfg)
    assert errors == []
    assert removed == [
        f"removed staticegress-gate from {conf}",
        f"removed staticegress-gate from {other}",
        f"removed {cfg.installed_binary}",
        f"removed {cfg.ready_file}",
    ]
    assert json.loads(conf.read_bytes()) == FLANNEL
    assert _plugins(other) == [{"type": "ptp"}]
    assert not cfg.installed_binary.exists()
    assert not cfg.ready_file.exists()
    assert g.uninstall(cfg) == ([], []), "nothing left to remove"


def test_binary_before_config_and_config_before_binary_on_removal(
    cfg: g.GateConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = cfg.conf_dir / "10-flannel.conflist"
    _write(conf, FLANNEL)
    renames: list[str] = []
    real_replace = os.replace

    def record(src: Any, dst: Any) -> None:
        renames.append(Path(dst).name)
        real_replace(src, dst)

    unlinks: list[str] = []
    real_unlink = Path.unlink

    def record_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.exists():
            unlinks.append(self.name)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", record)
    g.install(cfg)
    assert renames == ["staticegress-gate", "10-flannel.conflist"]

    renames.clear()
    monkeypatch.setattr(Path, "unlink", record_unlink)
    g.uninstall(cfg)
    assert renames == ["10-flannel.conflist"]
    assert unlinks == ["staticegress-gate"]


def test_config_untouched_when_the_binary_cannot_be_installed(cfg: g.GateConfig) -> None:
    conf = cfg.conf_dir / "10-flannel.conflist"
    original = _write(conf, FLANNEL)

    # The bin dir is not a directory (root writes anywhere, so permissions would not do).
    cfg.bin_dir.rmdir()
    cfg.bin_dir.write_text("")
    with pytest.raises(g.GateError, match="bin dir"):
        g.install(cfg)
    assert conf.read_bytes() == original

    cfg.bin_dir.unlink()
    cfg.bin_dir.mkdir()
    cfg.binary.unlink()
    with pytest.raises(g.GateError, match="cannot read the gate binary"):
        g.install(cfg)
    assert conf.read_bytes() == original
    assert not cfg.installed_binary.exists()


def test_binary_replaced_when_different_with_mode_0755(cfg: g.GateConfig) -> None:
    cfg.installed_binary.write_bytes(b"an older plugin")
    old_inode = cfg.installed_binary.stat().st_ino
    assert g.install_binary(cfg)
    st = cfg.installed_binary.stat()
    assert cfg.installed_binary.read_bytes() == BINARY
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_ino != old_inode, "renamed into place, never written over a running binary"
    assert not g.install_binary(cfg)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("10-bridge.conf", {"cniVersion": "1.0.0", "type": "bridge"}, "single-plugin"),
        ("10-broken.conflist", '{"plugins": [', "not valid JSON"),
        ("10-list.conflist", "[1, 2]", "not a JSON object"),
        ("10-odd.conflist", {"plugins": "bridge"}, "not a CNI conflist"),
        ("10-gate.conflist", {"plugins": [{"type": "staticegress-gate"}]}, "no plugin to chain"),
    ],
)
def test_unsupported_configs_are_refused_and_left_alone(
    cfg: g.GateConfig, name: str, content: Any, match: str
) -> None:
    path = cfg.conf_dir / name
    original = _write(path, content)
    with pytest.raises(g.GateError, match=match):
        g.install(cfg)
    assert path.read_bytes() == original
    keeper = g.GateKeeper(cfg)
    assert not keeper.check()
    assert keeper.problem is not None
    assert match in keeper.problem


def test_keeper_waits_for_the_cni_config_and_reports_late(cfg: g.GateConfig) -> None:
    now = [0.0]
    reported: list[str] = []
    keeper = g.GateKeeper(cfg, on_problem=reported.append, waiting_grace=60.0, clock=lambda: now[0])
    assert not keeper.check()
    keeper.report()
    assert cfg.installed_binary.exists(), "the binary goes in before any config exists"
    assert keeper.problem is not None
    assert "waiting for the CNI" in keeper.problem
    now[0] = 30.0
    keeper.check()
    keeper.report()
    assert reported == [], "a new node's CNI takes a moment: no Event yet"
    now[0] = 61.0
    for _ in range(2):
        keeper.check()
        keeper.report()
    assert len(reported) == 1

    conf = cfg.conf_dir / "10-flannel.conflist"
    _write(conf, FLANNEL)
    assert keeper.check()
    assert keeper.problem is None
    assert _plugins(conf)[-1]["type"] == "staticegress-gate"


def test_keeper_reports_real_errors_at_once_and_once(cfg: g.GateConfig) -> None:
    reported: list[str] = []
    keeper = g.GateKeeper(cfg, on_problem=reported.append)
    _write(cfg.conf_dir / "10-bridge.conf", {"cniVersion": "1.0.0", "type": "bridge"})
    for _ in range(2):
        keeper.check()
        keeper.report()
    assert len(reported) == 1
    assert "single-plugin" in reported[0]
    # Another problem is another Event.
    (cfg.conf_dir / "10-bridge.conf").unlink()
    _write(cfg.conf_dir / "10-broken.conflist", "{")
    keeper.check()
    keeper.report()
    assert len(reported) == 2
    assert "not valid JSON" in reported[1]


def test_ready_file_holds_the_boot_id(cfg: g.GateConfig) -> None:
    boot = g.read_boot_id()
    assert len(boot) == 36
    assert boot.count("-") == 4
    g.write_ready(cfg.ready_file, boot)
    assert cfg.ready_file.read_text() == boot + "\n"
    g.write_ready(cfg.ready_file, "another")
    assert cfg.ready_file.read_text().strip() == "another"
    assert [p.name for p in cfg.ready_file.parent.iterdir()] == ["agent-ready"]


# ------------------------------------------------------------ agent hooks


class _RefusingOnceNft(FakeNft):
    """Records whether the ready file existed at each batch; refuses the first batch."""

    def __init__(self, ready: Path) -> None:
        super().__init__()
        self.ready = ready
        self.calls: list[tuple[bool, set[str], str]] = []

    async def apply(self, batch: dict[str, Any]) -> None:
        names = {
            c["add"]["table"]["name"] for c in batch["nftables"] if "table" in c.get("add", {})
        }
        self.calls.append((self.ready.exists(), names, json.dumps(batch)))
        if len(self.calls) == 1:
            raise NftError("refused")


class _Netlink:
    async def apply(self, spec: Any, *, phase: str) -> ApplyResult:
        return ApplyResult(errors=[])


def _agent(cfg: g.GateConfig, nft: Any) -> Agent:
    opts = AgentOptions(
        node="node-1", transport="direct", ownership="status-only", health_port=0, cni_gate=cfg
    )
    agent = Agent(client.ApiClient(), opts, nft=nft, netlink=_Netlink())
    agent.reflectors["nodes"].store["node-1"] = {
        "metadata": {"name": "node-1", "uid": "n-1"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.11"}]},
    }
    return agent


async def test_agent_opens_the_gate_only_after_its_first_successful_sync(
    cfg: g.GateConfig,
) -> None:
    nft = _RefusingOnceNft(cfg.ready_file)
    agent = _agent(cfg, nft)
    for r in agent.reflectors.values():
        r.synced.set()
    agent.uplink = Uplink("eth0", 1500, "02:00:00:00:00:01")
    agent.transport = "direct"
    agent.node_ip = IPv4Address("198.51.100.11")
    opener = asyncio.create_task(agent._open_cni_gate(cfg))
    try:
        await asyncio.sleep(0.05)
        assert not cfg.ready_file.exists()
        with pytest.raises(TemporaryError):
            await agent.sync(True)
        await asyncio.sleep(0.05)
        assert not cfg.ready_file.exists(), "a refused sync does not open the gate"
        await agent.sync(True)
        await asyncio.wait_for(opener, 5)
    finally:
        opener.cancel()
        await agent.api.close()
    assert cfg.ready_file.read_text().strip() == g.read_boot_id()
    # The table holding unknown pods was in the kernel before the file existed.
    ready_then, names, batch = nft.calls[-1]
    assert not ready_then
    assert "staticegress" in names
    assert "10.244.1.0" in batch, "the node's pod range is in the table"


async def test_agent_installs_the_gate_before_anything_else(cfg: g.GateConfig) -> None:
    conf = cfg.conf_dir / "10-flannel.conflist"
    _write(conf, FLANNEL)
    agent = _agent(cfg, _RefusingOnceNft(cfg.ready_file))
    # Nothing answers: the watches never list, so nothing else can happen.
    agent.api.configuration.host = "http://127.0.0.1:9"
    run = asyncio.create_task(agent.run())
    try:
        for _ in range(100):
            if conf.read_bytes() != json.dumps(FLANNEL).encode():
                break
            await asyncio.sleep(0.02)
        assert not any(r.synced.is_set() for r in agent.reflectors.values())
        assert cfg.installed_binary.read_bytes() == BINARY
        assert _plugins(conf)[-1] == cfg.entry()
        assert not cfg.ready_file.exists()
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        await agent.api.close()


def test_cli_wants_both_cni_dirs(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    both = parser.parse_args(
        ["agent", "--cni-conf-dir", str(tmp_path / "c"), "--cni-bin-dir", str(tmp_path / "b")]
    )
    gate = _cni_gate(both)
    assert gate == g.GateConfig(
        conf_dir=tmp_path / "c",
        bin_dir=tmp_path / "b",
        binary=Path("/opt/staticegress/cni/staticegress-gate"),
        ready_file=Path("/run/staticegress/agent-ready"),
        wait_seconds=20,
    )
    assert _cni_gate(parser.parse_args(["agent"])) is None
    with pytest.raises(ValueError, match="go together"):
        _cni_gate(parser.parse_args(["agent", "--cni-conf-dir", str(tmp_path)]))
