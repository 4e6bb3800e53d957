"""Build kubernetes-asyncio API clients, and the timeouts every call must carry.

kubernetes-asyncio waits forever on a dead connection unless told otherwise,
so every request goes out with `REQUEST_TIMEOUT` and every watch with a server
side `timeout_seconds`.
"""

from __future__ import annotations

from pathlib import Path

from kubernetes_asyncio import client, config

REQUEST_TIMEOUT = 15.0
"""Seconds: client-side timeout of a single request."""


async def api_client(kubeconfig: Path | None = None) -> client.ApiClient:
    """A client from `kubeconfig`, or from the in-cluster service account when None."""
    if kubeconfig is None:
        config.load_incluster_config()
        return client.ApiClient()
    return await config.new_client_from_config(config_file=str(kubeconfig))
