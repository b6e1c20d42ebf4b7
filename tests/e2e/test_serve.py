"""`ghostserve serve` as a pod runs it: a real serve process tree (HTTP + driver + rank processes) and a
real sidecar. Every output is compared token for token with the engine's fault-free run of the same
prompts (tests/e2e/conftest.py's baseline)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import serve_support
from e2e_support import requests
from ghostserve.engine.reference import devices
from ghostserve.sidecar import client as client_mod
from proc_exit import still_running

TP = 2


def _until(cond: Any, *, timeout_s: float = 120.0, what: str = "") -> Any:
    """Poll an observable condition of the server (its state endpoint) until it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _body(i: int, **extra: Any) -> dict[str, Any]:
    req = requests()[i]
    params = {"max_new_tokens": req.max_new_tokens, "temperature": 0}
    return {"rid": req.request_id, "input_ids": req.prompt, "sampling_params": params, **extra}


def _delete_group(sidecar: Any, group: str) -> None:
    with client_mod.SidecarClient(sidecar.address) as c:
        c.delete_group(group=group)


@pytest.fixture(scope="module")
def served(sidecar, workdir) -> Iterator[serve_support.ServeProcess]:
    srv = serve_support.ServeProcess(
        workdir / "serve-main", sidecar=sidecar.address, group="serve/main", tp=TP
    )
    srv.start()
    yield srv
    pids = srv.state()["rank_pids"]
    assert srv.stop() == 0, srv.log_tail()
    assert not still_running(pids)
    _delete_group(sidecar, "serve/main")


def test_generate_and_stream_in_sglang_shapes(served, baseline):
    base = baseline(TP).outputs
    results: dict[str, Any] = {}

    def run_stream() -> None:
        results["stream"] = list(served.stream(_body(1)))

    t = threading.Thread(target=run_stream)
    t.start()
    status, out = served.generate(_body(0))
    t.join()
    assert status == 200, out
    assert out["output_ids"] == base["req-0"]
    meta = out["meta_info"]
    assert meta["id"] == "req-0" and meta["prompt_tokens"] == len(requests()[0].prompt)
    assert meta["completion_tokens"] == 40 and meta["cached_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 40}
    events = results["stream"]
    # Cumulative: every event extends the previous one; only the last has a finish reason.
    assert [len(e["output_ids"]) for e in events] == list(range(1, 41))
    assert events[-1]["output_ids"] == base["req-1"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    # Text in, text out: the byte tokenizer makes the prompt's UTF-8 bytes the input ids.
    status, out = served.generate({"text": "héllo", "sampling_params": {"max_new_tokens": 3}})
    assert status == 200 and out["meta_info"]["prompt_tokens"] == len("héllo".encode())
    status, info = served.get("/get_model_info")
    assert status == 200 and info["model_path"] == "ghostserve/tiny-llama" and info["tp_size"] == TP


@pytest.mark.parametrize(
    "body, message",
    [
        (b"not json", "not JSON"),
        ([1, 2], "JSON object"),
        ({"sampling_params": {"max_new_tokens": 4}}, "exactly one of"),
        ({"text": "a", "input_ids": [1]}, "exactly one of"),
        ({"input_ids": [1, 100000]}, "outside"),
        ({"input_ids": []}, "empty"),
        ({"text": ["a", "b"]}, "batches"),
        ({"text": "a", "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"text": "a", "sampling_params": {"temperature": 0.7}}, "temperature"),
        ({"text": "a", "sampling_params": {"max_new_tokens": 10**6}}, "KV slots"),
        ({"text": "a", "rid": ""}, "rid"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(served, body, message):
    before = served.state()
    status, out = served.generate(body)
    assert status == 400, out
    assert message in out["error"]["message"]
    after = served.state()
    assert after["running"] == [] and after["waiting"] == [] and after["held"] == before["held"]
    assert after["rank_pids"] == before["rank_pids"]


def test_rank_sigkilled_mid_decode_stream_continues(served, baseline):
    before = served.state()
    received = []
    for event in served.stream(_body(2)):
        received.append(event["output_ids"])
        if len(received) == 10:
            served_pids = served.state()["rank_pids"]
            os.kill(served_pids[1], signal.SIGKILL)
    assert received[-1] == baseline(TP).outputs["req-2"]
    after = served.state()
    assert len(after["recoveries"]) == len(before["recoveries"]) + 1
    rec = after["recoveries"][-1]
    assert rec["kind"] == "process" and rec["bytes_rebuilt"] == 0
    assert not still_running(before["rank_pids"])
    assert after["generations"] == before["generations"] + 1


def test_client_gone_request_is_held_and_resumed(served, baseline):
    base = baseline(TP).outputs["req-0"]
    body = _body(0, rid="held-0")
    stream = served.stream(body)
    got: list[int] = []
    for event in stream:
        got = event["output_ids"]
        if len(got) >= 25:
            break
    stream.close()  # drop the connection mid-decode
    _until(lambda: "held-0" in served.state()["held"], what="the request to be held")
    prompt = body["input_ids"]
    status, out = served.generate(
        {**body, "input_ids": prompt + got, "sampling_params": {"max_new_tokens": 40 - len(got)}}
    )
    assert status == 200, out
    assert got + out["output_ids"] == base
    # Chunks of 16: at least the prompt's 4 whole chunks were committed before the cut.
    assert 64 <= out["meta_info"]["cached_tokens"] <= len(prompt) + len(got) - 1
    assert out["meta_info"]["prompt_tokens"] == len(prompt) + len(got)
    assert "held-0" not in served.state()["held"]


def _stream_until(
    srv: serve_support.ServeProcess, body: dict[str, Any], n: int, on_n: Any, ends: list[str] | None = None
) -> list[int]:
    """Stream ``body``; after ``n`` tokens call ``on_n``; returns the tokens received before the stream
    broke (connection dropped, or an abort event: its message is appended to ``ends``)."""
    got: list[int] = []
    try:
        for event in srv.stream(body):
            got = event["output_ids"]
            finish = event["meta_info"]["finish_reason"]
            if finish and finish["type"] == "abort":
                if ends is not None:
                    ends.append(finish["message"])
                break
            if len(got) == n:
                on_n()
    except (ConnectionError, OSError, json.JSONDecodeError):
        pass
    return got


def test_whole_tree_sigkilled_restarted_and_resubmitted(sidecar, workdir, baseline, no_shm_leak):
    base = baseline(TP).outputs
    group = "serve/restart"
    srv = serve_support.ServeProcess(workdir / "serve-restart", sidecar=sidecar.address, group=group, tp=TP)
    srv.start()
    old_pids = srv.state()["rank_pids"]
    got = _stream_until(srv, _body(1), 20, srv.kill_tree)
    assert 20 <= len(got) < 40
    assert not still_running(old_pids)
    again = serve_support.ServeProcess(
        workdir / "serve-restart2", sidecar=sidecar.address, group=group, tp=TP
    )
    try:
        again.start()
        assert again.state()["held"] == ["req-1"]
        prompt = requests()[1].prompt
        status, out = again.generate(
            {"rid": "req-1", "input_ids": prompt + got, "sampling_params": {"max_new_tokens": 40 - len(got)}}
        )
        assert status == 200, out
        assert got + out["output_ids"] == base["req-1"]
        assert out["meta_info"]["cached_tokens"] >= 64
        pids = again.state()["rank_pids"]
    finally:
        assert again.stop() == 0
    assert not still_running(pids)
    _delete_group(sidecar, group)


def test_device_fault_exits_then_rescheduled_pod_rebuilds_and_resumes(
    sidecar, workdir, baseline, no_shm_leak
):
    """The embedded cluster's fake GPU seam: rank 1's GPU dies mid-decode, the rank fails like a CUDA
    process, the tree exits (4); as the operator would, the rank is marked lost and the pod restarted on
    another GPU; the new tree rebuilds the lost pool from parity and the resubmission continues."""
    base = baseline(TP).outputs
    group = "serve/device"
    gpus = workdir / "fake-gpus"
    env = {"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b", devices.fakegpu.ENV: str(gpus)}
    srv = serve_support.ServeProcess(
        workdir / "serve-dev", sidecar=sidecar.address, group=group, tp=TP, env=env
    )
    srv.start()

    def break_gpu() -> None:
        (gpus / "faults").mkdir(parents=True, exist_ok=True)
        fault = {"kind": "XID", "xid": 79, "message": "fell off the bus"}
        (gpus / "faults" / "GPU-b.json").write_text(json.dumps(fault))

    ends: list[str] = []
    got = _stream_until(srv, _body(2), 22, break_gpu, ends)
    assert srv.wait() == devices.EXIT_DEVICE_ERROR, srv.log_tail()
    # The stream ended with sglang's abort reason and the output so far (what a gateway resubmits).
    assert len(ends) == 1 and "device lost" in ends[0], ends
    assert 22 <= len(got) < 40
    with client_mod.SidecarClient(sidecar.address) as c:
        c.mark_lost(group=group, ranks=[1], reason="Xid 79 on GPU-b")
    env2 = {**env, "NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-c"}
    again = serve_support.ServeProcess(
        workdir / "serve-dev2", sidecar=sidecar.address, group=group, tp=TP, env=env2
    )
    try:
        again.start()
        prompt = requests()[2].prompt
        status, out = again.generate(
            {"rid": "req-2", "input_ids": prompt + got, "sampling_params": {"max_new_tokens": 40 - len(got)}}
        )
        assert status == 200, out
        assert got + out["output_ids"] == base["req-2"]
        assert out["meta_info"]["cached_tokens"] >= 64  # rebuilt from parity, not recomputed
    finally:
        assert again.stop() == 0
    srv.kill_tree()
    _delete_group(sidecar, group)


def test_held_request_released_when_not_resubmitted(sidecar, workdir, no_shm_leak):
    group = "serve/expire"
    srv = serve_support.ServeProcess(
        workdir / "serve-exp", sidecar=sidecar.address, group=group, tp=TP
    )
    srv.start()
    _stream_until(srv, _body(0), 5, srv.kill_tree)
    with client_mod.SidecarClient(sidecar.address) as c:
        assert [r.request_id for r in c.describe_group(group=group).requests] == ["req-0"]
    again = serve_support.ServeProcess(
        workdir / "serve-exp2",
        sidecar=sidecar.address,
        group=group,
        tp=TP,
        env={"GHOSTSERVE_RESUME_WAIT_S": "1"},
    )
    try:
        again.start()
        _until(lambda: again.state()["held"] == [], what="the held request to expire")
        with client_mod.SidecarClient(sidecar.address) as c:
            assert list(c.describe_group(group=group).requests) == []
    finally:
        assert again.stop() == 0
    _delete_group(sidecar, group)


def test_serve_rejects_bad_flags(tmp_path: pathlib.Path):
    srv = serve_support.ServeProcess(tmp_path, sidecar="unix:///nonexistent", group="g", tp=3)
    with pytest.raises(RuntimeError, match="exited with 2"):
        srv.start(timeout_s=60)
    assert "tp" in srv.log_tail()


def test_same_rid_resubmitted_while_running_takes_over(served, baseline):
    """The gateway may resubmit before this server noticed the old stream broke: a continuation of the
    running request takes it over (the old stream is told so); another prompt under that rid is refused."""
    base = baseline(TP).outputs["req-1"]
    stream = served.stream(_body(1, rid="dup"))
    first = next(stream)["output_ids"]  # the request is running now (39 more decode steps to go)
    status, out = served.generate(_body(0, rid="dup"))
    assert status == 400 and "already running" in out["error"]["message"]
    prompt = requests()[1].prompt
    status, out = served.generate(
        {"rid": "dup", "input_ids": prompt + first, "sampling_params": {"max_new_tokens": 40 - len(first)}}
    )
    assert status == 200, out
    assert first + out["output_ids"] == base
    rest = list(stream)
    finish = rest[-1]["meta_info"]["finish_reason"]
    assert finish["type"] == "abort" and "superseded" in finish["message"]
    assert base[: len(rest[-1]["output_ids"])] == rest[-1]["output_ids"]
