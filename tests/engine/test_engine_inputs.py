"""Bad input to the reference engine, workloads and the demo gets a clear error and changes nothing."""

from __future__ import annotations

import pathlib

import pytest
from ghostserve.engine import demo
from ghostserve.engine.reference import config, engine, recovery, workload

CFG = config.ModelConfig()


def _engine(tmp_path: pathlib.Path) -> engine.ReferenceEngine:
    # No sidecar is contacted until start(): gRPC channels connect lazily.
    opts = engine.Options(tp=2, chunk_tokens=16, page_size=16, pool_slots=256)
    return engine.ReferenceEngine(CFG, opts, sidecar="unix:///nonexistent.sock", group="g", workdir=tmp_path)


def test_submit_rejects_bad_requests(tmp_path):
    eng = _engine(tmp_path)
    eng.submit(engine.Request("a", [1, 2, 3], 4))
    bad = [
        engine.Request("a", [1], 1),  # duplicate id
        engine.Request("b", [CFG.vocab], 1),  # token outside the vocabulary
        engine.Request("c", [1] * 250, 10),  # more slots than the pool has
    ]
    for req in bad:
        with pytest.raises(engine.EngineError):
            eng.submit(req)
    assert list(eng.requests) == ["a"]
    with pytest.raises(engine.EngineError):
        engine.Request("d", [], 4)
    with pytest.raises(engine.EngineError):
        engine.Request("d", [1], 0)
    eng.client.close()


def test_fault_validation():
    with pytest.raises(engine.EngineError):
        engine.Fault(3, "network", (1,))
    with pytest.raises(engine.EngineError):
        engine.Fault(3, "device", ())
    assert engine.Fault(3, "device", (0, 1)).flush


def test_tp_split_checked_before_anything_starts(tmp_path):
    with pytest.raises(config.ConfigError):
        engine.ReferenceEngine(
            CFG, engine.Options(tp=3), sidecar="unix:///x.sock", group="g", workdir=tmp_path
        )


def test_workload_is_seeded_and_poisson_arrivals_increase():
    a = workload.make_requests(5, prompt_tokens=40, new_tokens=4, vocab=100, seed=3, rate_per_s=10.0)
    b = workload.make_requests(5, prompt_tokens=40, new_tokens=4, vocab=100, seed=3, rate_per_s=10.0)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    arrivals = [r.arrival_s for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert all(30 <= len(r.prompt) <= 40 for r in a)
    exact = workload.make_requests(3, prompt_tokens=40, new_tokens=4, vocab=100, jitter=0)
    assert [len(r.prompt) for r in exact] == [40, 40, 40] and {r.arrival_s for r in exact} == {0.0}


def test_merge_spans():
    assert recovery._merge([(32, 48), (0, 16), (16, 20), (48, 50)]) == [(0, 20), (32, 50)]


@pytest.mark.parametrize("argv", [["--tp", "3"], ["--lose", "4"], ["--tokens", "2"]])
def test_demo_rejects_bad_options(argv, capsys):
    assert demo.main(argv) == 2
    assert "ghostserve demo" in capsys.readouterr().out
