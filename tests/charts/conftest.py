"""Fixtures for the chart tests: the render script loaded as a module, default renders, the CRD and
its validator. Everything renders offline through helm-python-sdk."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType
from typing import Any

import crd_validator
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ghostserve"
CRD_FILE = CHART / "crds" / "ghostservedeployments.ghostserve.io.yaml"
SAMPLES = REPO / "manifests" / "samples"
BAD = pathlib.Path(__file__).resolve().parent / "bad"


def load_render_script() -> ModuleType:
    """scripts/render_manifests.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "render_manifests", REPO / "scripts" / "render_manifests.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_manifests", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def render_script() -> ModuleType:
    return load_render_script()


def objects(docs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [yaml.safe_load(doc) for _, doc in docs]


@pytest.fixture(scope="session")
def default_objects(render_script: ModuleType) -> list[dict[str, Any]]:
    """Every object of the default render, CRD included."""
    return objects(render_script.render())


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return loaded


@pytest.fixture(scope="session")
def validator(crd: dict[str, Any]) -> crd_validator.CRDValidator:
    return crd_validator.CRDValidator(crd, "v1alpha1")
