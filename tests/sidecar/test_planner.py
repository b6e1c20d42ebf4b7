"""Hybrid-recovery planner: table-driven cases and a brute-force check (hypothesis)."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
from ghostserve.sidecar import planner
from hypothesis import given, settings
from hypothesis import strategies as st

T = 16


def cal(per_token: float = 1e-3, per_pair: float = 0.0, bw: float = 1e6) -> planner.Calibration:
    return planner.Calibration(per_token_s=per_token, per_token_pair_s=per_pair, rebuild_bytes_per_s=bw)


@pytest.mark.parametrize(
    ("chunks", "unprotected", "calibration", "chunk_bytes", "expected_r"),
    [
        # Rebuild is free: recompute nothing.
        (10, (), cal(bw=math.inf), 1000, 0),
        # Recompute is unknown (infinitely slow): rebuild everything.
        (10, (), planner.Calibration.from_prefill_speed(0, 1e6), 1000, 0),
        # Rebuild of a chunk (1 s) costs as much as recomputing it (16 ms * ... = 1 s): split 5/5.
        (10, (), cal(per_token=1 / T), 1_000_000, 5),
        # Rebuild 3x slower than recompute: recompute 3 of 4 chunks per group.
        (8, (), cal(per_token=1 / T), 3_000_000, 6),
        # Rebuild 1000x faster: r = 0.
        (8, (), cal(per_token=1 / T), 1_000, 0),
        # No chunks committed.
        (0, (), cal(), 1000, 0),
        # Chunk 6 of 8 unprotected: r = 5, 6, 7 all take 7 s (5|6 + 1, 6|3 + 1, 7|3); ties take the smallest.
        (8, (6,), cal(per_token=1 / T), 3_000_000, 5),
        # Chunk 1 of 8 unprotected, rebuild slow: r = 6 as without it (chunk 1 is recomputed anyway).
        (8, (1,), cal(per_token=1 / T), 3_000_000, 6),
    ],
)
def test_table(chunks, unprotected, calibration, chunk_bytes, expected_r):
    ledger = planner.RequestLedger("a", chunks, frozenset(unprotected))
    r, seconds = planner.choose_recompute_chunks(
        ledger, chunk_tokens=T, rebuild_chunk_bytes=chunk_bytes, calibration=calibration
    )
    assert r == expected_r
    assert seconds == planner.request_cost(
        ledger, r, chunk_tokens=T, rebuild_chunk_bytes=chunk_bytes, calibration=calibration
    )


def test_position_dependent_cost_recomputes_fewer_chunks():
    flat = cal(per_token=1 / T)
    rising = cal(per_token=1 / T, per_pair=1e-4)
    ledger = planner.RequestLedger("a", 40)
    r_flat, _ = planner.choose_recompute_chunks(
        ledger, chunk_tokens=T, rebuild_chunk_bytes=10**6, calibration=flat
    )
    r_rising, _ = planner.choose_recompute_chunks(
        ledger, chunk_tokens=T, rebuild_chunk_bytes=10**6, calibration=rising
    )
    assert r_rising < r_flat


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 40),
    unprotected=st.sets(st.integers(0, 39), max_size=6),
    tail=st.integers(0, 3 * T),
    per_token=st.floats(1e-6, 1e-2),
    per_pair=st.floats(0, 1e-5),
    bw=st.floats(1e3, 1e9),
    chunk_bytes=st.integers(0, 10**6),
)
def test_matches_brute_force(n, unprotected, tail, per_token, per_pair, bw, chunk_bytes):
    ledger = planner.RequestLedger("x", n, frozenset(c for c in unprotected if c < n), tail)
    c = cal(per_token, per_pair, bw)
    r, seconds = planner.choose_recompute_chunks(
        ledger, chunk_tokens=T, rebuild_chunk_bytes=chunk_bytes, calibration=c
    )
    costs = [
        planner.request_cost(ledger, k, chunk_tokens=T, rebuild_chunk_bytes=chunk_bytes, calibration=c)
        for k in range(n + 1)
    ]
    best = min(costs)
    assert math.isclose(seconds, best, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(costs[r], best, rel_tol=1e-9, abs_tol=1e-12)
    # Ties (up to the rounding of two summation orders) go to the smallest r.
    assert all(v > costs[r] for v in costs[:r])


def test_plan_group_codes_and_losses():
    ledgers = [planner.RequestLedger("a", 6, frozenset({5}), tail_tokens=3), planner.RequestLedger("b", 2)]
    kw: dict[str, Any] = {"world_size": 4, "chunk_tokens": T, "shard_bytes": 10**6}
    kw["calibration"] = cal(per_token=1 / T)
    plan = planner.plan_group(ledgers, lost_ranks=[2], parity_shards=1, code="xor", **kw)
    a = plan.requests[0]
    assert a.recompute_chunks + len(a.rebuild_chunks) + len(a.unprotected_chunks) == 6
    assert all(c >= a.recompute_chunks for c in a.rebuild_chunks)
    assert 5 not in a.rebuild_chunks and a.tail_tokens == 3
    # Two losses with one parity shard, and code none: recompute everything.
    for lost, code in (([1, 2], "xor"), ([1], "none")):
        plan = planner.plan_group(ledgers, lost_ranks=lost, parity_shards=1, code=code, **kw)
        assert [p.recompute_chunks for p in plan.requests] == [6, 2]
        assert all(p.rebuild_chunks == () for p in plan.requests)
    # rs with M=2 covers two losses; replicate covers any.
    for lost, code, m in (([1, 2], "rs", 2), ([0, 1, 2], "replicate", 0)):
        plan = planner.plan_group(
            ledgers,
            lost_ranks=lost,
            parity_shards=m,
            code=code,
            **{**kw, "calibration": cal(per_token=1 / T, bw=1e8)},
        )
        assert [p.recompute_chunks for p in plan.requests] == [0, 0]
        assert plan.requests[1].rebuild_chunks == (0, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lost_ranks=[], world_size=4),
        dict(lost_ranks=[4], world_size=4),
        dict(lost_ranks=[0], world_size=4, chunk_tokens=0),
    ],
)
def test_plan_group_rejects_bad_input(kwargs):
    base: dict[str, Any] = dict(parity_shards=1, chunk_tokens=T, shard_bytes=1, calibration=cal())
    base.update(kwargs)
    with pytest.raises(planner.PlanError):
        planner.plan_group([planner.RequestLedger("a", 2)], **base)


def test_rejects_out_of_range_unprotected_and_negative_rates():
    with pytest.raises(planner.PlanError):
        planner.choose_recompute_chunks(
            planner.RequestLedger("a", 2, frozenset({2})),
            chunk_tokens=T,
            rebuild_chunk_bytes=1,
            calibration=cal(),
        )
    with pytest.raises(planner.PlanError):
        cal(bw=-1.0)


def test_fit_recovers_coefficients():
    true = cal(per_token=2e-5, per_pair=3e-9)
    samples = [(p, 64, true.prefill_seconds(p, 64)) for p in (0, 512, 2048, 8192)]
    fitted = planner.Calibration.fit(samples, rebuild_bytes_per_s=1e9)
    assert math.isclose(fitted.per_token_s, 2e-5, rel_tol=1e-6)
    assert math.isclose(fitted.per_token_pair_s, 3e-9, rel_tol=1e-6)
    one_position = planner.Calibration.fit([(0, 64, 0.064)], rebuild_bytes_per_s=1e9)
    assert math.isclose(one_position.per_token_s, 1e-3) and one_position.per_token_pair_s == 0


def test_planner_is_import_light():
    code = "import sys, ghostserve.sidecar.planner; print({'torch', 'numpy', 'grpc'} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"
