"""End-to-end fixtures: one real sidecar process per test module, fault-free reference runs."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest
import shm_leak
from e2e_support import CFG, options, requests
from ghostserve.engine import sidecar_process
from ghostserve.engine.reference import harness


@pytest.fixture(scope="module")
def workdir() -> Iterator[pathlib.Path]:
    d = pathlib.Path(tempfile.mkdtemp(prefix="gs-e2e-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def shm_prefix(workdir: pathlib.Path) -> str:
    """Pool segment names private to this module's sidecar: the leak check then sees only ours, not the
    segments of other suites running at the same time on the machine."""
    return f"gs-e2e{os.getpid():x}{workdir.name[-6:].lower()}"


@pytest.fixture(scope="module")
def sidecar(workdir: pathlib.Path, shm_prefix: str) -> Iterator[sidecar_process.SidecarProcess]:
    sc = sidecar_process.SidecarProcess(workdir / "sidecar", extra_args=("--shm-prefix", shm_prefix))
    sc.start()
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def baseline(
    sidecar: sidecar_process.SidecarProcess, workdir: pathlib.Path
) -> Callable[[int], harness.RunResult]:
    """Fault-free run for a TP size, run once per module (outputs and KV do not depend on the code)."""
    cache: dict[int, harness.RunResult] = {}

    def get(tp: int) -> harness.RunResult:
        if tp not in cache:
            cache[tp] = harness.run(
                CFG,
                options(tp),
                requests(),
                sidecar=sidecar,
                group=f"base-tp{tp}",
                workdir=workdir / f"base-tp{tp}",
            )
        return cache[tp]

    return get


@pytest.fixture
def no_shm_leak(shm_prefix: str) -> Iterator[None]:
    """tests/conftest.py's leak check narrowed to the segments of this module's sidecar."""
    with shm_leak.check(re.escape(shm_prefix) + r"-[0-9a-f]{16}"):
        yield
