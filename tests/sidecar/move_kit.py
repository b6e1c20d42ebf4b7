"""Helpers of the move tests: a group filled with known KV on a real sidecar, and a TCP proxy that
drops the connection after a given number of bytes (a network failure in the middle of a move)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections.abc import Callable

import numpy as np
from ghostserve.sidecar import client, pools
from ghostserve.v1 import sidecar_pb2 as pb

CHUNK = 64
# 4 layers x 4 heads x 64 dims of fp16 = 512-byte rows, 2048 slots: a 8 MiB pool per rank.
LAYOUT = pb.KVLayout(layers=4, kv_heads=4, head_dim=64, dtype=pb.FLOAT16, page_size=16, pool_slots=2048)
PROTECTION = pb.Protection(code=pb.RS, parity_shards=1, chunk_tokens=CHUNK)


@dataclasses.dataclass
class Filled:
    group: str
    world: int
    pools: list[np.ndarray]  # what each rank wrote (copies)
    requests: dict[str, list[int]]  # request id -> token ids recorded
    slots: dict[str, list[list[int]]]  # request id -> slots of each chunk


def fill_group(
    c: client.SidecarClient, group: str, *, world: int = 2, seed: int = 0, requests: int = 3
) -> Filled:
    """Attach every rank as an engine would, write random KV, commit chunks, record tokens, detach."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(LAYOUT.pool_slots).tolist()
    plan = {
        f"req-{i}": [perm[(2 * i + k) * CHUNK : (2 * i + k + 1) * CHUNK] for k in range(2)]
        for i in range(requests)
    }
    out = Filled(group, world, [], {}, plan)
    maps = []
    for rank in range(world):
        reply = c.attach(
            group=group,
            rank=rank,
            world_size=world,
            layout=LAYOUT,
            protection=PROTECTION,
            worker_id=f"engine-{rank}",
            device_uuid=f"GPU-src-{rank}",
        )
        mm, pool = pools.map_pool(reply.pool)
        pool[:] = rng.integers(0, 256, pool.size, dtype=np.uint8)
        out.pools.append(pool.copy())
        maps.append((mm, pool))
    for rid, chunks in plan.items():
        tokens = [int(t) for t in rng.integers(0, 32000, 2 * CHUNK + 5)]
        for idx, slots in enumerate(chunks):
            for rank in range(world):
                c.commit_chunk(
                    group=group,
                    rank=rank,
                    request_id=rid,
                    chunk_index=idx,
                    slots=slots,
                    token_ids=tokens[idx * CHUNK : (idx + 1) * CHUNK],
                )
        c.record_tokens(group=group, request_id=rid, token_ids=tokens, prompt_tokens=7, max_new_tokens=99)
        out.requests[rid] = tokens
    for rank in range(world):
        c.detach(group=group, rank=rank)
    del maps
    assert c.flush(group, wait=60).drained
    return out


def read_pools(c: client.SidecarClient, group: str) -> list[np.ndarray]:
    """Each rank's pool bytes, mapped from the handles DescribeGroup reports."""
    out = []
    for r in c.describe_group(group=group).ranks:
        mm, pool = pools.map_pool(r.pool)
        out.append(pool.copy())
        del pool
        mm.close()
    return out


class CuttingProxy:
    """Loopback TCP proxy to `upstream_port` that forwards until `cut_after` bytes went upstream, then
    shuts both connections down (once; later connections pass everything). With `stall`, it stops
    forwarding instead and drops the connection only when the client's side closes (a source killed
    mid-move, at a byte position the test controls)."""

    def __init__(self, upstream_port: int, cut_after: int, *, stall: bool = False) -> None:
        self.upstream = upstream_port
        self.cut_after = cut_after
        self.stall = stall
        self.forwarded = 0
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._socks += [conn, up]
            threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if upstream and not self.cut.is_set():
                    with self._lock:
                        self.forwarded += len(data)
                        over = self.forwarded > self.cut_after
                    if over:
                        self.cut.set()
                        if self.stall:
                            while src.recv(1 << 16):  # swallow until the client dies
                                pass
                        for s in (src, dst):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Drop every connection (shutdown wakes the pump threads blocked in recv; close alone
        would not, and the client would never see the connection go)."""
        self.listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def move_in_background(
    source: Callable[..., client.SidecarClient], group: str, port: int
) -> tuple[threading.Thread, list[BaseException]]:
    """MoveGroup `group` from the sidecar `source` opens clients of to 127.0.0.1:`port` on a started
    thread; the list receives what the call raised (the tests kill one side under it)."""
    errors: list[BaseException] = []

    def move() -> None:
        try:
            with source(timeout=120) as s:
                s.move_group(group=group, target=f"127.0.0.1:{port}", piece_bytes=128 * 1024)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=move)
    t.start()
    return t, errors
