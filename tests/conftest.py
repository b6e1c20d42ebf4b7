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
    """``gpu`` tests are skipped without a CUDA GPU. ``slow`` tests (soaks, the long tail of the fault
    campaign) run only when asked for: `-m slow`, `-m "slow or not slow"`, or GHOSTSERVE_SLOW=1; CI
    (scripts/test.sh) runs the fast tier, which covers every path the slow tests cover."""
    slow_wanted = "slow" in (config.option.markexpr or "") or os.environ.get("GHOSTSERVE_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow or GHOSTSERVE_SLOW=1")
    skip_gpu = None if _has_gpu() else pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if not slow_wanted and item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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
