"""Shared test fixtures: tiers, temporary sockets and leak checks."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest
import shm_leak

REPO = pathlib.Path(__file__).resolve().parent.parent


def _has_gpu() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """A short directory path: Unix socket paths are limited to ~107 bytes."""
    import tempfile

    d = pathlib.Path(tempfile.mkdtemp(prefix="gs-", dir="/tmp"))
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() else p.rmdir()
    d.rmdir()


@pytest.fixture
def no_shm_leak() -> Iterator[None]:
    """Fails the test if it leaves new ghostserve segments in /dev/shm."""
    with shm_leak.check():
        yield


os.environ.setdefault("GHOSTSERVE_LOG_LEVEL", "WARNING")
