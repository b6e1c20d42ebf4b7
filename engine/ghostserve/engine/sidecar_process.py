"""Run a real sidecar (``ghostserve sidecar``) as a child process on a Unix socket: demo, tests, bench."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
from ghostserve.sidecar import client as client_mod


class SidecarProcess:
    """A sidecar child process. ``start`` waits until it serves; ``kill`` is a crash (SIGKILL);
    ``stop`` a graceful shutdown that frees its pools. Mutates only the child and its directory."""

    def __init__(
        self, workdir: pathlib.Path, *, budget: str = "1GiB", extra_args: tuple[str, ...] = ()
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / "sidecar.sock"
        self.address = f"unix://{self.socket}"
        self.budget = budget
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "sidecar.log"

    def start(self, *, timeout_s: float = 60.0) -> None:
        """Start the sidecar and wait until its health check answers. Raises RuntimeError if it exits."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "ghostserve.cli.main",
            "sidecar",
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.workdir / "state"),
            "--budget",
            self.budget,
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        proc = self.proc
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {proc.returncode}; log: {self.log_tail()}")
            # A fresh channel per try: one that failed to connect waits out gRPC's reconnect backoff
            # (1 s and growing), so a reused one would notice the sidecar seconds after it serves.
            try:
                with client_mod.SidecarClient(self.address, timeout=2.0) as client:
                    client.wait_ready(timeout=0.5)
                    client.health()
                    return
            except (grpc.FutureTimeoutError, grpc.RpcError):
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"sidecar did not come up in {timeout_s}s: {self.log_tail()}"
                    ) from None

    def kill(self) -> None:
        """Crash the sidecar (SIGKILL): pools stay in /dev/shm, parity in its memory is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.proc = None

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Graceful shutdown (SIGTERM); SIGKILL after ``timeout_s``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""
