"""RDP: primes, row split, schedules for every erasure pattern, and parity by the textbook definition."""

from __future__ import annotations

import itertools

import ghostserve.kernels as gk
import numpy as np
import pytest
from ghostserve.kernels import rdp


def test_prime_for() -> None:
    assert [rdp.prime_for(n) for n in (1, 2, 3, 4, 5, 6, 10, 12, 16)] == [2, 3, 5, 5, 7, 7, 11, 13, 17]


def test_split_covers_the_shard() -> None:
    for n in range(1, 17):
        for size in (0, 1, 5, 97, 4096, 12345):
            row, tail = rdp.split(n, size)
            assert (rdp.prime_for(n) - 1) * row + tail == size and 0 <= tail < rdp.prime_for(n) - 1


@pytest.mark.parametrize("n", range(1, 17))
def test_every_pattern_of_up_to_two_losses_has_a_schedule(n: int) -> None:
    rows = rdp.prime_for(n) - 1
    for k in (1, 2):
        for lost in itertools.combinations(range(n + 2), k):
            steps = rdp.schedule(n, lost)
            targets = [t for t, _ in steps]
            assert sorted(targets) == sorted((s, r) for s in lost for r in range(rows))
            for _, sources in steps:
                assert sources and all(s not in lost or (s, r) in targets for s, r in sources)


def test_three_losses_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 2"):
        rdp.schedule(4, (0, 1, 2))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7])
def test_parity_matches_the_rdp_definition(n: int) -> None:
    p = rdp.prime_for(n)
    row = 13
    rng = np.random.default_rng(n)
    data = [rng.integers(0, 256, (p - 1) * row, dtype=np.uint8) for _ in range(n)]
    parity = [np.empty((p - 1) * row, np.uint8) for _ in range(2)]
    gk.Codec("rdp", n, backend="numpy").encode(data, parity)
    # Disks 0..p-2 are data (virtual zeros past n), disk p-1 row parity; block (r, i) is on diagonal (r+i)%p.
    disks = np.zeros((p, p - 1, row), np.uint8)
    for i, d in enumerate(data):
        disks[i] = d.reshape(p - 1, row)
    disks[p - 1] = np.bitwise_xor.reduce(disks[: p - 1], axis=0)
    diag = np.zeros((p, row), np.uint8)
    for i in range(p):
        for r in range(p - 1):
            diag[(r + i) % p] ^= disks[i, r]
    assert np.array_equal(parity[0].reshape(p - 1, row), disks[p - 1])
    assert np.array_equal(parity[1].reshape(p - 1, row), diag[: p - 1])
