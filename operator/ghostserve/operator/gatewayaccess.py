"""The resume gateway's own API identity: one ServiceAccount `<gsd>-gateway` per deployment, bound in
the deployment's namespace to the chart's gateway ClusterRole (pods list, nothing else), so the
gateway never runs with the namespace's default ServiceAccount. Both objects are owned by the
deployment (ownerReferences): the garbage collector removes them with it, and an object of that name
someone else made is reported (kube.NotOwned), never adopted. Pure builders; docs/security.md.
"""

from __future__ import annotations

from typing import Any

from ghostserve.operator import specs

RBAC_GROUP = "rbac.authorization.k8s.io"


def account_name(name: str) -> str:
    return f"{name}-gateway"


def _labels(name: str) -> dict[str, str]:
    return {
        specs.APP_LABEL: specs.APP_VALUE,
        specs.DEPLOYMENT_LABEL: name,
        "app.kubernetes.io/component": specs.GATEWAY_COMPONENT,
    }


def build_service_account(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": account_name(name), "namespace": namespace, "labels": _labels(name)},
    }


def build_role_binding(namespace: str, name: str, cluster_role: str) -> dict[str, Any]:
    """Binds the deployment's gateway account to `cluster_role` in this namespace only."""
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": account_name(name), "namespace": namespace, "labels": _labels(name)},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "ServiceAccount", "name": account_name(name), "namespace": namespace}],
    }
