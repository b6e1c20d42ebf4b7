"""torch backend: plain PyTorch ops on CPU or CUDA tensors — the baseline the GhostServe paper compares to.

XOR is `torch.bitwise_xor` on int64 words (uint8 when a view is not word-aligned); the GF(2^8) multiply is
a gather from a 256x256 product table (`table[c][x]`), done in bounded chunks so memory stays small.
NumPy arrays and cupy arrays are wrapped without copies (`from_numpy`, DLPack).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from ghostserve.kernels import cpu, errors, gf256
from ghostserve.kernels import layout as kvlayout

# GF multiply works through an int64 index copy of the source: bound it.
GF_CHUNK = 8 * 1024 * 1024


@functools.cache
def _mul_table(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(gf256.mul_table().copy()).to(device)


def _words(t: torch.Tensor) -> torch.Tensor:
    """int64 view when size and address allow it, else the uint8 view itself."""
    if t.numel() % 8 == 0 and t.data_ptr() % 8 == 0:
        return t.view(torch.int64)
    return t


class TorchBackend:
    name = "torch"
    rdp_chunk_bytes = 1 << 40  # whole rows: each op is already a full pass
    gather_block_bytes = 64 * 1024 * 1024

    def as_bytes(self, buf: Any, *, what: str, writable: bool) -> torch.Tensor:
        if isinstance(buf, torch.Tensor):
            if not buf.is_contiguous():
                raise errors.ShardTypeError(f"{what} must be contiguous")
            flat = buf.detach().reshape(-1)
            return (
                flat.view(torch.uint8)
                if flat.numel()
                else torch.empty(0, dtype=torch.uint8, device=buf.device)
            )
        if type(buf).__module__.split(".")[0] == "cupy":
            if not buf.flags.c_contiguous:
                raise errors.ShardTypeError(f"{what} must be C-contiguous")
            return torch.from_dlpack(buf.reshape(-1).view("uint8"))
        host = cpu.host_bytes(buf, what=what, writable=writable)
        with warnings.catch_warnings():
            # Read-only inputs are only ever read; torch warns about them regardless.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(host)

    def device(self, view: torch.Tensor) -> str:
        return str(view.device)

    def empty(self, nbytes: int, *, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=like.device)

    def xor(self, out: torch.Tensor, srcs: Sequence[torch.Tensor]) -> None:
        views = [_words(t) for t in (out, *srcs)]
        if any(v.dtype != views[0].dtype for v in views):
            views = [out, *srcs]
        dst, first, rest = views[0], views[1], views[2:]
        if not rest:
            dst.copy_(first)
            return
        torch.bitwise_xor(first, rest[0], out=dst)
        for s in rest[1:]:
            dst.bitwise_xor_(s)

    def gf_combine(
        self, matrix: npt.NDArray[np.uint8], srcs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]
    ) -> None:
        n = outs[0].numel()
        if n == 0:
            return
        table = _mul_table(outs[0].device)
        for a in range(0, n, GF_CHUNK):
            b = min(a + GF_CHUNK, n)
            idx = [s[a:b].to(torch.int64) for s in srcs]
            for r, out in enumerate(outs):
                acc = torch.zeros(b - a, dtype=torch.uint8, device=out.device)
                for c, i in zip(matrix[r], idx, strict=True):
                    if c:
                        acc.bitwise_xor_(table[int(c)][i])
                out[a:b].copy_(acc)

    def equal(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(torch.equal(a, b))

    def gather(
        self,
        pool: torch.Tensor,
        layout: kvlayout.KVLayout,
        rows: npt.NDArray[np.int64],
        start: int,
        out: torch.Tensor,
    ) -> None:
        def take(pool2d: torch.Tensor, idx: npt.NDArray[np.int64], out2d: torch.Tensor) -> None:
            torch.index_select(
                pool2d, 0, torch.from_numpy(np.ascontiguousarray(idx)).to(pool2d.device), out=out2d
            )

        kvlayout.gather_range(pool, layout, rows, start, out, take=take)


def make() -> TorchBackend:
    return TorchBackend()
