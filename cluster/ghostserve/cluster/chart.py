"""The chart's objects the embedded cluster applies: the CRD (as `helm template` renders it) and samples.

Rendering is offline through helm-python-sdk, like scripts/render_manifests.py and tests/charts.
A CRD applied to the API emulator declares its resource there, as a real API server starts serving
a custom resource once its definition is created.
"""

from __future__ import annotations

import pathlib
from typing import Any

import kmock
import yaml

REPO = pathlib.Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "ghostserve"
SAMPLES = REPO / "manifests" / "samples"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"


class ChartError(RuntimeError):
    """The chart could not be rendered (missing checkout, template error)."""


def crds(chart: pathlib.Path = CHART) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions the chart installs. Raises ChartError."""
    try:
        import helm_python
    except ImportError as exc:  # the `cluster` extra is not installed
        raise ChartError("helm-python-sdk is missing: pip install 'ghostserve[cluster]'") from exc
    if not (chart / "Chart.yaml").exists():
        raise ChartError(f"no chart at {chart} (the embedded cluster runs from a source checkout)")
    try:
        with helm_python.Chart.load(chart) as loaded:
            docs = [doc for crd in loaded.crds for doc in yaml.safe_load_all(crd["data"])]
    except Exception as exc:  # helm_python raises its own error types from the Go side
        raise ChartError(f"cannot render {chart}: {exc}") from exc
    return [d for d in docs if d and d.get("kind") == "CustomResourceDefinition"]


def resource_infos(crd: dict[str, Any]) -> dict[str, kmock.ResourceInfo]:
    """kmock declarations ("group/version/plural" -> info) of every served version of a CRD."""
    spec = crd["spec"]
    names = spec["names"]
    out = {}
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        out[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
            kind=names["kind"],
            singular=names.get("singular", names["kind"].lower()),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            shortnames=list(names.get("shortNames") or []),
            categories=list(names.get("categories") or []),
            subresources=sorted((version.get("subresources") or {}).keys()),
            verbs=["list", "watch", "get", "create", "delete", "patch", "update"],
        )
    return out


def samples(directory: pathlib.Path = SAMPLES) -> list[pathlib.Path]:
    return sorted(directory.glob("*.yaml"))
