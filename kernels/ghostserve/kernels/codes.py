"""The three codes written once on top of a backend's primitives (inputs already validated).

All functions take flat byte views from the backend, write only the views they are given as outputs and
return nothing. Shard indices: `0 .. N-1` data, `N .. N+M-1` parity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash
from ghostserve.kernels import backend as backend_mod
from ghostserve.kernels import checksums, gf256, rdp
from ghostserve.kernels import layout as kvlayout

Backend = backend_mod.Backend
BlockView = Callable[[int, int, int, int], Any]  # (shard, row, a, b) -> bytes [a, b) of that row


def encode(code: str, be: Backend, data: Sequence[Any], parity: Sequence[Any], size: int) -> None:
    if size == 0:
        return
    n = len(data)
    if code == "xor":
        be.xor(parity[0], data)
    elif code == "rs":
        be.gf_combine(gf256.cauchy_parity(n, len(parity)), data, parity)
    else:
        shards = [*data, *parity]
        _rdp_run(be, n, (n, n + 1), _whole_rows(shards, n, size), size)
        _rdp_tail(be, n, (n, n + 1), shards, size)


def reconstruct(
    code: str,
    be: Backend,
    shards: Sequence[Any],
    n: int,
    lost: Sequence[int],
    size: int,
    *,
    wanted: Sequence[int] | None = None,
) -> None:
    """Rebuild `shards[i]` for every `i` in `wanted` (default: all of `lost`); `shards` has views of all
    N + M. xor and rs touch only the wanted views; rdp peels through every lost one (all writable)."""
    targets = list(lost if wanted is None else wanted)
    if size == 0 or not targets:
        return
    m = len(shards) - n
    if code == "xor":
        be.xor(shards[lost[0]], [s for i, s in enumerate(shards) if i != lost[0]])
    elif code == "rs":
        lost_set = set(lost)
        survivors = tuple(i for i in range(n + m) if i not in lost_set)[:n]
        matrix = gf256.decode_matrix(n, m, survivors, tuple(targets))
        be.gf_combine(matrix, [shards[i] for i in survivors], [shards[i] for i in targets])
    else:
        _rdp_run(be, n, tuple(sorted(lost)), _whole_rows(shards, n, size), size)
        _rdp_tail(be, n, tuple(sorted(lost)), shards, size)


def _whole_rows(shards: Sequence[Any], n: int, size: int) -> BlockView:
    row_bytes, _ = rdp.split(n, size)

    def view(s: int, r: int, a: int, b: int) -> Any:
        return shards[s][r * row_bytes + a : r * row_bytes + b]

    return view


def _rdp_run(be: Backend, n: int, lost: tuple[int, ...], view: BlockView, size: int) -> None:
    row_bytes, _ = rdp.split(n, size)
    steps = rdp.schedule(n, lost)
    chunk = be.rdp_chunk_bytes
    for a in range(0, row_bytes, chunk):
        b = min(a + chunk, row_bytes)
        for (ts, tr), sources in steps:
            be.xor(view(ts, tr, a, b), [view(s, r, a, b) for s, r in sources])


def _rdp_tail(be: Backend, n: int, lost: tuple[int, ...], shards: Sequence[Any], size: int) -> None:
    # The bytes past the last whole row are too few to split into p - 1 rows: RS(N, 2) covers them.
    _, tail = rdp.split(n, size)
    if tail == 0:
        return
    start = size - tail
    tails = [s[start:] for s in shards]
    if lost == (n, n + 1):
        be.gf_combine(gf256.cauchy_parity(n, 2), tails[:n], tails[n:])
    else:
        reconstruct("rs", be, tails, n, lost, tail)


def encode_gather(
    code: str,
    be: Backend,
    pools: Sequence[Any],
    layout: kvlayout.KVLayout,
    slots: npt.NDArray[np.int64],
    parity: Sequence[Any],
    size: int,
    checksums_out: list[int] | None = None,
) -> None:
    """Encode the shards at `slots` of every pool into `parity`: fused in one kernel where the backend
    can (`encode_gather_fused`, cuda), else gathering a cache-sized block at a time. With
    `checksums_out`, also fill it with each data shard's xxh3-64 (`checksums.checksum` of the gathered
    shard): host blocks are hashed right after their gather, while they are in cache; other paths
    (fused, RDP's column order, device memory) hash the shard in a second pass."""
    n = len(pools)
    hashers = [xxhash.xxh3_64() for _ in pools] if checksums_out is not None else None
    rows = kvlayout.pool_rows(layout, slots)
    done = size == 0
    if not done and code in ("xor", "rs"):
        fused = getattr(be, "encode_gather_fused", None)
        matrix = gf256.cauchy_parity(n, len(parity)) if code == "rs" else None
        done = fused is not None and fused(code, matrix, pools, layout, slots, parity)
        if not done:
            block = min(size, be.gather_block_bytes)
            scratch = [be.empty(block, like=parity[0]) for _ in range(n)]
            if hashers is not None and not isinstance(scratch[0], np.ndarray):
                hashers = None  # device blocks: hashed below from the pools instead
            for start in range(0, size, block):
                length = min(block, size - start)
                srcs = [s[:length] for s in scratch]
                for i, (pool, src) in enumerate(zip(pools, srcs, strict=True)):
                    be.gather(pool, layout, rows, start, src)
                    if hashers is not None:
                        hashers[i].update(src)
                encode(code, be, srcs, [p[start : start + length] for p in parity], length)
            if hashers is not None and checksums_out is not None:
                checksums_out[:] = [int(h.intdigest()) for h in hashers]
                return
            done = True
    if not done:
        _rdp_encode_gather(be, pools, layout, rows, parity, size)
    if checksums_out is not None:
        checksums_out[:] = [_shard_checksum(be, pool, layout, slots, size) for pool in pools]


def _shard_checksum(be: Backend, pool: Any, layout: kvlayout.KVLayout, slots: Any, size: int) -> int:
    if isinstance(pool, np.ndarray):
        return checksums.shard_checksum(pool, layout, np.asarray(slots, np.int64))
    shard = be.empty(size, like=pool)  # device memory: gather, then hash a host copy
    be.gather(pool, layout, kvlayout.pool_rows(layout, slots), 0, shard)
    return checksums.checksum(shard)


def _rdp_encode_gather(
    be: Backend,
    pools: Sequence[Any],
    layout: kvlayout.KVLayout,
    rows: npt.NDArray[np.int64],
    parity: Sequence[Any],
    size: int,
) -> None:
    n = len(pools)
    row_bytes, tail = rdp.split(n, size)
    nrows = rdp.prime_for(n) - 1
    # One scratch per rank holding the current column chunk of each of its p - 1 rows: a gather block.
    chunk = max(1, min(be.rdp_chunk_bytes, be.gather_block_bytes // nrows, row_bytes))
    scratch = [be.empty(nrows * chunk, like=parity[0]) for _ in range(n)]
    steps = rdp.schedule(n, (n, n + 1))
    for a in range(0, row_bytes, chunk):
        b = min(a + chunk, row_bytes)
        width = b - a
        for j, pool in enumerate(pools):
            for r in range(nrows):
                be.gather(pool, layout, rows, r * row_bytes + a, scratch[j][r * width : (r + 1) * width])

        def view(s: int, r: int, lo: int, hi: int, *, width: int = width, a: int = a) -> Any:
            if s < n:
                return scratch[s][r * width + lo - a : r * width + hi - a]
            return parity[s - n][r * row_bytes + lo : r * row_bytes + hi]

        for (ts, tr), sources in steps:
            be.xor(view(ts, tr, a, b), [view(s, r, a, b) for s, r in sources])
    if tail:
        start = size - tail
        srcs = [be.empty(tail, like=parity[0]) for _ in range(n)]
        for pool, src in zip(pools, srcs, strict=True):
            be.gather(pool, layout, rows, start, src)
        be.gf_combine(gf256.cauchy_parity(n, 2), srcs, [p[start:] for p in parity])
