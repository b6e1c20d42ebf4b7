"""`ghostserve demo --engine sglang`: real sglang servers (.venv-sglang, CPU) in the embedded cluster's
pods survive a fatal Xid mid-decode (same-node GPU swap, lost rank's KV rebuilt), tokens identical."""

from __future__ import annotations

import io
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from cluster_support import started_cluster
from ghostserve.cluster import containers, demo, embedded, scenarios, sglang_engine
from rich.console import Console

needs_sglang = pytest.mark.skipif(
    not containers.SGLANG_PYTHON.exists(),
    reason=f"{containers.SGLANG_PYTHON} does not exist (scripts/setup-sglang.sh)",
)


def test_engine_flag_defaults_to_reference() -> None:
    assert demo.parse_args([]).engine == "reference"
    assert demo.parse_args(["--engine", "sglang"]).engine == "sglang"
    with pytest.raises(SystemExit):
        demo.parse_args(["--engine", "vllm"])


def test_sglang_demo_refuses_without_the_sglang_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    monkeypatch.setattr(containers, "SGLANG_PYTHON", missing)
    out = io.StringIO()
    args = demo.parse_args(["--engine", "sglang"])
    rc = sglang_engine.main(args, Console(file=out, width=200), report=demo._report)
    assert rc == 2
    assert str(missing) in out.getvalue() and "setup-sglang.sh" in out.getvalue()
    assert demo.main(["--engine", "sglang"]) == 2


def test_manifest_carries_the_cpu_flags_env_and_model_path() -> None:
    m = sglang_engine.SglangDeployment("x", tp=2, model_path="/tmp/m").manifest()
    engine = m["spec"]["engine"]
    assert "sglang" in engine["image"] and m["spec"]["model"]["path"] == "/tmp/m"
    assert engine["args"][engine["args"].index("--device") + 1] == "cpu"
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert env["PYTHONPATH"].endswith("tests/sglang/standin_sgl_kernel")
    assert env["SGLANG_CPU_OMP_THREADS_BIND"].count("|") == 1 and env["SGLANG_USE_CPU_ENGINE"] == "1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[embedded.Cluster]:
    yield from started_cluster(nodes=2, gpus=4)


@needs_sglang
@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sglang_replica_survives_a_device_fault(cluster: embedded.Cluster) -> None:
    seen: dict[str, Any] = {}

    def report(console: Console, c: embedded.Cluster, title: str, dep: Any, run: Any, **kw: Any) -> None:
        seen.update(status=scenarios.status_of(c, dep.name), run=run, identical=kw["identical"])
        demo._report(console, c, title, dep, run, **kw)

    out = io.StringIO()
    with sglang_engine.tiny_model() as path:
        ok = sglang_engine.device_fault(
            Console(file=out, width=200),
            cluster,
            requests=2,
            prompt=64,
            tokens=sglang_engine.MIN_TOKENS,
            seed=0,
            code="xor",
            model_path=path,
            report=report,
        )
    assert not path.exists()
    print(out.getvalue())
    last = seen["status"]["lastRecovery"]
    assert ok and seen["identical"], out.getvalue()
    assert (last["outcome"], last["kv"], last["kind"]) == ("Succeeded", "Rebuilt", "device"), last
    assert last["sourceNode"] == last["targetNode"]
    assert int(last["bytesRebuilt"]) > 0
    run = seen["run"]
    assert run.fault_at is not None and any(s.first_after(run.fault_at) for s in run.streams)
    assert sglang_engine.STANDIN_NOTE in out.getvalue().replace("\n", " ")
