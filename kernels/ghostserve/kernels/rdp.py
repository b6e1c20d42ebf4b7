"""Row-Diagonal Parity (Corbett et al., FAST 2004) as XOR schedules (pure, no I/O).

With a prime `p >= N + 1`, every shard is split into `p - 1` equal rows of `R = S // (p - 1)` bytes; data
disks `N .. p-2` are virtual zeros. Shard `N` holds row parity, shard `N + 1` diagonal parity: diagonal `d`
collects block `(row r, disk i)` of the data disks and the row-parity disk (disk index `p - 1`) where
`(r + i) mod p == d`; diagonal `p - 1` is not stored. The `S mod (p - 1)` tail bytes that do not fill a row
are protected by the `rs` code with M = 2 (they are fewer than `p - 1` bytes).

Encoding and every reconstruction are one routine: peel the row and diagonal equations, each time solving
one that has a single unknown block. The resulting schedule (target block = XOR of source blocks) depends
only on N and the erasure pattern, so it is cached.
"""

from __future__ import annotations

import functools

Block = tuple[int, int]  # (shard index in the stripe, row)
Step = tuple[Block, tuple[Block, ...]]


@functools.cache
def prime_for(n_data: int) -> int:
    """The smallest prime `p` with `p - 1 >= n_data`."""
    p = max(2, n_data + 1)
    while any(p % q == 0 for q in range(2, int(p**0.5) + 1)):
        p += 1
    return p


def split(n_data: int, nbytes: int) -> tuple[int, int]:
    """`(row_bytes, tail_bytes)` of a shard of `nbytes`: `(p - 1) * row_bytes + tail_bytes == nbytes`."""
    rows = prime_for(n_data) - 1
    return nbytes // rows, nbytes % rows


@functools.cache
def equations(n_data: int) -> tuple[tuple[Block, ...], ...]:
    """Every parity equation: the blocks in one tuple XOR to zero."""
    p = prime_for(n_data)
    row_parity, diag_parity = n_data, n_data + 1
    eqs: list[tuple[Block, ...]] = []
    for r in range(p - 1):
        eqs.append((*((i, r) for i in range(n_data)), (row_parity, r)))
    for d in range(p - 1):
        blocks = [(i, (d - i) % p) for i in range(n_data) if (d - i) % p != p - 1]
        if (d + 1) % p != p - 1:
            blocks.append((row_parity, (d + 1) % p))
        blocks.append((diag_parity, d))
        eqs.append(tuple(blocks))
    return tuple(eqs)


@functools.cache
def schedule(n_data: int, lost: tuple[int, ...]) -> tuple[Step, ...]:
    """Steps that rebuild every row of the shards `lost` (at most 2 indices of the N + 2) from the rest.

    Encoding is `schedule(N, (N, N + 1))`. Raises ValueError if more than two shards are lost.
    """
    if len(lost) > 2:
        raise ValueError(f"rdp rebuilds at most 2 shards, {len(lost)} are lost")
    rows = prime_for(n_data) - 1
    unknown = {(s, r) for s in lost for r in range(rows)}
    pending = [eq for eq in equations(n_data) if any(b in unknown for b in eq)]
    steps: list[Step] = []
    while unknown:
        progressed = False
        for eq in pending:
            missing = [b for b in eq if b in unknown]
            if len(missing) == 1:
                target = missing[0]
                steps.append((target, tuple(b for b in eq if b != target)))
                unknown.discard(target)
                progressed = True
        pending = [eq for eq in pending if any(b in unknown for b in eq)]
        if not progressed:
            raise AssertionError(f"rdp peeling stalled for N={n_data}, lost={lost}")  # a bug, not input
    return tuple(steps)
