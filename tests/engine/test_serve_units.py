"""The pure pieces of `ghostserve serve`: flags and environment, request parsing, the byte tokenizer,
resubmission planning, page assignment and the fake GPU seam."""

from __future__ import annotations

import json

import pytest
from ghostserve.engine.reference import devices, httpapi, jobs, kvpool, resume, serveargs, tokenizer

ENV = {"GHOSTSERVE_CHUNK_TOKENS": "32", "GHOSTSERVE_GROUP": "ns/gsd-r0", "GHOSTSERVE_CODE": "rs"}


def test_sglang_flags_and_env_parsed():
    argv = ["--model-path", "ghostserve/tiny-llama-demo", "--tp-size", "4", "--host", "0.0.0.0"]
    argv += ["--port", "30001", "--page-size", "16", "--trust-remote-code", "--mem-fraction-static", "0.8"]
    env = {**ENV, "NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c,GPU-d", "GHOSTSERVE_RESUME_WAIT_S": "7"}
    cfg, ignored = serveargs.parse(argv, env)
    assert ignored == ["--trust-remote-code", "--mem-fraction-static", "0.8"]
    assert (cfg.tp, cfg.host, cfg.port, cfg.page_size) == (4, "0.0.0.0", 30001, 16)
    assert cfg.model == serveargs.MODELS["demo"] and cfg.group == "ns/gsd-r0"
    assert cfg.protection.code == "rs" and cfg.protection.m == 2 and cfg.protection.chunk_tokens == 32
    assert [d.uuid for d in cfg.devices] == ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]
    assert cfg.resume_wait_s == 7.0
    cfg, _ = serveargs.parse(["--tp-size", "2"], {**ENV, "NVIDIA_VISIBLE_DEVICES": "all"})
    assert [d.uuid for d in cfg.devices] == ["", ""]


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--model-path", "meta-llama/Llama-3.1-8B"], {}, "random-weight"),
        (["--tp-size", "3"], {}, "tp"),
        (["--page-size", "48"], ENV, "multiple of --page-size"),
        (["--tp-size", "2"], {**ENV, "GHOSTSERVE_WORLD_SIZE": "4"}, "WORLD_SIZE"),
        (["--tp-size", "2"], {**ENV, "GHOSTSERVE_CODE": "lrc"}, "GHOSTSERVE_CODE"),
        (["--tp-size", "2"], {**ENV, "NVIDIA_VISIBLE_DEVICES": "GPU-a"}, "NVIDIA_VISIBLE_DEVICES"),
        (["--tp-size", "2"], {**ENV, "GHOSTSERVE_RESUME_WAIT_S": "soon"}, "RESUME_WAIT"),
        (["--port", "0"], ENV, "--port"),
    ],
)
def test_bad_flags_and_env_named(argv, env, message):
    with pytest.raises(serveargs.ServeArgsError, match=message):
        serveargs.parse(argv, env)


def test_byte_tokenizer_round_trip():
    tok = tokenizer.ByteTokenizer(512)
    ids = tok.encode("héllo ☃")
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == "héllo ☃"
    assert tok.decode([104, 300, 105]) == "h<|300|>i"
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 never fails
    with pytest.raises(tokenizer.TokenizerError):
        tokenizer.ByteTokenizer(100)


def test_generate_body_parsed_and_reply_shaped():
    tok = tokenizer.ByteTokenizer(512)
    params = {"max_new_tokens": 5, "temperature": 0.0}
    gen = httpapi.parse_generate({"rid": "r1", "text": "ab", "sampling_params": params, "stream": True}, tok)
    assert gen == httpapi.Generate("r1", [97, 98], 5, True)
    assert httpapi.parse_generate({"input_ids": [1, 2]}, tok).max_new_tokens == httpapi.DEFAULT_MAX_NEW_TOKENS
    out = jobs.Output((104, 105), prompt_tokens=2, cached_tokens=0, done=True, max_new_tokens=2)
    body = httpapi.reply("r1", out, tok)
    assert json.loads(json.dumps(body)) == {
        "text": "hi",
        "output_ids": [104, 105],
        "meta_info": {
            "id": "r1",
            "prompt_tokens": 2,
            "completion_tokens": 2,
            "cached_tokens": 0,
            "finish_reason": {"type": "length", "length": 2},
        },
    }
    with pytest.raises(httpapi.BadRequest, match="stream"):
        httpapi.parse_generate({"text": "a", "stream": "yes"}, tok)
    with pytest.raises(httpapi.BadRequest, match="integers"):
        httpapi.parse_generate({"input_ids": [1, True]}, tok)


def _chunk(i: int, page: int, valid: bool = True, *, t: int = 16) -> resume.LedgerChunk:
    return resume.LedgerChunk(i, tuple(range(page * t, page * t + t)), valid)


def test_valid_prefix_and_page_layout():
    chunks = [_chunk(0, 5), _chunk(1, 2), _chunk(2, 9, False), _chunk(4, 3)]
    assert resume.valid_prefix(chunks, 16) == 32
    # Chunk 3 was dropped from the ledger (not rebuilt): it gets a fresh page; chunk 2 keeps its slots.
    assert resume.page_layout(chunks, page_size=16, chunk_tokens=16) == [5, 2, 9, None, 3]
    assert resume.page_layout(chunks, page_size=8, chunk_tokens=16)[:4] == [10, 11, 4, 5]
    shifted = resume.LedgerChunk(0, tuple(range(3, 19)), True)
    with pytest.raises(resume.ResumeError, match="whole pages"):
        resume.page_layout([shifted], page_size=16, chunk_tokens=16)
    with pytest.raises(resume.ResumeError, match="share"):
        resume.page_layout([_chunk(0, 1), _chunk(1, 1)], page_size=16, chunk_tokens=16)


@pytest.mark.parametrize(
    "input_len, known, valid, expected",
    [
        (90, 90, 80, 80),  # whole valid prefix reused
        (90, 90, 96, 89),  # at most len(input) - 1: the last input token is computed
        (70, 70, 80, 64),  # inside the prompt (70): cut to a chunk boundary
        (100, 85, 96, 85),  # never past the tokens the held request is known to have
        (90, 90, 0, 0),  # nothing valid (sidecar lost it): recompute everything
    ],
)
def test_reuse(input_len, known, valid, expected):
    tokens = list(range(200))
    ids, known_tokens = tokens[:input_len], tokens[:known]
    n = resume.reuse(ids, prompt_len=70, known_tokens=known_tokens, valid_len=valid, chunk_tokens=16)
    assert n == expected


def test_reuse_refuses_another_request():
    held = list(range(90))
    other_prompt = [7, *held[1:]]
    assert resume.reuse(other_prompt, prompt_len=70, known_tokens=held, valid_len=80, chunk_tokens=16) is None
    diverged = held[:80] + [999] * 10
    assert resume.reuse(diverged, prompt_len=70, known_tokens=held, valid_len=80, chunk_tokens=16) is None
    assert resume.reuse(held[:50], prompt_len=70, known_tokens=held, valid_len=80, chunk_tokens=16) is None


def test_page_allocator_assign():
    alloc = kvpool.PageAllocator(8 * 16, 16)
    alloc.ensure("a", 32)  # pages 0, 1
    slots = alloc.assign("b", [5, None, 2])
    assert [s // 16 for s in slots[::16]] == [5, 3, 2]
    with pytest.raises(kvpool.PoolFullError, match="not free"):
        alloc.assign("c", [0])
    before = alloc.free_pages
    with pytest.raises(kvpool.PoolFullError):
        alloc.assign("c", [None] * 10)
    assert alloc.free_pages == before  # a refused assignment changes nothing
    alloc.assign("b", [2])  # shrinking frees 5 and 3
    assert alloc.free_pages == before + 2
    alloc.free("b")
    alloc.free("a")
    assert alloc.free_pages == 8


def test_fake_gpu_seam(tmp_path):
    env = {"NVIDIA_VISIBLE_DEVICES": "GPU-x,GPU-y", devices.fakegpu.ENV: str(tmp_path)}
    dev = devices.Device.for_rank(1, env)
    assert dev.uuid == "GPU-y"
    dev.check()
    (tmp_path / "faults").mkdir()
    fault = {"kind": "XID", "xid": 79, "message": "gone"}
    (tmp_path / "faults" / "GPU-y.json").write_text(json.dumps(fault))
    with pytest.raises(devices.DeviceError, match="Xid 79"):
        dev.check()
    devices.Device.for_rank(0, env).check()  # the other GPU works
    # Never outside the embedded cluster: without the variable nothing is checked.
    devices.Device.for_rank(1, {"NVIDIA_VISIBLE_DEVICES": "GPU-x,GPU-y"}).check()
