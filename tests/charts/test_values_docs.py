"""Every values.yaml key is commented and documented, and docs/kubernetes.md covers every CRD field
and printer column."""

from __future__ import annotations

import re
from typing import Any

import chart_support
import yaml

DOCS = (chart_support.REPO / "docs" / "kubernetes.md").read_text()
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][\w.-]*):")


def _documented_keys() -> list[tuple[str, bool]]:
    """(dotted path, has a comment right above it) for every key of the top two levels of values.yaml;
    deeper keys are default data (resources, probe timings) described by their parent."""
    found: list[tuple[str, bool]] = []
    path: list[str] = []
    commented = False
    for line in (chart_support.CHART / "values.yaml").read_text().splitlines():
        if line.lstrip().startswith("#"):
            commented = True
            continue
        match = _KEY.match(line)
        if match and len(match["indent"]) <= 2:
            depth = len(match["indent"]) // 2
            path = [*path[:depth], match["key"]]
            found.append((".".join(path), commented))
        commented = False
    return found


def test_every_values_key_has_a_comment() -> None:
    keys = _documented_keys()
    assert len(keys) > 50
    assert [key for key, commented in keys if not commented] == []


def test_every_values_key_is_in_the_docs() -> None:
    values = yaml.safe_load((chart_support.CHART / "values.yaml").read_text())
    leaves = [key for key, _ in _documented_keys() if not _is_section(values, key)]
    assert [key for key in leaves if f"`{key}`" not in DOCS] == []


def _is_section(values: dict[str, Any], key: str) -> bool:
    """A top-level key whose children are documented one by one (image, tls, operator, ...)."""
    return "." not in key and isinstance(values[key], dict) and key != "commonLabels"


def test_every_crd_field_and_column_is_in_the_docs(crd: dict[str, Any]) -> None:
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    fields = [
        f"spec.{group}.{name}" if name else f"spec.{group}"
        for group, node in spec.items()
        for name in node.get("properties") or [""]  # a group without properties was removed: name it
    ]
    status = [
        f"status.{name}"
        for name in version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    ]
    missing = [f for f in fields + status if f"`{f}`" not in DOCS]
    assert missing == []
    for column in version["additionalPrinterColumns"]:
        assert f"| {column['name']} | `{column['jsonPath']}` |" in DOCS
    for rule in version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["protection"][
        "x-kubernetes-validations"
    ]:
        assert rule["message"] in DOCS
