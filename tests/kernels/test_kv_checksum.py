"""checksum() is xxh3-64 of the raw bytes, whatever holds them."""

from __future__ import annotations

import ghostserve.kernels as gk
import numpy as np
import pytest
import xxhash


def test_checksum_is_xxh3_of_the_bytes() -> None:
    raw = np.random.default_rng(0).integers(0, 256, 1001, dtype=np.uint8)
    want = xxhash.xxh3_64_intdigest(raw.tobytes())
    assert gk.checksum(raw) == want
    assert gk.checksum(raw.tobytes()) == want
    assert gk.checksum(bytearray(raw.tobytes())) == want
    assert gk.checksum(raw[:1000].view(np.float16)) == xxhash.xxh3_64_intdigest(raw[:1000].tobytes())
    flipped = raw.copy()
    flipped[500] ^= 1
    assert gk.checksum(flipped) != want


def test_checksum_of_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(33, dtype=torch.bfloat16)
    assert gk.checksum(t) == xxhash.xxh3_64_intdigest(t.view(torch.uint8).numpy().tobytes())


def test_checksum_rejects_non_contiguous() -> None:
    with pytest.raises(gk.ShardTypeError, match="C-contiguous"):
        gk.checksum(np.zeros(10, np.uint8)[::2])
