"""The gateway's pure parts: request parsing, the progress across attempts, rendering, discovery."""

from __future__ import annotations

import json

import pytest
from ghostserve.gateway import discovery, progress, render
from ghostserve.gateway import requests as req_mod


def test_generate_request_is_parsed_and_bad_ones_refused() -> None:
    job = req_mod.parse(req_mod.Kind.GENERATE, {"rid": "r1", "input_ids": [1, 2], "stream": True,
                                                "sampling_params": {"max_new_tokens": 5, "temperature": 0}})
    assert (job.rid, job.input_ids, job.stream, job.max_new_tokens) == ("r1", (1, 2), True, 5)
    assert job.sampling == {"temperature": 0}
    assert req_mod.parse(req_mod.Kind.GENERATE, {"text": "w1"}).max_new_tokens == 128  # sglang's default
    bad = [
        ({"text": "a", "input_ids": [1]}, "exactly one"),
        ({}, "exactly one"),
        ({"input_ids": [[1], [2]]}, "no batches"),
        ({"text": ["a", "b"]}, "no batches"),
        ({"input_ids": [1], "return_logprob": True}, "return_logprob"),
        ({"input_ids": [1], "sampling_params": {"n": 2}}, "n other than 1"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "positive"),
        ({"input_ids": [1], "rid": "has space"}, "rid"),
        ({"input_ids": [1], "stream": "yes"}, "stream"),
    ]
    for body, message in bad:
        with pytest.raises(req_mod.BadRequest, match=message):
            req_mod.parse(req_mod.Kind.GENERATE, body)
    with pytest.raises(req_mod.BadRequest, match="JSON object"):
        req_mod.parse(req_mod.Kind.GENERATE, [1, 2])


def test_openai_requests_map_to_sampling_params() -> None:
    job = req_mod.parse(req_mod.Kind.COMPLETIONS, {"model": "m", "prompt": "w1 w2", "max_tokens": 3,
                                                   "temperature": 0, "seed": 7, "stop": ["x"]})
    assert job.text == "w1 w2" and job.max_new_tokens == 3 and job.model == "m"
    assert job.sampling == {"temperature": 0, "sampling_seed": 7, "stop": ["x"]}
    assert req_mod.parse(req_mod.Kind.COMPLETIONS, {"prompt": [4, 5]}).max_new_tokens == 16
    chat = req_mod.parse(req_mod.Kind.CHAT, {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert chat.messages == ({"role": "user", "content": "hi"},) and chat.max_new_tokens is None
    assert chat.include_usage and chat.sampling == {"temperature": 1.0}
    for kind, body, message in [
        (req_mod.Kind.CHAT, {"messages": []}, "non-empty"),
        (req_mod.Kind.CHAT, {"messages": [{"role": "user", "content": "x"}], "tools": [{"t": 1}]}, "tools"),
        (req_mod.Kind.COMPLETIONS, {"prompt": "x", "n": 2}, "n other than 1"),
        (req_mod.Kind.COMPLETIONS, {"prompt": ["a", "b"]}, "batches"),
        (req_mod.Kind.COMPLETIONS, {"prompt": "x", "logprobs": 2}, "logprobs"),
        (req_mod.Kind.COMPLETIONS, {"prompt": "x", "frobnicate": 1}, "unknown fields: frobnicate"),
    ]:
        with pytest.raises(req_mod.BadRequest, match=message):
            req_mod.parse(kind, body)


def event(ids: list[int], text: str, finish: dict | None = None, cached: int = 0) -> dict:
    return {"output_ids": ids, "text": text, "meta_info": {"finish_reason": finish, "cached_tokens": cached}}


def test_progress_continues_across_attempts_without_duplicates_or_gaps() -> None:
    p = progress.Progress("r", [1, 2, 3], 6, {"temperature": 0})
    first = p.next_body("b0")
    assert first == {"rid": "r", "input_ids": [1, 2, 3], "stream": True,
                     "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
    assert p.update(event([10], " a")) == ([10], " a")
    assert p.update(event([10, 11], " a b")) == ([11], " b")
    # The backend died; the next attempt carries everything the client has, with the rest of the budget.
    second = p.next_body("b0")
    assert second["input_ids"] == [1, 2, 3, 10, 11] and second["sampling_params"]["max_new_tokens"] == 4
    assert p.update(event([12], " c", cached=4)) == ([12], " c")
    assert p.update(event([12, 13, 14, 15], " c d e f", finish={"type": "length"}, cached=4)) == (
        [13, 14, 15], " d e f")
    assert p.output_ids == [10, 11, 12, 13, 14, 15] and p.text == " a b c d e f" and p.done
    assert [a.cached_tokens for a in p.attempts] == [0, 4]
    meta = p.meta_info({"cached_tokens": 4})
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] == 3
    assert meta["ghostserve"]["resumes"] == 1
    with pytest.raises(progress.ProtocolError, match="nothing left"):
        p.next_body("b0")


def test_progress_refuses_a_shrinking_stream_and_reports_aborts() -> None:
    p = progress.Progress("r", [1], None, {})
    assert "max_new_tokens" not in p.next_body("b")["sampling_params"]  # the backend's default budget
    p.update(event([5, 6], " x y"))
    with pytest.raises(progress.ProtocolError, match="shrank"):
        p.update(event([5], " x"))
    abort = event([5, 6], "", finish={"type": "abort", "message": "shutting down"})
    assert p.aborted(abort) == "shutting down"
    assert p.aborted(event([5, 6], "", finish={"type": "stop"})) is None


def test_progress_finishes_when_the_budget_is_used_even_without_a_finish_event() -> None:
    p = progress.Progress("r", [1], 2, {})
    p.next_body("b")
    p.update(event([7, 8], " p q"))
    assert p.done and p.finish_reason == {"type": "length", "length": 2}


def test_render_native_and_openai_streams() -> None:
    job = req_mod.parse(req_mod.Kind.CHAT, {"messages": [{"role": "user", "content": "q"}], "max_tokens": 2,
                                            "stream": True, "stream_options": {"include_usage": True}})
    p = progress.Progress(job.rid, [1, 2], 2, job.sampling)
    r = render.Renderer(job, p)
    p.next_body("b")
    first = r.stream_chunks(*p.update(event([3], " w3")))
    chunk = json.loads(first[0][6:])
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["delta"] == {"content": " w3", "role": "assistant"}
    last = r.stream_chunks(*p.update(event([3, 4], " w3 w4", finish={"type": "length"})))
    assert [json.loads(c[6:])["choices"][0]["finish_reason"] for c in last[:1]] == ["length"]
    assert json.loads(last[1][6:])["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    whole = r.whole()
    assert whole["choices"][0]["message"]["content"] == " w3 w4"
    native = req_mod.parse(req_mod.Kind.GENERATE, {"input_ids": [1], "stream": True})
    pn = progress.Progress(native.rid, [1], 128, {})
    rn = render.Renderer(native, pn)
    pn.next_body("b")
    out = rn.stream_chunks(*pn.update(event([9, 8], " a b")))
    assert json.loads(out[0][6:])["output_ids"] == [9, 8]  # native streams are cumulative


def test_backends_from_pods_keeps_ready_pods_with_an_ip() -> None:
    def pod(name: str, ip: str | None, ready: str, deleting: bool = False) -> dict:
        meta: dict = {"name": name}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}}

    pods = [pod("g-r1", "10.0.0.2", "True"), pod("g-r0", "10.0.0.1", "True"), pod("g-r2", None, "True"),
            pod("g-r3", "10.0.0.3", "False"), pod("g-r4", "10.0.0.4", "True", deleting=True),
            pod("g-r5", "fd00::5", "True")]
    got = discovery.backends_from_pods(pods, port=30000)
    assert [(b.name, b.url) for b in got] == [("g-r0", "http://10.0.0.1:30000"),
                                              ("g-r1", "http://10.0.0.2:30000"),
                                              ("g-r5", "http://[fd00::5]:30000")]
