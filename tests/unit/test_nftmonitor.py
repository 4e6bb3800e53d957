"""Which tables a batch leaves in place, as the nftables watchdog derives them."""

from __future__ import annotations

from typing import Any

from staticegress.dataplane.nftmonitor import tables_after, tables_touched


def _t(verb: str, family: str, name: str) -> dict[str, Any]:
    return {verb: {"table": {"family": family, "name": name}}}


def test_add_delete_add_leaves_the_table_and_later_commands_win() -> None:
    batch = {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            _t("add", "ip", "staticegress"),
            _t("delete", "ip", "staticegress"),
            _t("add", "ip", "staticegress"),
            {"add": {"chain": {"family": "ip", "table": "staticegress", "name": "c"}}},
            _t("add", "arp", "staticegress_lease"),
            _t("add", "ip", "gone"),
            _t("delete", "ip", "gone"),
        ]
    }
    assert tables_after(batch, set()) == {("ip", "staticegress"), ("arp", "staticegress_lease")}


def test_a_batch_without_table_commands_keeps_what_was_owned() -> None:
    owned = {("ip", "staticegress"), ("arp", "staticegress_lease")}
    renew = {
        "nftables": [
            {
                "add": {
                    "element": {
                        "family": "arp",
                        "table": "staticegress_lease",
                        "name": "granted",
                        "elem": ["192.0.2.7"],
                    }
                }
            }
        ]
    }
    assert tables_after(renew, owned) == owned
    assert tables_touched(renew) == {("arp", "staticegress_lease")}
    cleanup = {
        "nftables": [
            _t("add", "arp", "staticegress_lease"),
            _t("delete", "arp", "staticegress_lease"),
        ]
    }
    assert tables_after(cleanup, owned) == {("ip", "staticegress")}
