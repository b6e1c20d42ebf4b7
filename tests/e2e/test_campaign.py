"""Randomized fault campaign (tests/e2e/campaign.py): every run must finish every request with the
fault-free run's tokens and KV bytes, and leave no rank process and no pool segment behind.

The fast tier (30 runs: every code x kind once, plus 6) runs in CI; the other 186 of the 216 runs are
marked ``slow``. Set GHOSTSERVE_CAMPAIGN_LOG=<file> to append one JSON line per run (for the table in
docs/engine.md: `python tests/e2e/campaign_table.py <file>`).
"""

from __future__ import annotations

import json
import os
import time

import campaign
import pytest
from e2e_support import CFG, assert_no_live_ranks, assert_pools_freed
from ghostserve.engine.reference import engine, harness, workload

RUNS_PER = 9  # x 3 codes x 8 kinds = 216 runs
ALL = campaign.run_kinds(campaign.KINDS, RUNS_PER, seed0=0)
FAST = [r for r in ALL if r[0] == 0] + [r for r in ALL if r[0] == 1][:6]
SLOW = [r for r in ALL if r not in FAST]
STEPS = 3 + 24  # prefill pieces of a <= 40-token prompt at T = 16, then 24 decode steps


def _requests() -> list[engine.Request]:
    return workload.make_requests(2, prompt_tokens=40, new_tokens=24, vocab=CFG.vocab, seed=11)


def _options(code: str, tp: int) -> engine.Options:
    return engine.Options(
        tp=tp, code=code, chunk_tokens=16, page_size=16, pool_slots=512, record_digests=True
    )


@pytest.fixture(scope="module")
def fault_free(sidecar, workdir):
    cache: dict[int, harness.RunResult] = {}

    def get(tp: int) -> harness.RunResult:
        if tp not in cache:
            opts = _options("xor", tp)
            group, where = f"camp-base-{tp}", workdir / f"cb{tp}"
            cache[tp] = harness.run(CFG, opts, _requests(), sidecar=sidecar, group=group, workdir=where)
        return cache[tp]

    return get


def _run(seed: int, code: str, kind: str, sidecar, workdir, fault_free) -> None:
    sc = campaign.scenario(seed, code=code, kind=kind, steps=STEPS)
    base = fault_free(sc.tp)
    inj = campaign.Injector(sc, sidecar=sidecar)
    name = f"camp-{code}-{kind.replace('@', '-')}-{seed}"
    t0 = time.perf_counter()
    opts = _options(code, sc.tp)
    res = harness.run(
        CFG, opts, _requests(), sidecar=sidecar, group=name, workdir=workdir / name, prepare=inj.attach
    )
    wrong = sum(res.outputs.get(k) != v for k, v in base.outputs.items())
    record = {
        "seed": seed,
        "code": code,
        "kind": kind,
        "scenario": [sc.at_step, list(sc.first), list(sc.second)],
        "fired": inj.fired,
        "recoveries": len(res.recoveries),
        "wrong_requests": wrong,
        "lost_requests": len(base.outputs) - len(res.outputs),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if os.environ.get("GHOSTSERVE_CAMPAIGN_LOG"):
        with open(os.environ["GHOSTSERVE_CAMPAIGN_LOG"], "a") as f:
            f.write(json.dumps(record) + "\n")
    assert inj.fired, f"no fault fired: {record}"
    assert res.outputs == base.outputs, record
    assert res.digests == base.digests, record
    if "process" in kind or "device" in kind:
        assert res.recoveries, record
    assert_no_live_ranks(res.rank_pids)
    assert_pools_freed(res.pool_names)


@pytest.mark.parametrize("seed, code, kind", FAST)
def test_campaign_fast(seed, code, kind, sidecar, workdir, fault_free, no_shm_leak):
    _run(seed, code, kind, sidecar, workdir, fault_free)


@pytest.mark.slow
@pytest.mark.parametrize("seed, code, kind", SLOW)
def test_campaign_slow(seed, code, kind, sidecar, workdir, fault_free, no_shm_leak):
    _run(seed, code, kind, sidecar, workdir, fault_free)


def test_scenarios_never_lose_more_than_m_ranks():
    for seed, code, kind in ALL:
        sc = campaign.scenario(seed, code=code, kind=kind, steps=STEPS)
        lost_first = set(sc.first) if kind != "process@step" and kind != "process@finish" else set()
        lost_second = set(sc.second) if kind == "device@replay" else set()
        assert len(lost_first | lost_second) <= sc.m, sc
        assert 2 <= sc.at_step < STEPS - 1
    assert len(ALL) >= 200 and len(FAST) >= 30 and len(set(ALL)) == len(ALL)
