"""Backends under test. `GHOSTSERVE_TEST_BACKENDS=numpy,torch` forces a subset; by default every backend
that can run here is tested (cuda only with a GPU, marked `gpu` so it skips elsewhere)."""

from __future__ import annotations

import importlib.util
import os

import pytest


def _default_backends() -> list[str]:
    names = ["cpu", "numpy"]
    if importlib.util.find_spec("torch") is not None:
        names.append("torch")
    names.append("cuda")
    return names


def backends() -> list[str]:
    forced = os.environ.get("GHOSTSERVE_TEST_BACKENDS")
    return [b.strip() for b in forced.split(",") if b.strip()] if forced else _default_backends()


def backend_params() -> list[object]:
    return [pytest.param(b, marks=pytest.mark.gpu) if b == "cuda" else b for b in backends()]


@pytest.fixture(scope="session", params=backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name
