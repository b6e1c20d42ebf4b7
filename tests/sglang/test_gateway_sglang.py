"""The resume gateway's OpenAI endpoints in front of a real sglang server whose tree is SIGKILLed.

The gateway runs from the main .venv when there is one (the operator image has no sglang); the backend
is a real `sglang.launch_server` without GhostServe's plugin: after the kill the resubmission is
recomputed, and the client's stream must still equal the fault-free answer.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import threading
from typing import Any

import pytest
import sgl_procs

if sgl_procs.sglang_version() != "0.5.23":
    pytest.skip("needs sglang 0.5.23 (.venv-sglang, scripts/setup-sglang.sh)", allow_module_level=True)

import requests
import sgl_server
import tiny_model

pytestmark = pytest.mark.timeout(1800)

MAIN_VENV = sgl_server.REPO / ".venv" / "bin" / "python"
# Long enough that the stream cannot finish between the 10th chunk and the SIGKILL (with 40 tokens it
# once did on a loaded machine, and nothing was left to resume); ignore_eos keeps it that long.
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": tiny_model.words(12, seed=3)}],
        "max_tokens": 200, "ignore_eos": True, "temperature": 0}
COMPLETION = {"model": "tiny", "prompt": tiny_model.words(9, seed=4), "max_tokens": 12, "temperature": 0}


def sse_chunks(response: requests.Response) -> list[dict[str, Any]]:
    out = []
    for line in response.iter_lines():
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            out.append(json.loads(line[5:]))
    return out


class ChatStream(threading.Thread):
    def __init__(self, url: str, notify_at: int) -> None:
        super().__init__(daemon=True)
        self.url, self.notify_at = url, notify_at
        self.chunks: list[dict[str, Any]] = []
        self.reached = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with requests.post(self.url + "/v1/chat/completions", json={**CHAT, "stream": True}, stream=True,
                               timeout=(10, 900)) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                        continue
                    self.chunks.append(json.loads(line[5:]))
                    if len(self.chunks) >= self.notify_at:
                        self.reached.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.reached.set()


def test_openai_endpoints_survive_a_backend_kill(tmp_path: pathlib.Path) -> None:
    model = tiny_model.make(tmp_path / "model", seed=1)
    env = sgl_server.cpu_env(tp=1)
    server = sgl_server.Server(model, port=sgl_server.free_port(), tp=1, env=env, log=tmp_path / "sglang.log")
    python = str(MAIN_VENV) if MAIN_VENV.exists() else sys.executable
    try:
        server.start()
        # What the backend itself answers (its own OpenAI endpoints): the fault-free reference.
        direct_chat = requests.post(server.url + "/v1/chat/completions", json=CHAT, timeout=300).json()
        direct_completion = requests.post(server.url + "/v1/completions", json=COMPLETION, timeout=300).json()
        with sgl_server.run_gateway(server.url, log=tmp_path / "gateway.log", python=python) as gw:
            chat = requests.post(gw + "/v1/chat/completions", json=CHAT, timeout=300).json()
            assert chat["choices"][0]["message"]["content"] == direct_chat["choices"][0]["message"]["content"]
            assert chat["usage"] == {k: direct_chat["usage"][k] for k in chat["usage"]}
            completion = requests.post(gw + "/v1/completions", json=COMPLETION, timeout=300).json()
            assert completion["choices"][0]["text"] == direct_completion["choices"][0]["text"]
            streamed = sse_chunks(requests.post(gw + "/v1/completions", json={**COMPLETION, "stream": True},
                                                stream=True, timeout=300))
            assert "".join(c["choices"][0]["text"] for c in streamed) == completion["choices"][0]["text"]
            assert streamed[-1]["choices"][0]["finish_reason"] == "length"
            bad = requests.post(gw + "/v1/completions", json={**COMPLETION, "n": 2}, timeout=30)
            assert bad.status_code == 400 and "n other than 1" in bad.json()["message"]

            # The whole server tree dies mid-stream; the gateway holds the client until it is back.
            client = ChatStream(gw, notify_at=10)
            client.start()
            assert client.reached.wait(300) and client.error is None, client.error
            assert server.proc is not None
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.wait_exit(60)
            server.start()
            client.join(600)
            assert not client.is_alive() and client.error is None, client.error
            assert all("error" not in c for c in client.chunks)
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in client.chunks)
            assert text == direct_chat["choices"][0]["message"]["content"]
            assert client.chunks[-1]["choices"][0]["finish_reason"] == "length"
            metrics = requests.get(gw + "/metrics", timeout=10).text
            assert "ghostserve_gateway_resumes_total 0" not in metrics
    finally:
        server.stop()
    assert not [p for p in server.tree() if p.is_running() and p.status() != "zombie"]
