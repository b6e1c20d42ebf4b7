"""Backends under test. `GHOSTSERVE_TEST_BACKENDS=numpy,torch` forces a subset; by default every backend
that can run here is tested (cuda only with a GPU, marked `gpu` so it skips elsewhere)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
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


def to_backend(arr: np.ndarray, backend: str) -> object:
    """A copy of `arr` in the memory the backend works on (host numpy / torch CPU / cupy on the GPU)."""
    if backend == "cuda":
        import cupy  # type: ignore[import-not-found]

        return cupy.asarray(arr)
    if backend == "torch":
        import torch

        return torch.from_numpy(arr.copy())
    return arr.copy()


def to_host(buf: object) -> np.ndarray:
    """Raw bytes of any buffer as a flat uint8 numpy array."""
    module = type(buf).__module__.split(".")[0]
    if module == "cupy":
        return buf.reshape(-1).view("uint8").get()  # type: ignore[attr-defined,no-any-return]
    if module == "torch":
        import torch

        return buf.detach().cpu().reshape(-1).view(torch.uint8).numpy().copy()  # type: ignore[attr-defined,no-any-return]
    return np.asarray(buf).reshape(-1).view(np.uint8).copy()


def empty_like_backend(nbytes: int, backend: str, fill: int = 0xA5) -> object:
    return to_backend(np.full(nbytes, fill, dtype=np.uint8), backend)


@pytest.fixture(scope="session", params=backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name
