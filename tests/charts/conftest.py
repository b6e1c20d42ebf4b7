"""Fixtures for the chart tests: the render script, default renders, the CRD and its validator.
Everything renders offline through helm-python-sdk."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import chart_support
import crd_validator
import pytest
import yaml


@pytest.fixture(scope="session")
def render_script() -> ModuleType:
    return chart_support.load_render_script()


@pytest.fixture(scope="session")
def default_objects(render_script: ModuleType) -> list[dict[str, Any]]:
    """Every object of the default render, CRD included."""
    return chart_support.objects(render_script.render())


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(chart_support.CRD_FILE.read_text())
    return loaded


@pytest.fixture(scope="session")
def validator(crd: dict[str, Any]) -> crd_validator.CRDValidator:
    return crd_validator.CRDValidator(crd, "v1alpha1")
