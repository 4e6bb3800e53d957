"""A write-once record kept in one ConfigMap: read it, or create it if absent.

Used for decisions the whole cluster must share and that the first node to
need them takes (the transport). Creating is the only write: the API server
refuses a second create with 409 AlreadyExists, so among nodes racing to
record a value exactly one wins and the others read the winner's. The record
is never updated by us; an operator may edit or replace it.

Permissions this needs, and no more: `get` on the one ConfigMap (by
resourceName) and `create` on ConfigMaps in its namespace (create cannot be
limited by name).
"""

from __future__ import annotations

from collections.abc import Mapping

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from staticegress.k8s.client import REQUEST_TIMEOUT


class ConfigMapRecord:
    """The data of ConfigMap `namespace/name`."""

    def __init__(self, api: client.ApiClient, *, namespace: str, name: str) -> None:
        self._core = client.CoreV1Api(api)
        self.namespace = namespace
        self.name = name

    async def get(self) -> Mapping[str, str] | None:
        """The record's data; None when the ConfigMap does not exist."""
        try:
            cm = await self._core.read_namespaced_config_map(
                self.name, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {str(k): str(v) for k, v in (cm.data or {}).items()}

    async def create(self, data: Mapping[str, str]) -> bool:
        """Create the ConfigMap with `data`; False if it already exists."""
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "staticegress"},
            },
            "data": dict(data),
        }
        try:
            await self._core.create_namespaced_config_map(
                self.namespace, body, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True
