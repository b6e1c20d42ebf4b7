"""A real sglang 0.5.23 server with the plugin loses a rank mid-decode; the client's stream survives.

Real: `python -m sglang.launch_server` process trees (tp=2 and tp=1, a tiny random-weight LLaMA made
at test time, float32 on the CPU), the `ghostserve sidecar` process with its shared-memory pools,
the `ghostserve gateway` process, SIGKILL of a scheduler process. Stand-in: only sgl_kernel's two CPU
ops (tests/sglang/standin_sgl_kernel; no CPU build exists). The test plays the operator: MarkLost +
Rebuild on the sidecar, then starts the server again.
"""

from __future__ import annotations

import pathlib
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import sgl_procs

if sgl_procs.sglang_version() != "0.5.23":
    pytest.skip("needs sglang 0.5.23 (.venv-sglang, scripts/setup-sglang.sh)", allow_module_level=True)

import requests
import sgl_server
import tiny_model

# Each test starts sglang twice: about a minute each on a quiet 2-core machine, several when it is busy.
pytestmark = pytest.mark.timeout(1800)

T = 8  # GHOSTSERVE_CHUNK_TOKENS
PAGE = 4
NEW_TOKENS = 40
KILL_AFTER = 20  # tokens the client has received when a rank is killed
PROMPT = [71, 294, 35, 133, 63, 256, 233, 244, 336, 197, 12, 40, 99]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_model.make(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)


@pytest.fixture(scope="module")
def hf_reference(model: pathlib.Path) -> list[int]:
    return tiny_model.hf_greedy(model, PROMPT, NEW_TOKENS)


@pytest.fixture
def stack(sidecar: sgl_procs.Sidecar, tmp_path: pathlib.Path) -> Iterator[dict[str, Any]]:
    servers: list[sgl_server.Server] = []
    yield {"servers": servers, "logs": tmp_path}
    for s in servers:
        s.stop()
    leftover = [p.pid for s in servers for p in s.tree() if p.is_running() and p.status() != "zombie"]
    assert not leftover, f"sglang processes left behind: {leftover}"


def plugin_env(sidecar: sgl_procs.Sidecar, *, tp: int, group: str) -> dict[str, str]:
    env = sgl_server.cpu_env(tp=tp)
    env.update(
        GHOSTSERVE_SGLANG="1",
        GHOSTSERVE_SIDECAR=sidecar.address,
        GHOSTSERVE_GROUP=group,
        GHOSTSERVE_CODE="xor" if tp > 1 else "none",
        GHOSTSERVE_CHUNK_TOKENS=str(T),
        SGLANG_PLUGINS="ghostserve",
    )
    return env


def body(rid: str, *, stream: bool) -> dict[str, Any]:
    return {"rid": rid, "input_ids": PROMPT, "stream": stream,
            "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0}}


def check_stream(client: sgl_server.StreamClient) -> list[int]:
    """The stream ended properly and every event extends the previous one (no duplicate, no gap)."""
    assert client.error is None, client.error
    assert client.done_marker
    previous: list[int] = []
    for event in client.events:
        ids = event["output_ids"]
        assert ids[: len(previous)] == previous, "an event rewrote output already sent"
        previous = ids
    return previous


def ledger_requests(sidecar: sgl_procs.Sidecar, group: str) -> list[str]:
    with sidecar.client() as c:
        return [r.request_id for r in c.describe_group(group=group).requests]


def run_fault(stack: dict[str, Any], sidecar: sgl_procs.Sidecar, model: pathlib.Path, *, tp: int,
              kill: str) -> dict[str, Any]:
    group = f"test/real-tp{tp}"
    logs: pathlib.Path = stack["logs"]
    port = sgl_server.free_port()
    server = sgl_server.Server(model, port=port, tp=tp, env=plugin_env(sidecar, tp=tp, group=group),
                               log=logs / "sglang.log")
    stack["servers"].append(server)
    server.start()
    out: dict[str, Any] = {"group": group, "server": server}
    with sgl_server.run_gateway(server.url, log=logs / "gateway.log") as gw:
        fault_free = requests.post(gw + "/generate", json=body("fault-free", stream=False), timeout=300)
        fault_free.raise_for_status()
        out["fault_free"] = fault_free.json()["output_ids"]
        sgl_procs.wait_until(lambda: ledger_requests(sidecar, group) == [], timeout=30,
                             what="the finished request to leave the ledger")

        client = sgl_server.StreamClient(gw, body("victim", stream=True), notify_at=KILL_AFTER)
        client.start()
        assert client.reached.wait(300), "the stream never reached the kill point"
        assert client.error is None, client.error
        victim = server.scheduler(tp - 1) if kill == "rank" else None
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        server.wait_exit(120)  # sglang takes its whole tree down when a scheduler dies
        with sidecar.client() as c:
            desc = c.describe_group(group=group)
            out["attached_after_crash"] = [r.attached for r in desc.ranks]
            ledger = c.describe_request(group=group, request_id="victim")
            valid = 0
            for chunk in sorted(ledger.chunks, key=lambda ch: ch.chunk_index):
                if chunk.chunk_index != valid or not chunk.kv_valid:
                    break
                valid += 1
            out["pool_valid_after_crash"] = [r.pool_valid for r in desc.ranks]
            if tp > 1:  # the operator treats the killed rank's KV as lost (as after a GPU fault)
                c.mark_lost(group=group, ranks=[tp - 1], reason="test: SIGKILL of a rank")
                report = c.rebuild(group=group, lost_ranks=[tp - 1])
                out["bytes_rebuilt"] = report.bytes_rebuilt
                out["failed_chunks"] = [f for r in report.requests for f in r.failed_chunks]
            else:  # a process crash: the pool stayed in custody, nothing to rebuild
                out["bytes_rebuilt"], out["failed_chunks"] = 0, []
        out["committed_at_crash"] = valid
        server.start()  # the operator's restart: same group, same pools
        client.join(600)
        assert not client.is_alive(), "the client's stream did not complete"
        out["stream"] = check_stream(client)
        out["final_meta"] = client.events[-1]["meta_info"]
        sgl_procs.wait_until(lambda: ledger_requests(sidecar, group) == [], timeout=60,
                             what="the resumed request to leave the ledger")
    server.stop()
    with sidecar.client() as c:
        out["attached_after_stop"] = [r.attached for r in c.describe_group(group=group).ranks]
    return out


def test_tp2_rank_sigkill_mid_decode_stream_completes(
    stack: dict[str, Any], sidecar: sgl_procs.Sidecar, model: pathlib.Path, hf_reference: list[int]
) -> None:
    out = run_fault(stack, sidecar, model, tp=2, kill="rank")
    assert out["fault_free"] == hf_reference  # sglang on this CPU decodes greedily like HF
    assert out["stream"] == out["fault_free"]  # the stream that lost a rank equals the fault-free run
    assert len(out["stream"]) == NEW_TOKENS
    meta = out["final_meta"]
    assert meta["ghostserve"]["resumes"] >= 1
    assert out["committed_at_crash"] >= 1, "no chunk was committed before the kill"
    assert out["bytes_rebuilt"] > 0 and out["failed_chunks"] == []
    # The resubmission reused the restored prefix instead of recomputing it.
    resumed = meta["ghostserve"]["attempts"][-1]
    restored = min(out["committed_at_crash"] * T, resumed["input_tokens"] - 1) // PAGE * PAGE
    assert resumed["cached_tokens"] >= restored > 0
    # The launcher told the sidecar its ranks were gone, after the crash and after the shutdown.
    assert out["attached_after_crash"] == [False, False]
    assert out["attached_after_stop"] == [False, False]


def test_tp1_process_crash_resumes_without_rebuild(
    stack: dict[str, Any], sidecar: sgl_procs.Sidecar, model: pathlib.Path, hf_reference: list[int]
) -> None:
    out = run_fault(stack, sidecar, model, tp=1, kill="rank")
    assert out["stream"] == out["fault_free"] == hf_reference
    assert out["pool_valid_after_crash"] == [True]  # a process crash loses no KV: the pool stayed in custody
    assert out["bytes_rebuilt"] == 0
    resumed = out["final_meta"]["ghostserve"]["attempts"][-1]
    assert out["committed_at_crash"] >= 1
    restored = min(out["committed_at_crash"] * T, resumed["input_tokens"] - 1) // PAGE * PAGE
    assert resumed["cached_tokens"] >= restored > 0
    assert out["attached_after_stop"] == [False]
