"""Buffers the CPU backend allocates start on a 64-byte boundary, so ISA-L's XOR (32-byte aligned starts
only) runs on them; NumPy's own large allocations start 16 bytes into their block and never did."""

from __future__ import annotations

from typing import Any

import ghostserve.kernels
import numpy as np
import pytest
from ghostserve.kernels import cpu
from ghostserve.kernels import layout as kvlayout


@pytest.mark.parametrize("nbytes", [0, 1, 63, 64, 65, 4096, (1 << 20) + 3])
@pytest.mark.parametrize("zero", [False, True])
def test_aligned_empty_is_aligned_sized_and_writable(nbytes: int, zero: bool) -> None:
    buf = cpu.aligned_empty(nbytes, zero=zero)
    assert buf.dtype == np.uint8 and buf.shape == (nbytes,) and buf.flags.c_contiguous
    assert nbytes == 0 or buf.ctypes.data % cpu.ALIGN == 0
    if zero:
        assert not buf.any()
    buf[:] = 7
    assert (buf == 7).all()


class XorSpy:
    """Counts calls into ISA-L's xor_gen (the real one still runs)."""

    def __init__(self, be: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = be._isal.xor_gen_at

        def spy(addresses: Any, length: int) -> None:
            self.calls += 1
            real(addresses, length)

        monkeypatch.setattr(be._isal, "xor_gen_at", spy)


@pytest.fixture
def isal_backend() -> cpu.CpuBackend:
    be = cpu.CpuBackend()
    if not be.isal:
        pytest.skip("libisal is not installed: the NumPy XOR runs on any alignment")
    return be


def test_xor_of_aligned_buffers_runs_in_isal_and_matches_numpy(
    isal_backend: cpu.CpuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = XorSpy(isal_backend, monkeypatch)
    rng = np.random.default_rng(3)
    n = (256 << 10) + 40  # a tail past the last 32-byte multiple goes through NumPy
    srcs = [cpu.aligned_empty(n) for _ in range(4)]
    for s in srcs:
        s[:] = rng.integers(0, 256, n, dtype=np.uint8)
    out = isal_backend.empty(n, like=srcs[0])
    isal_backend.xor(out, srcs)
    assert spy.calls == 1
    assert np.array_equal(out, srcs[0] ^ srcs[1] ^ srcs[2] ^ srcs[3])
    # Misaligned views still give the right bytes, through NumPy.
    isal_backend.xor(out[1:], [s[1:] for s in srcs])
    assert spy.calls == 1
    assert np.array_equal(out[1:], (srcs[0] ^ srcs[1] ^ srcs[2] ^ srcs[3])[1:])


def test_encode_gather_into_aligned_parity_uses_isal_for_every_block(
    isal_backend: cpu.CpuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = kvlayout.KVLayout(2, 2, 64, "float16", 16, 1024)
    codec = ghostserve.kernels.Codec("xor", 3, 1, backend="cpu")
    spy = XorSpy(codec._be, monkeypatch)
    pools = [np.random.default_rng(r).integers(0, 256, lay.pool_nbytes, dtype=np.uint8) for r in range(3)]
    slots = np.random.default_rng(9).permutation(lay.pool_slots)[:512]
    size = lay.shard_nbytes(slots.size)
    parity = cpu.aligned_empty(size)
    codec.encode_gather(pools, lay, slots, [parity])
    assert spy.calls == -(-size // min(size, codec._be.gather_block_bytes))
    gathered = []
    for p in pools:
        out = np.empty(size, np.uint8)
        kvlayout.gather_shard(p, lay, slots, out)
        gathered.append(out)
    assert np.array_equal(parity, gathered[0] ^ gathered[1] ^ gathered[2])
