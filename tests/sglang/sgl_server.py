"""A real `python -m sglang.launch_server` process tree on this CPU, and a real `ghostserve gateway`.

What it takes to serve sglang 0.5.23 on a CPU (docs/sglang.md): SGLANG_USE_CPU_ENGINE=1, gloo instead
of NCCL (SGLANG_NCCL_SO_PATH at a missing file: the CUDA torch wheel's NCCL crashes on CPU tensors),
one OpenMP core per rank, and the test-only sgl_kernel stand-in on PYTHONPATH
(tests/sglang/standin_sgl_kernel). The server runs as a subprocess in its own session, so that the
whole tree can be found and killed: an in-process Engine hangs after a tree kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import requests

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
STANDIN = HERE / "standin_sgl_kernel"
START_TIMEOUT = 300.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_env(*, tp: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SGLANG_USE_CPU_ENGINE="1",
        SGLANG_NCCL_SO_PATH="/nonexistent/libnccl.so",
        SGLANG_CPU_OMP_THREADS_BIND="|".join(str(i % (os.cpu_count() or 1)) for i in range(tp)),
        PYTHONPATH=os.pathsep.join([str(STANDIN), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def server_args(model: pathlib.Path, *, port: int, tp: int, page_size: int) -> list[str]:
    return [
        "--model-path", str(model), "--device", "cpu", "--attention-backend", "torch_native",
        "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--tp-size", str(tp),
        "--page-size", str(page_size), "--max-total-tokens", "4096", "--disable-cuda-graph",
        "--mem-fraction-static", "0.05", "--watchdog-timeout", "60",
    ]


class Server:
    """One launch_server process tree; `url` answers /health once `start` returned."""

    def __init__(self, model: pathlib.Path, *, port: int, tp: int, env: dict[str, str], log: pathlib.Path,
                 page_size: int = 4) -> None:
        self.model, self.port, self.tp, self.env, self.log = model, port, tp, env, log
        self.page_size = page_size
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "sglang.launch_server",
               *server_args(self.model, port=self.port, tp=self.tp, page_size=self.page_size)]
        with open(self.log, "ab") as out:
            out.write(f"\n==== start {time.strftime('%X')} ====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"sglang exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"sglang did not become healthy:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def scheduler(self, rank: int) -> psutil.Process:
        # sglang renames its scheduler processes: `sglang::scheduler_TP<r>`, or `sglang::scheduler` at tp=1.
        names = {f"sglang::scheduler_TP{rank}"} | ({"sglang::scheduler"} if self.tp == 1 else set())
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                if " ".join(p.cmdline()).strip() in names:
                    return p
        raise AssertionError(f"no scheduler process for TP{rank} in {[p.pid for p in self.tree()]}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM the launcher, then SIGKILL whatever is left of its session."""
        if self.proc is None:
            return
        members = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        for p in members:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(members, timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@contextlib.contextmanager
def run_gateway(
    backend: str, *, log: pathlib.Path, resume_timeout: float = 400.0, python: str | None = None
) -> Iterator[str]:
    """A real `ghostserve gateway` process (run by `python`, default this one) in front of `backend`;
    yields its URL."""
    port = free_port()
    cmd = [python or sys.executable, "-m", "ghostserve.cli.main", "gateway", "--listen", f"127.0.0.1:{port}",
           "--backend", backend, "--resume-timeout", str(resume_timeout), "--prefer-same-for", "600"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{log.read_text()}")
            try:
                requests.get(url + "/metrics", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise AssertionError("gateway did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class StreamClient(threading.Thread):
    """Streams one /generate request; records every event's cumulative output_ids."""

    def __init__(self, url: str, body: dict[str, Any], *, notify_at: int) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.notify_at = url, body, notify_at
        self.events: list[dict[str, Any]] = []
        self.reached = threading.Event()
        self.error: BaseException | None = None
        self.done_marker = False

    def run(self) -> None:
        try:
            with requests.post(self.url + "/generate", json=self.body, stream=True, timeout=(10, 900)) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        self.done_marker = True
                        break
                    event = json.loads(data)
                    self.events.append(event)
                    if len(event.get("output_ids", [])) >= self.notify_at:
                        self.reached.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.reached.set()
