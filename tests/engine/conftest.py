"""Fixtures of the engine unit tests."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import pytest


@pytest.fixture
def no_shm_leak() -> Iterator[None]:
    """tests/conftest.py's leak check for the segments a default sidecar creates (``gs-`` + 16 hex
    digits): other suites name theirs with private prefixes (gs-t…, gs-sgl…), check them themselves,
    and may run beside these on a shared machine."""
    shm = pathlib.Path("/dev/shm")

    def ours() -> set[str]:
        return {p.name for p in shm.glob("gs-*") if re.fullmatch(r"gs-[0-9a-f]{16}", p.name)}

    before = ours()
    yield None
    leaked = ours() - before
    assert not leaked, f"leaked shared memory segments: {sorted(leaked)}"
