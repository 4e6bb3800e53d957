"""Which kernels filter conntrack dumps for us (staticegress.dataplane.conntrack)."""

from __future__ import annotations

import pytest

from staticegress.dataplane import conntrack


@pytest.mark.parametrize(
    ("release", "filters"),
    [
        ("6.18.44-fc-v1147", True),
        ("5.8.0", True),
        ("5.15.0-125-generic", True),
        ("5.4.0-150-generic", False),
        ("4.18.0-553.el8_10.x86_64", False),
        ("unknown", False),
    ],
)
def test_only_kernels_that_filter_dumps_get_one_dump_per_pod(
    release: str, filters: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older kernel ignores the filter, and a dump per pod would decode the
    whole table once per pod: there, one dump of the whole table."""
    monkeypatch.setattr(conntrack.platform, "release", lambda: release)
    conntrack._kernel_filters.cache_clear()
    try:
        assert conntrack._kernel_filters() is filters
    finally:
        conntrack._kernel_filters.cache_clear()
