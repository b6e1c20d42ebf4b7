"""Shared test helpers: layouts, deterministic pool contents, and a real sidecar process."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
from ghostserve.sidecar import client
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.wire import protection as wire_protection

REPO = pathlib.Path(__file__).resolve().parents[2]
CODES = wire_protection.CODE_IDS
# 2 layers x 2 heads x 16 dims of fp16: 64-byte rows; a 16-token chunk is a 4 KiB shard.
LAYOUT = pb.KVLayout(layers=2, kv_heads=2, head_dim=16, dtype=pb.FLOAT16, page_size=16, pool_slots=256)
ROW_BYTES = 64
CHUNK = 16


def protection(code: str, m: int = 0, chunk: int = CHUNK) -> pb.Protection:
    return pb.Protection(code=CODES[code], parity_shards=m, chunk_tokens=chunk)


def pool_content(seed: int, nbytes: int) -> np.ndarray:
    """What worker `seed` writes into its pool: random bytes, every float bit pattern included."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def shard(pool: np.ndarray, slots: list[int], *, layout: pb.KVLayout = LAYOUT) -> np.ndarray:
    """The pool rows at `slots`, canonical order [plane][token][row]."""
    rb = layout.kv_heads * layout.head_dim * 2
    return pool.reshape(2 * layout.layers, layout.pool_slots, rb)[:, slots, :].copy()


def wait_until(predicate, *, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll real state until `predicate()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclasses.dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    address: str
    log: pathlib.Path

    def client(self, **kw: object) -> client.SidecarClient:
        return client.SidecarClient(self.address, **kw)  # type: ignore[arg-type]

    def terminate(self, *, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def start_sidecar(
    workdir: pathlib.Path,
    *args: str,
    prefix: str,
    listen: str | None = None,
    name: str = "sidecar",
    ready_timeout: float = 30.0,
    client_kw: dict[str, object] | None = None,
) -> Sidecar:
    """Run `python -m ghostserve.cli.main sidecar` and wait until its health service answers SERVING."""
    log = workdir / f"{name}.log"
    if listen:
        where, address = ["--listen", listen], listen
        if "--tls-cert" not in args:
            where.append("--insecure")
    else:
        sock = workdir / "run" / "sidecar.sock"
        where, address = ["--socket", str(sock)], f"unix://{sock}"
    cmd = [
        sys.executable,
        "-m",
        "ghostserve.cli.main",
        "sidecar",
        *where,
        "--fake-nvml",
        "2",
        "--grace",
        "2",
        "--shm-prefix",
        prefix,
        *args,
    ]
    env = {**os.environ, "GHOSTSERVE_LOG_LEVEL": "INFO"}
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    sc = Sidecar(proc, address, log)

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with sc.client(timeout=1.0, **(client_kw or {})) as c:
                return c.health() == 1
        except grpc.RpcError:
            return False

    wait_until(serving, timeout=ready_timeout, what="the sidecar to serve")
    return sc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
