"""What a codec backend provides: byte views of caller buffers and three bulk primitives.

The codes (`codes.py`) are written once on top of these; a backend only decides how bytes move. Every
view a backend returns is a flat uint8 array of its own library (numpy, torch, cupy) that supports
`view[a:b]` slicing without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import layout as kvlayout


class Backend(Protocol):
    """The contract every backend conforms to (checked by a conformance test)."""

    name: str
    # Bytes per row-chunk when running RDP schedules; large on GPUs (fewer launches), cache-sized on CPUs.
    rdp_chunk_bytes: int
    # Bytes per shard gathered at a time by the generic gather+encode path.
    gather_block_bytes: int

    def as_bytes(self, buf: Any, *, what: str, writable: bool) -> Any:
        """A flat uint8 view of `buf` sharing its memory. Raises `ShardTypeError` if that is impossible."""
        ...

    def device(self, view: Any) -> str:
        """Where `view` lives ("cpu", "cuda:0", ...): all buffers of one call must agree."""
        ...

    def empty(self, nbytes: int, *, like: Any) -> Any:
        """A new uninitialised flat uint8 buffer on `like`'s device."""
        ...

    def xor(self, out: Any, srcs: Sequence[Any]) -> None:
        """`out = srcs[0] ^ srcs[1] ^ ...` (at least one source, all of `out`'s size). Mutates `out`."""
        ...

    def gf_combine(self, matrix: npt.NDArray[np.uint8], srcs: Sequence[Any], outs: Sequence[Any]) -> None:
        """`outs[r] = XOR_j matrix[r, j] * srcs[j]` over GF(2^8) (poly 0x11D). Mutates `outs`."""
        ...

    def equal(self, a: Any, b: Any) -> bool:
        """True if the two views hold the same bytes."""
        ...

    def gather(
        self, pool: Any, layout: kvlayout.KVLayout, rows: npt.NDArray[np.int64], start: int, out: Any
    ) -> None:
        """Copy shard bytes `[start, start + len(out))` of the pool rows `rows` into `out`. Mutates `out`."""
        ...
