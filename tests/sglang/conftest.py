"""Fixtures of the sglang plugin tests (helpers live in sgl_procs.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sgl_procs


@pytest.fixture
def sidecar() -> Iterator[sgl_procs.Sidecar]:
    """A real `ghostserve sidecar` process on a Unix socket; checks it leaves no pool segment behind."""
    with sgl_procs.run_sidecar() as sc:
        yield sc
