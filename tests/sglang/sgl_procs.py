"""Helpers of the sglang plugin tests: a real sidecar process and real rank processes.

Tests that need sglang skip when it is not importable (the main .venv has no sglang: it needs torch
2.14.1, see scripts/setup-sglang.sh); run them with `.venv-sglang/bin/python -m pytest tests/sglang`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import grpc
from ghostserve.sidecar import client as client_mod

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("rank_worker.py")
GROUP = "test/sglang-g0"


def sglang_version() -> str | None:
    """The installed sglang distribution's version (None without sglang), read without importing it."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def wait_until(predicate, *, timeout: float, what: str) -> None:
    """Poll real state until `predicate()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclasses.dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    address: str
    log: pathlib.Path
    workdir: pathlib.Path

    def client(self) -> client_mod.SidecarClient:
        return client_mod.SidecarClient(self.address, timeout=30.0)


@contextlib.contextmanager
def run_sidecar() -> Iterator[Sidecar]:
    """A real `ghostserve sidecar` process on a Unix socket in a short temporary directory."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gs-sgl-", dir="/tmp"))
    prefix = f"gs-sgl{secrets.token_hex(3)}-"  # this sidecar's own segments: tests may run side by side
    sock = workdir / "sidecar.sock"
    log = workdir / "sidecar.log"
    cmd = [sys.executable, "-m", "ghostserve.cli.main", "sidecar", "--socket", str(sock), "--grace", "2",
           "--shm-prefix", prefix, "--budget", "64MiB"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    sc = Sidecar(proc, f"unix://{sock}", log, workdir)

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with client_mod.SidecarClient(sc.address, timeout=1.0) as c:
                return c.health() == 1
        except grpc.RpcError:
            return False

    try:
        wait_until(serving, timeout=60, what="the sidecar to serve")
        yield sc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        for p in sorted(workdir.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        workdir.rmdir()
    leaked = sorted(p.name for p in pathlib.Path("/dev/shm").glob(prefix + "*"))
    assert not leaked, f"the sidecar left pool segments behind: {leaked}"


def plugin_env(sidecar: Sidecar, *, rank: int, world: int, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "SGLANG_PLUGINS": "ghostserve",
        "GHOSTSERVE_SGLANG": "1",
        "GHOSTSERVE_SIDECAR": sidecar.address,
        "GHOSTSERVE_GROUP": GROUP,
        "GHOSTSERVE_CODE": "xor",
        "GHOSTSERVE_CHUNK_TOKENS": "16",
        "GHOSTSERVE_RANK": str(rank),
        "GHOSTSERVE_WORLD_SIZE": str(world),
        "PYTHONWARNINGS": "ignore",
    }
    env.update(extra)
    return env


class Rank:
    """tests/sglang/rank_worker.py running as a real process for one rank; talks JSON lines."""

    def __init__(self, sidecar: Sidecar, *, rank: int, world: int, env: dict[str, str] | None = None) -> None:
        self.rank = rank
        # stderr goes to a file: a pipe nobody reads while the rank works could fill up and block it.
        self.log = sidecar.workdir / f"rank{rank}-{os.getpid()}-{time.monotonic_ns()}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), "--rank", str(rank)],
                cwd=REPO,
                env=env or plugin_env(sidecar, rank=rank, world=world),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )

    def report(self) -> dict[str, Any]:
        """The next JSON report the rank prints; fails with its stderr if it exits first."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("REPORT "):
                return json.loads(line[len("REPORT ") :])
        raise AssertionError(f"rank {self.rank} exited with {self.proc.wait()}:\n{self.stderr()}")

    def send(self, **command: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def finish(self, *, timeout: float = 120) -> tuple[int, str]:
        """Close stdin (the rank exits after its current command); returns (exit code, stderr)."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        rc = self.proc.wait(timeout)
        return rc, self.stderr()

    def stderr(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
