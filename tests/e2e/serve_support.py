"""A real `ghostserve serve` process tree for tests, and a small blocking HTTP/SSE client."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`python -m ghostserve.engine.reference.serve` in its own session (its process group is the pod's
    process tree: server + forkserver + ranks)."""

    def __init__(
        self,
        workdir: pathlib.Path,
        *,
        sidecar: str,
        group: str,
        tp: int = 2,
        chunk: int = 16,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.workdir, self.port = workdir, free_port()
        self.env = {
            **os.environ,
            "GHOSTSERVE_SIDECAR": sidecar,
            "GHOSTSERVE_GROUP": group,
            "GHOSTSERVE_CHUNK_TOKENS": str(chunk),
            "GHOSTSERVE_WORKDIR": str(workdir / "gloo"),
            **(env or {}),
        }
        self.args = [
            "--model-path",
            "ghostserve/tiny-llama",
            "--tp-size",
            str(tp),
            "--port",
            str(self.port),
            "--page-size",
            str(chunk),
            "--max-total-tokens",
            "4096",
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "serve.log"

    def start(self, *, timeout_s: float = 120.0) -> None:
        """Start and wait for /health (raises RuntimeError with the log if it exits first)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ghostserve.engine.reference.serve", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, _ = self.get("/health", timeout=2.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve not healthy after {timeout_s}s: {self.log_tail()}")
            time.sleep(0.2)

    def kill_tree(self) -> None:
        """SIGKILL the whole process tree (a pod killed or its node lost)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, *, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL of the tree; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        code = self.proc.poll()
        self.kill_tree()
        return code

    def wait(self, timeout_s: float = 120.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    # ---- HTTP ---------------------------------------------------------------------------------------

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def _call(
        self,
        method: str,
        path: str,
        timeout: float,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, the body as JSON, or as text where it is not JSON)."""
        conn = self._conn(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def get(self, path: str, *, timeout: float = 30.0) -> tuple[int, Any]:
        return self._call("GET", path, timeout)

    def state(self) -> dict[str, Any]:
        status, body = self.get("/ghostserve/state")
        assert status == 200, body
        return dict(body)

    def generate(self, body: Any, *, timeout: float = 300.0) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._call("POST", "/generate", timeout, data, {"Content-Type": "application/json"})

    def stream(self, body: dict[str, Any], *, timeout: float = 300.0) -> Iterator[dict[str, Any]]:
        """Yield each SSE event's JSON; stops after `[DONE]`. Closing the generator drops the connection."""
        conn = self._conn(timeout)
        try:
            conn.request(
                "POST",
                "/generate",
                body=json.dumps({**body, "stream": True}).encode(),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            while True:
                line = resp.readline()
                if not line:
                    raise ConnectionError("stream ended without [DONE]")
                line = line.strip()
                if not line:
                    continue
                assert line.startswith(b"data: "), line
                payload = line[len(b"data: ") :]
                if payload == b"[DONE]":
                    return
                yield json.loads(payload)
        finally:
            conn.close()
