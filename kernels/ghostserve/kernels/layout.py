"""KV-pool layout of one tensor-parallel rank and the shard order the codecs work on.

A rank's pool is one contiguous byte buffer viewed as `[layers][2 (k|v)][pool_slots][row_bytes]`; a shard of
one chunk is the pool rows at the chunk's slots in the order `[layer][k|v][token][row_bytes]`. Nothing here
interprets the bytes, so every float bit pattern survives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import errors

ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float8": 1, "float32": 4}


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Shape of one rank's KV pool. `dtype` is one of `ITEMSIZE` (fp8 is stored as uint8)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    pool_slots: int

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "page_size", "pool_slots"):
            value = getattr(self, name)
            # bool is an int subclass: True layers is a bug, not a layer count.
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(ITEMSIZE)}, got {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one token of one layer's K (or V)."""
        return self.kv_heads * self.head_dim * self.itemsize

    @property
    def planes(self) -> int:
        """Number of `[slots][row_bytes]` planes in the pool: K and V of every layer."""
        return 2 * self.layers

    @property
    def pool_nbytes(self) -> int:
        return self.planes * self.pool_slots * self.row_bytes

    def shard_nbytes(self, tokens: int) -> int:
        """Bytes of one rank's shard of a chunk of `tokens` tokens."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        return self.planes * tokens * self.row_bytes


def check_slots(layout: KVLayout, slots: Any) -> npt.NDArray[np.int64]:
    """Return `slots` as a 1-D int64 array; raise `CodecError` for a bad shape, dtype or out-of-range slot."""
    arr = np.asarray(slots)
    if arr.ndim != 1:
        raise errors.CodecError(f"slots must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise errors.CodecError(f"slots must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        bad = np.flatnonzero((arr < 0) | (arr >= layout.pool_slots))
        if bad.size:
            i = int(bad[0])
            raise errors.CodecError(
                f"slot {int(arr[i])} at position {i} is out of range [0, {layout.pool_slots})"
            )
    return arr


def pool_rows(layout: KVLayout, slots: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Pool row index (in units of `row_bytes`) of every shard row, in shard order."""
    plane_base = np.arange(layout.planes, dtype=np.int64) * layout.pool_slots
    return (plane_base[:, None] + slots[None, :]).reshape(-1)


def _host_bytes(buf: Any, *, what: str, writable: bool) -> npt.NDArray[np.uint8]:
    if not isinstance(buf, np.ndarray):
        raise errors.ShardTypeError(f"{what} must be a numpy array, got {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise errors.ShardTypeError(f"{what} must be C-contiguous")
    if writable and not buf.flags.writeable:
        raise errors.ShardTypeError(f"{what} is read-only")
    return buf.reshape(-1).view(np.uint8)


def _check_pool(pool: Any, layout: KVLayout, *, writable: bool) -> npt.NDArray[np.uint8]:
    flat = _host_bytes(pool, what="pool", writable=writable)
    if flat.size != layout.pool_nbytes:
        raise errors.ShardSizeError(f"pool has {flat.size} bytes, layout needs {layout.pool_nbytes}")
    return flat


def _np_take(pool2d: Any, idx: npt.NDArray[np.int64], out2d: Any) -> None:
    # mode="clip": with the default "raise", numpy buffers `out` (an extra copy); slots are validated already.
    pool2d.take(idx, axis=0, out=out2d, mode="clip")  # the method: np.take's wrapper costs a fifth more


def gather_range(
    pool: Any,
    layout: KVLayout,
    rows: npt.NDArray[np.int64],
    start: int,
    out: Any,
    *,
    take: Callable[[Any, npt.NDArray[np.int64], Any], None] = _np_take,
) -> None:
    """Copy shard bytes `[start, start + len(out))` from `pool` into `out` (both flat uint8, unchecked).

    `rows` is `pool_rows(layout, slots)`. Mutates `out` only. Partial rows at either end are sliced; the
    whole rows in between move with one `take(pool2d, row_indices, out2d)` (NumPy by default; the torch and
    cupy backends pass their own, the slicing works the same on their arrays).
    """
    rb = layout.row_bytes
    stop = start + int(out.shape[0])
    pos = start
    written = 0
    pool2d = pool.reshape(-1, rb)
    while pos < stop:
        row, col = divmod(pos, rb)
        if col == 0 and stop - pos >= rb:
            whole = (stop - pos) // rb
            dst = out[written : written + whole * rb].reshape(whole, rb)
            take(pool2d, rows[row : row + whole], dst)
            step = whole * rb
        else:
            step = min(rb - col, stop - pos)
            out[written : written + step] = pool2d[int(rows[row]), col : col + step]
        pos += step
        written += step


def gather_shard(pool: Any, layout: KVLayout, slots: Any, out: Any) -> None:
    """Copy the shard of `slots` from `pool` (a rank's whole pool, any dtype, C-contiguous) into `out`.

    Mutates `out` only. Raises `ShardTypeError` for a non-array / non-contiguous / read-only buffer,
    `ShardSizeError` if `pool` or `out` does not match the layout, `CodecError` for bad slots.
    """
    flat = _check_pool(pool, layout, writable=False)
    dst = _host_bytes(out, what="out", writable=True)
    slot_arr = check_slots(layout, slots)
    need = layout.shard_nbytes(slot_arr.size)
    if dst.size != need:
        raise errors.ShardSizeError(f"out has {dst.size} bytes, {slot_arr.size} slots need {need}")
    if need:
        gather_range(flat, layout, pool_rows(layout, slot_arr), 0, dst)


def scatter_shard(shard: Any, layout: KVLayout, slots: Any, pool: Any) -> None:
    """Write `shard` (canonical order) into the pool rows at `slots`; the inverse of `gather_shard`.

    Mutates `pool` only. Same errors as `gather_shard`; additionally `CodecError` for repeated slots,
    which would make the result depend on write order.
    """
    src = _host_bytes(shard, what="shard", writable=False)
    flat = _check_pool(pool, layout, writable=True)
    slot_arr = check_slots(layout, slots)
    need = layout.shard_nbytes(slot_arr.size)
    if src.size != need:
        raise errors.ShardSizeError(f"shard has {src.size} bytes, {slot_arr.size} slots need {need}")
    if np.unique(slot_arr).size != slot_arr.size:
        raise errors.CodecError("slots repeat: a scatter would write one pool row twice")
    if need:
        pool2d = flat.reshape(-1, layout.row_bytes)
        pool2d[pool_rows(layout, slot_arr)] = src.reshape(-1, layout.row_bytes)
