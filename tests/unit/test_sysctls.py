"""Node settings written under a configurable /proc/sys root (the DaemonSet
mounts the node's /proc/sys/net at /host/proc/sys/net): writes, settings that
are read-only but already right, wrong ones reported, the record for uninstall."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from staticegress.dataplane.host import (
    _write_sysctl,
    prepare_sysctls,
    restore_sysctls,
    sysctl_fix,
)
from staticegress.dataplane.netns import NetnsRunner

READ_ONLY_SYSCTL = Path("/proc/sys/kernel/ostype")
"""Mode 0444 for everyone, root included (sysctl permissions ignore
CAP_DAC_OVERRIDE), and always "Linux": a real read-only setting to point at."""


def _fake_proc_sys(root: Path, uplink: str = "eth0.100") -> Path:
    for scope in ("all", "default", uplink, "lo"):
        d = root / "net" / "ipv4" / "conf" / scope
        d.mkdir(parents=True)
        for key in ("send_redirects", "accept_redirects", "rp_filter"):
            (d / key).write_text("1\n")
    (root / "net" / "ipv4" / "ip_forward").write_text("0\n")
    return root


def test_a_write_lands_under_the_given_root(tmp_path: Path) -> None:
    root = _fake_proc_sys(tmp_path)
    key = ("net", "ipv4", "conf", "all", "send_redirects")
    assert _write_sysctl(root, key, "0") is None
    assert (root / "net/ipv4/conf/all/send_redirects").read_text() == "0"


def test_a_dotted_interface_name_is_one_path_component(tmp_path: Path) -> None:
    root = _fake_proc_sys(tmp_path, uplink="eth0.100")
    key = ("net", "ipv4", "conf", "eth0.100", "send_redirects")
    assert _write_sysctl(root, key, "0") is None
    assert (root / "net/ipv4/conf/eth0.100/send_redirects").read_text() == "0"


def test_a_setting_this_kernel_lacks_is_skipped(tmp_path: Path) -> None:
    root = _fake_proc_sys(tmp_path)
    assert _write_sysctl(root, ("net", "ipv6", "conf", "x", "disable_ipv6"), "1") is None
    assert not (root / "net" / "ipv6").exists()


@pytest.mark.skipif(not READ_ONLY_SYSCTL.exists(), reason="needs Linux /proc")
def test_a_read_only_setting_that_already_holds_is_fine(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "ro").symlink_to(READ_ONLY_SYSCTL)
    with pytest.raises(PermissionError):
        READ_ONLY_SYSCTL.write_text("Linux")
    assert _write_sysctl(tmp_path, ("net", "ro"), "Linux") is None


@pytest.mark.skipif(not READ_ONLY_SYSCTL.exists(), reason="needs Linux /proc")
def test_a_read_only_setting_that_is_wrong_is_reported_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "ro").symlink_to(READ_ONLY_SYSCTL)
    problem = _write_sysctl(tmp_path, ("net", "ro"), "Plan9")
    assert problem is not None
    assert "net/ro to Plan9" in problem
    assert "it is Linux" in problem
    assert "Permission denied" in problem


def test_the_fix_names_the_mount_and_the_flag_root() -> None:
    fix = sysctl_fix(Path("/host/proc/sys"))
    assert "/proc/sys/net read-write at /host/proc/sys/net" in fix


def test_prepare_sets_everything_and_records_what_was_there(tmp_path: Path) -> None:
    root = _fake_proc_sys(tmp_path / "sys", uplink="eth0.100")
    record = tmp_path / "run" / "sysctls-before.json"
    runner = NetnsRunner()
    try:
        problems = asyncio.run(
            prepare_sysctls(runner, uplink="eth0.100", tunnel="lo", root=root, record=record)
        )
    finally:
        runner.close()
    assert problems == []
    conf = root / "net" / "ipv4" / "conf"
    for scope in ("all", "default", "eth0.100"):
        assert (conf / scope / "send_redirects").read_text() == "0"
        assert (conf / scope / "accept_redirects").read_text() == "0"
    assert (root / "net/ipv4/ip_forward").read_text() == "1"
    assert (conf / "lo" / "rp_filter").read_text() == "2"
    before = json.loads(record.read_text())
    assert before["net/ipv4/conf/eth0.100/send_redirects"] == "1"
    assert set(before) == {
        f"net/ipv4/conf/{s}/{k}"
        for s in ("all", "default", "eth0.100")
        for k in ("send_redirects", "accept_redirects")
    }, "only the redirect settings are put back (ip_forward stays on)"


def test_a_later_run_keeps_the_values_from_before_the_first(tmp_path: Path) -> None:
    root = _fake_proc_sys(tmp_path / "sys")
    record = tmp_path / "sysctls-before.json"
    runner = NetnsRunner()
    try:
        for _ in range(2):
            asyncio.run(
                prepare_sysctls(runner, uplink="eth0.100", tunnel=None, root=root, record=record)
            )
    finally:
        runner.close()
    assert json.loads(record.read_text())["net/ipv4/conf/all/send_redirects"] == "1"


def test_restore_puts_the_record_back_and_removes_it(tmp_path: Path) -> None:
    root = _fake_proc_sys(tmp_path / "sys")
    record = tmp_path / "sysctls-before.json"
    runner = NetnsRunner()
    try:
        asyncio.run(
            prepare_sysctls(runner, uplink="eth0.100", tunnel=None, root=root, record=record)
        )
    finally:
        runner.close()
    assert (root / "net/ipv4/conf/all/send_redirects").read_text() == "0"
    assert restore_sysctls(root=root, record=record) == []
    assert (root / "net/ipv4/conf/all/send_redirects").read_text() == "1"
    assert (root / "net/ipv4/conf/eth0.100/accept_redirects").read_text() == "1"
    assert (root / "net/ipv4/ip_forward").read_text() == "1", "ip_forward must stay on"
    assert not record.exists()
    assert restore_sysctls(root=root, record=record) == [], "nothing recorded: nothing to do"


def test_a_root_without_net_is_one_clear_problem(tmp_path: Path) -> None:
    runner = NetnsRunner()
    try:
        problems = asyncio.run(
            prepare_sysctls(runner, uplink="eth0", tunnel=None, root=tmp_path / "nothing")
        )
    finally:
        runner.close()
    assert len(problems) == 1
    assert "does not exist" in problems[0]
    assert "--proc-sys" in problems[0]
