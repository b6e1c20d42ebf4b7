"""Shared pieces of the end-to-end tests (a module, not conftest: `from conftest import` is ambiguous
when several test folders have one)."""

from __future__ import annotations

import os
import pathlib
from typing import Any

from ghostserve.engine.reference import config, engine, workload

CFG = config.ModelConfig()
CHUNK = 16


def requests(n: int = 3, prompt: int = 70, new: int = 40) -> list[engine.Request]:
    return workload.make_requests(n, prompt_tokens=prompt, new_tokens=new, vocab=CFG.vocab, seed=7)


def options(tp: int, code: str = "xor", **kw: Any) -> engine.Options:
    return engine.Options(tp=tp, code=code, chunk_tokens=CHUNK, page_size=CHUNK, record_digests=True, **kw)


def assert_pools_freed(names: list[str]) -> None:
    assert names, "the run recorded no pools"
    left = [n for n in names if (pathlib.Path("/dev/shm") / n).exists()]
    assert not left, f"pool segments left in /dev/shm: {left}"


def assert_no_live_ranks(pids: list[int]) -> None:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert not alive, f"rank processes still alive: {alive}"
