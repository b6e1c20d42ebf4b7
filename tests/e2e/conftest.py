"""End-to-end fixtures: one real sidecar process per test module, fault-free reference runs."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

from ghostserve.engine import sidecar_process
from ghostserve.engine.reference import config, engine, harness, workload

CFG = config.ModelConfig()
CHUNK = 16


def requests(n: int = 3, prompt: int = 70, new: int = 40) -> list[engine.Request]:
    return workload.make_requests(n, prompt_tokens=prompt, new_tokens=new, vocab=CFG.vocab, seed=7)


def options(tp: int, code: str = "xor", **kw: object) -> engine.Options:
    return engine.Options(tp=tp, code=code, chunk_tokens=CHUNK, page_size=CHUNK, record_digests=True, **kw)


@pytest.fixture(scope="module")
def workdir() -> Iterator[pathlib.Path]:
    d = pathlib.Path(tempfile.mkdtemp(prefix="gs-e2e-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sidecar(workdir: pathlib.Path) -> Iterator[sidecar_process.SidecarProcess]:
    sc = sidecar_process.SidecarProcess(workdir / "sidecar")
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
            cache[tp] = harness.run(CFG, options(tp), requests(), sidecar=sidecar, group=f"base-tp{tp}",
                                    workdir=workdir / f"base-tp{tp}")
        return cache[tp]

    return get


def assert_no_live_ranks(pids: list[int]) -> None:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert not alive, f"rank processes still alive: {alive}"
