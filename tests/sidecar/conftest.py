"""Fixtures of the sidecar tests."""

from __future__ import annotations

import pathlib
import secrets
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A segment-name prefix private to this test; fails the test if any segment with it is left in
    /dev/shm. (Unlike the global no_shm_leak, other engineers' tests running at the same time on this
    machine cannot trip it.)"""
    prefix = f"gs-t{secrets.token_hex(3)}-"
    yield prefix
    leaked = sorted(p.name for p in pathlib.Path("/dev/shm").glob(prefix + "*"))
    assert not leaked, f"leaked shared memory segments: {leaked}"
