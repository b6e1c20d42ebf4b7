#!/usr/bin/env python3
"""Render charts/ghostserve with its default values into manifests/ghostserve.yaml (CRD included).

The chart is the single source; this file is a checked copy for `kubectl apply` users. A test
(tests/charts/test_manifests.py) fails when the two drift. Rendering is offline through
helm-python-sdk (Helm's Go SDK over ctypes): no cluster, no network, no helm binary.

    python scripts/render_manifests.py           # rewrite manifests/ghostserve.yaml
    python scripts/render_manifests.py --check   # exit 1 if it is stale, touching nothing
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from typing import Any

import helm_python
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "ghostserve"
OUTPUT = REPO / "manifests" / "ghostserve.yaml"
RELEASE = "ghostserve"
NAMESPACE = "ghostserve-system"

# Helm's install order (pkg/release/v1/util/kind_sorter.go), so that `kubectl apply -f` of the file
# creates objects in the order `helm install` would.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodDisruptionBudget",
    "ServiceAccount", "Secret", "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service",
    "DaemonSet", "Pod", "ReplicaSet", "Deployment", "StatefulSet", "Job", "CronJob",
]  # fmt: skip

_DOC_SPLIT = re.compile(r"^---[ \t]*$", re.MULTILINE)


def split_documents(text: str) -> list[str]:
    """The non-empty YAML documents of a multi-document string, stripped of surrounding blank lines."""
    docs = (doc.strip("\n") for doc in _DOC_SPLIT.split(text))
    return [doc for doc in docs if yaml.safe_load(doc) is not None]


def render(
    values: dict[str, Any] | None = None,
    *,
    chart: pathlib.Path = CHART,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[tuple[str, str]]:
    """Render the chart offline into (source file, YAML document) pairs: CRDs first, then templates in
    Helm's install order (by kind, then name). Mutates nothing.

    Raises helm_python.HelmRenderError (a template failed, e.g. a bad memory quantity) or
    helm_python.HelmValuesError (malformed values)."""
    with helm_python.Chart.load(chart) as loaded:
        crds = [(crd["filename"], crd["data"]) for crd in loaded.crds]
        templates = loaded.render(values, name=release, namespace=namespace, is_install=True)
    docs = [(source, doc) for source, data in crds for doc in split_documents(data)]
    rendered = [
        (source, doc)
        for source, data in sorted(templates.items())
        if source.endswith((".yaml", ".yml"))
        for doc in split_documents(data)
    ]
    return docs + sorted(rendered, key=_install_key)


def _install_key(item: tuple[str, str]) -> tuple[int, str, str]:
    obj = yaml.safe_load(item[1])
    kind = obj.get("kind", "")
    rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
    return rank, kind, obj.get("metadata", {}).get("name", "")


def manifest_text(docs: list[tuple[str, str]], *, version: str) -> str:
    """The single-file manifest: a header, then each document under a `# Source:` line, as `helm template`."""
    header = (
        f"# GhostServe {version}, rendered from charts/ghostserve with default values by\n"
        "# scripts/render_manifests.py. Do not edit: change the chart and re-run the script.\n"
        "# Needs cert-manager (its Issuer/Certificate kinds issue the mTLS Secrets; docs/kubernetes.md).\n"
        f"# Install: kubectl create namespace {NAMESPACE}\n"
        "#          kubectl apply --server-side -f manifests/ghostserve.yaml\n"
    )
    body = "".join(f"---\n# Source: {source}\n{doc}\n" for source, doc in docs)
    return header + body


def chart_version(chart: pathlib.Path = CHART) -> str:
    with helm_python.Chart.load(chart) as loaded:
        return loaded.version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale; write nothing")
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT, help="where to write")
    args = parser.parse_args(argv)
    docs = render()
    text = manifest_text(docs, version=chart_version())
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python scripts/render_manifests.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(docs)} objects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
