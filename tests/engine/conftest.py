"""Fixtures of the engine unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import shm_leak


@pytest.fixture
def no_shm_leak() -> Iterator[None]:
    """tests/conftest.py's leak check narrowed to the segments a default sidecar creates (``gs-`` + 16
    hex digits): other suites name theirs with private prefixes and may run beside these."""
    with shm_leak.check(r"gs-[0-9a-f]{16}"):
        yield
