"""Run a workload on the reference engine against a real sidecar and collect what tests compare."""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence

from ghostserve.engine import sidecar_process
from ghostserve.engine.reference import config as config_mod
from ghostserve.engine.reference import engine as engine_mod
from ghostserve.engine.reference import recovery


@dataclasses.dataclass
class RunResult:
    outputs: dict[str, list[int]]
    digests: dict[str, list[list[str]]]  # request -> per rank -> per chunk sha256
    recoveries: list[recovery.RecoveryReport]
    counters: engine_mod.Counters
    seconds: float
    rank_pids: list[int]  # every rank process this run started
    pool_names: list[str]  # every shared-memory segment the group's pools used (all freed by close)


def run(
    cfg: config_mod.ModelConfig,
    opts: engine_mod.Options,
    requests: Sequence[engine_mod.Request],
    *,
    sidecar: sidecar_process.SidecarProcess,
    group: str,
    workdir: pathlib.Path,
    faults: Sequence[engine_mod.Fault] = (),
    on_step: Callable[[engine_mod.ReferenceEngine], None] | None = None,
    prepare: Callable[[engine_mod.ReferenceEngine], None] | None = None,
) -> RunResult:
    """Serve ``requests`` (copied, so the caller's stay untouched) to completion, injecting ``faults``.

    ``prepare`` is called with the engine before it starts (tests set its fault hook there).
    Always stops the ranks and deletes the group (freeing its pools), even on error.
    """
    eng = engine_mod.ReferenceEngine(cfg, opts, sidecar=sidecar.address, group=group, workdir=workdir)
    if prepare is not None:
        prepare(eng)
    pids: list[int] = []
    pools: list[str] = []

    def note_pools() -> None:
        for r in eng.client.describe_group(group=group).ranks:
            if r.pool.shm_name and r.pool.shm_name not in pools:
                pools.append(r.pool.shm_name)

    t0 = time.perf_counter()
    try:
        eng.start()
        pids += eng.rank_pids
        note_pools()
        eng.on_recovered = lambda _report: note_pools()

        def track(e: engine_mod.ReferenceEngine) -> None:
            pids.extend(p for p in e.rank_pids if p not in pids)
            if on_step:
                on_step(e)

        for r in requests:
            eng.submit(copy.deepcopy(r))
        eng.inject(faults)
        eng.reset_clock()
        eng.run(on_step=track)
        seconds = time.perf_counter() - t0
        done = eng.finished
        return RunResult(
            outputs={k: r.output for k, r in done.items()},
            digests={k: r.digests or [] for k, r in done.items()},
            recoveries=list(eng.recoveries),
            counters=eng.counters,
            seconds=seconds,
            rank_pids=pids,
            pool_names=pools,
        )
    finally:
        eng.close()
