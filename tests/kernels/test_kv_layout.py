"""KVLayout validation, shard math, gather/scatter against NumPy fancy indexing."""

from __future__ import annotations

import ghostserve.kernels as gk
import numpy as np
import pytest
from ghostserve.kernels import layout as kvlayout
from hypothesis import given, settings
from hypothesis import strategies as st

LAYOUT = gk.KVLayout(layers=3, kv_heads=2, head_dim=5, dtype="float16", page_size=16, pool_slots=40)


def reference_shard(pool: np.ndarray, layout: gk.KVLayout, slots: np.ndarray) -> np.ndarray:
    return pool.reshape(layout.planes, layout.pool_slots, layout.row_bytes)[:, slots, :].reshape(-1).copy()


def test_layout_properties() -> None:
    assert LAYOUT.itemsize == 2
    assert LAYOUT.row_bytes == 2 * 5 * 2
    assert LAYOUT.pool_nbytes == 3 * 2 * 40 * 20
    assert LAYOUT.shard_nbytes(7) == 3 * 2 * 7 * 20
    assert gk.KVLayout(1, 1, 1, "float8", 1, 1).row_bytes == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": 0}, "layers must be a positive int"),
        ({"kv_heads": -1}, "kv_heads must be a positive int"),
        ({"head_dim": 2.0}, "head_dim must be a positive int"),
        ({"pool_slots": True}, "pool_slots must be a positive int"),
        ({"dtype": "int4"}, "dtype must be one of"),
    ],
)
def test_layout_rejects_bad_fields(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "layers": 2,
        "kv_heads": 1,
        "head_dim": 4,
        "dtype": "bfloat16",
        "page_size": 1,
        "pool_slots": 8,
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        gk.KVLayout(**fields)  # type: ignore[arg-type]


def test_layout_is_frozen() -> None:
    with pytest.raises(AttributeError):
        LAYOUT.layers = 4  # type: ignore[misc]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_slots=st.integers(0, 40))
def test_gather_matches_fancy_indexing_and_scatter_inverts_it(seed: int, n_slots: int) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, LAYOUT.pool_nbytes, dtype=np.uint8)
    slots = rng.permutation(LAYOUT.pool_slots)[:n_slots]
    out = np.full(LAYOUT.shard_nbytes(n_slots), 0xA5, np.uint8)
    gk.gather_shard(pool.view(np.float16), LAYOUT, slots, out)
    assert np.array_equal(out, reference_shard(pool, LAYOUT, slots))
    target = rng.integers(0, 256, LAYOUT.pool_nbytes, dtype=np.uint8)
    expected = target.copy().reshape(LAYOUT.planes, LAYOUT.pool_slots, LAYOUT.row_bytes)
    expected[:, slots, :] = out.reshape(LAYOUT.planes, n_slots, LAYOUT.row_bytes)
    gk.scatter_shard(out, LAYOUT, slots, target)
    assert np.array_equal(target, expected.reshape(-1))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_gather_range_any_byte_range(seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, LAYOUT.pool_nbytes, dtype=np.uint8)
    slots = rng.integers(0, LAYOUT.pool_slots, 9)  # repeats are fine for a gather
    full = reference_shard(pool, LAYOUT, slots)
    start = data.draw(st.integers(0, full.size))
    stop = data.draw(st.integers(start, full.size))
    out = np.empty(stop - start, np.uint8)
    kvlayout.gather_range(pool, LAYOUT, kvlayout.pool_rows(LAYOUT, slots), start, out)
    assert np.array_equal(out, full[start:stop])


@pytest.mark.parametrize("slots", [[0, 40], [-1], [3, 100]])
def test_out_of_range_slot_is_rejected_and_out_untouched(slots: list[int]) -> None:
    pool = np.zeros(LAYOUT.pool_nbytes, np.uint8)
    out = np.full(LAYOUT.shard_nbytes(len(slots)), 7, np.uint8)
    with pytest.raises(gk.CodecError, match=r"slot -?\d+ at position \d+ is out of range \[0, 40\)"):
        gk.gather_shard(pool, LAYOUT, slots, out)
    assert (out == 7).all()
    with pytest.raises(gk.CodecError, match="out of range"):
        gk.scatter_shard(out, LAYOUT, slots, pool)
    assert (pool == 0).all()


def test_bad_buffers_are_rejected() -> None:
    pool = np.zeros(LAYOUT.pool_nbytes, np.uint8)
    out = np.zeros(LAYOUT.shard_nbytes(2), np.uint8)
    with pytest.raises(gk.ShardSizeError, match=r"pool has 10 bytes, layout needs 4800"):
        gk.gather_shard(pool[:10], LAYOUT, [1, 2], out)
    with pytest.raises(gk.ShardSizeError, match=r"out has 80 bytes, 2 slots need 240"):
        gk.gather_shard(pool, LAYOUT, [1, 2], out[:80])
    with pytest.raises(gk.ShardTypeError, match="C-contiguous"):
        gk.gather_shard(pool.reshape(2, -1)[:, ::2], LAYOUT, [1, 2], out)
    with pytest.raises(gk.ShardTypeError, match="numpy array"):
        gk.gather_shard(list(pool), LAYOUT, [1, 2], out)
    with pytest.raises(gk.CodecError, match="slots must be 1-D"):
        gk.gather_shard(pool, LAYOUT, [[1, 2]], out)
    with pytest.raises(gk.CodecError, match="slots must be integers"):
        gk.gather_shard(pool, LAYOUT, [1.0, 2.0], out)
    readonly = np.zeros(LAYOUT.pool_nbytes, np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(gk.ShardTypeError, match="read-only"):
        gk.scatter_shard(out, LAYOUT, [1, 2], readonly)


def test_scatter_rejects_repeated_slots() -> None:
    pool = np.zeros(LAYOUT.pool_nbytes, np.uint8)
    shard = np.ones(LAYOUT.shard_nbytes(2), np.uint8)
    with pytest.raises(gk.CodecError, match="slots repeat"):
        gk.scatter_shard(shard, LAYOUT, [4, 4], pool)
    assert (pool == 0).all()
