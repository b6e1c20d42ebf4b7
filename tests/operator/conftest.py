"""Fixtures of the operator tests: an emulated cluster with three 2-GPU nodes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.operator import harness


@pytest.fixture
def cluster() -> Iterator[harness.Cluster]:
    with harness.Cluster() as c:
        for i in range(3):
            c.write("create", harness.NODES, None, None, harness.node_object(f"n{i}", gpus=2))
        yield c
