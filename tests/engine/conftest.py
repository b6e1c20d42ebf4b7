"""Fixtures of the engine unit tests."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import shm_leak
from ghostserve.engine import sidecar_process


@pytest.fixture
def no_shm_leak() -> Iterator[None]:
    """tests/conftest.py's leak check narrowed to the segments a default sidecar creates (``gs-`` + 16
    hex digits): other suites name theirs with private prefixes and may run beside these."""
    with shm_leak.check(r"gs-[0-9a-f]{16}"):
        yield


@pytest.fixture
def sidecar() -> Iterator[sidecar_process.SidecarProcess]:
    """A real `ghostserve sidecar` process on a Unix socket in a fresh directory (default budget)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="gs-eng-", dir="/tmp"))
    sc = sidecar_process.SidecarProcess(d)
    sc.start()
    yield sc
    sc.stop()
    shutil.rmtree(d, ignore_errors=True)
