"""Render layer: pure translation of desired state into nftables JSON and netlink specs."""
