"""Shared pieces of the chart tests: paths, the render script loaded as a module, value variants.
(A uniquely named module rather than conftest imports, which clash across test folders.)"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ghostserve"
CRD_FILE = CHART / "crds" / "ghostservedeployments.ghostserve.io.yaml"
SAMPLES = REPO / "manifests" / "samples"
BAD = pathlib.Path(__file__).resolve().parent / "bad"


def load_render_script() -> ModuleType:
    """scripts/render_manifests.py as a module (scripts/ is not a package)."""
    path = REPO / "scripts" / "render_manifests.py"
    spec = importlib.util.spec_from_file_location("render_manifests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_manifests", module)
    spec.loader.exec_module(module)
    return module


def objects(docs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The parsed objects of render()'s (source, document) pairs."""
    return [yaml.safe_load(doc) for _, doc in docs]


# Non-default values that switch on every optional branch of the templates.
VARIANTS: dict[str, dict[str, Any]] = {
    "namespaced": {"operator": {"watchNamespaces": ["llm", "llm-staging"]}},
    "tls-spill-extras": {
        "tls": {"mode": "secret"},
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "inference"},
        "operator": {
            "extraArgs": ["--resync-seconds=15"],
            "firstPassLimit": 16,
            "verbose": True,
            "gpuConditions": ["GpuXidError", "NVSentinelGpuUnhealthy"],
            "extraEnv": [{"name": "A", "value": "1"}],
            "priorityClassName": "high",
            "podAnnotations": {"a": "b"},
            "nodeSelector": {"role": "control"},
            "tolerations": [{"key": "role", "operator": "Exists"}],
            "affinity": {"podAntiAffinity": {}},
        },
        "sidecar": {
            "spillDir": "/var/lib/ghostserve-spill",
            "extraArgs": ["--encode-workers=4"],
            "keepPools": False,
            "priorityClassName": "system-node-critical",
            "runtimeClassName": "",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
        },
        "metrics": {"annotations": {"prometheus.io/scrape": "true"}},
    },
    "insecure": {"tls": {"mode": "insecure"}},
    "minimal": {
        "sidecar": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "metrics": {"service": False},
    },
}
