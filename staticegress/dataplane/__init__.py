"""Dataplane layer: applies rendered state to the kernel (nftables, routes, links)."""
