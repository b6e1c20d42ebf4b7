"""KV pool views over sidecar-held memory and the page allocator shared by every rank.

The pool of one rank is one contiguous byte buffer laid out [L][2][slots][H][D] (docs/contracts.md).
The reference engine stores float32 KV; codes never interpret it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from ghostserve.engine.reference import config as config_mod
from ghostserve.kernels import layout as layout_mod

DTYPE = "float32"


class PoolFullError(RuntimeError):
    """No free pages left for a request."""


class PoolShape(layout_mod.KVLayout):
    """Geometry of one rank's pool: a float32 `KVLayout` (its size math); the same on every rank."""

    @classmethod
    def for_model(cls, cfg: config_mod.ModelConfig, *, tp: int, pool_slots: int, page_size: int) -> PoolShape:
        if pool_slots % page_size:
            raise config_mod.ConfigError(
                f"pool_slots {pool_slots} must be a multiple of page_size {page_size}"
            )
        return cls(cfg.layers, cfg.kv_heads_per_rank(tp), cfg.head_dim, DTYPE, page_size, pool_slots)

    @property
    def nbytes(self) -> int:
        return self.pool_nbytes


def as_tensor(buf: np.ndarray, shape: PoolShape) -> torch.Tensor:
    """A float32 tensor [L, 2, slots, H, D] sharing ``buf``'s memory (no copy)."""
    if buf.nbytes < shape.nbytes:
        raise ValueError(f"pool buffer has {buf.nbytes} bytes, layout needs {shape.nbytes}")
    flat = torch.from_numpy(buf[: shape.nbytes].view(np.float32))
    return flat.view(shape.layers, 2, shape.pool_slots, shape.kv_heads, shape.head_dim)


def shard_bytes(buf: np.ndarray, shape: PoolShape, slots: list[int]) -> bytes:
    """Canonical shard [layer][k|v][token][row] of the given slots, as bytes (a copy)."""
    rows = buf[: shape.nbytes].reshape(shape.layers * 2, shape.pool_slots, shape.row_bytes)
    return rows[:, np.asarray(slots, dtype=np.int64), :].tobytes()


def chunk_digests(buf: np.ndarray, shape: PoolShape, slots: list[int], chunk_tokens: int) -> list[str]:
    """sha256 of each chunk's shard (the last entry covers a partial tail, if any)."""
    return [
        hashlib.sha256(shard_bytes(buf, shape, slots[i : i + chunk_tokens])).hexdigest()
        for i in range(0, len(slots), chunk_tokens)
    ]


class PageAllocator:
    """Hands out fixed-size pages of slots; deterministic (lowest free page first).

    Mutates only itself. Raises PoolFullError when a request cannot grow.
    """

    def __init__(self, pool_slots: int, page_size: int) -> None:
        self.page_size = page_size
        self._free = list(range(pool_slots // page_size))
        self._pages: dict[str, list[int]] = {}

    def slots(self, request_id: str) -> list[int]:
        return [
            p * self.page_size + i for p in self._pages.get(request_id, []) for i in range(self.page_size)
        ]

    def ensure(self, request_id: str, tokens: int) -> list[int]:
        """Grow ``request_id`` to hold ``tokens`` slots; returns its full slot list."""
        pages = self._pages.setdefault(request_id, [])
        need = -(-tokens // self.page_size) - len(pages)
        if need > len(self._free):
            raise PoolFullError(f"request {request_id!r} needs {need} more pages, {len(self._free)} free")
        for _ in range(max(0, need)):
            self._free.sort()
            pages.append(self._free.pop(0))
        return self.slots(request_id)

    def assign(self, request_id: str, layout: list[int | None]) -> list[int]:
        """Give ``request_id`` exactly these pages in this order (None: any free page); pages it held
        before and the layout does not name are freed. Returns its full slot list. Raises
        PoolFullError (and changes nothing) when a named page belongs to another request or too few
        pages are free."""
        mine = set(self._pages.get(request_id, []))
        named = [p for p in layout if p is not None]
        taken = [p for p in named if p not in mine and p not in self._free]
        if taken:
            raise PoolFullError(f"request {request_id!r}: pages {taken[:8]} are not free")
        spare = sorted((set(self._free) | mine) - set(named))
        if layout.count(None) > len(spare):
            raise PoolFullError(f"request {request_id!r} needs {layout.count(None)} more pages")
        fresh = iter(spare)
        pages = [p if p is not None else next(fresh) for p in layout]
        used = set(pages)
        self._free = [p for p in sorted(set(self._free) | mine) if p not in used]
        self._pages[request_id] = pages
        return self.slots(request_id)

    def free(self, request_id: str) -> None:
        self._free.extend(self._pages.pop(request_id, []))

    @property
    def free_pages(self) -> int:
        return len(self._free)
