"""cuda backend: the kernels of `codec_kernels.cu` through a CuPy RawModule, on cupy arrays or CUDA tensors.

Launches go to CuPy's current stream. Pointer arrays and per-matrix product tables are small device
arrays (tables cached per matrix); nothing is synchronised here except `equal`, which returns a bool.
torch CUDA tensors are wrapped through DLPack without copies.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence
from typing import Any

import cupy  # type: ignore[import-not-found,unused-ignore]
import numpy as np
import numpy.typing as npt
from ghostserve.kernels import errors, gf256
from ghostserve.kernels import layout as kvlayout

KERNELS = pathlib.Path(__file__).with_name("codec_kernels.cu")
THREADS = 256
MAX_ROWS = 8
MAX_SOURCES = 256


@functools.cache
def _module(device_id: int) -> Any:
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=KERNELS.read_text(), options=("-std=c++17",))


def _ptrs(views: Sequence[Any]) -> Any:
    return cupy.asarray(np.array([v.data.ptr for v in views], dtype=np.uint64))


def _aligned(views: Sequence[Any]) -> bool:
    return all(v.data.ptr % 16 == 0 for v in views)


class CudaBackend:
    name = "cuda"
    rdp_chunk_bytes = 1 << 40  # whole rows: one launch per schedule step
    gather_block_bytes = 256 * 1024 * 1024

    def __init__(self) -> None:
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:  # no driver at all
            count = 0
        if count < 1:
            raise errors.BackendUnavailableError("the cuda backend needs a CUDA GPU; none is visible")
        self._tables: dict[tuple[int, bytes], Any] = {}

    def as_bytes(self, buf: Any, *, what: str, writable: bool) -> Any:
        if isinstance(buf, cupy.ndarray):
            if not buf.flags.c_contiguous:
                raise errors.ShardTypeError(f"{what} must be C-contiguous")
            return buf.reshape(-1).view(cupy.uint8)
        if type(buf).__module__.split(".")[0] == "torch":
            if buf.device.type != "cuda":
                raise errors.ShardTypeError(f"{what} is on {buf.device}; the cuda backend needs GPU memory")
            if not buf.is_contiguous():
                raise errors.ShardTypeError(f"{what} must be contiguous")
            import torch

            flat = buf.detach().reshape(-1)
            if flat.numel() == 0:
                with cupy.cuda.Device(buf.device.index):
                    return cupy.empty(0, dtype=cupy.uint8)
            return cupy.from_dlpack(flat.view(torch.uint8))
        raise errors.ShardTypeError(
            f"{what} is a {type(buf).__name__} in host memory; "
            "the cuda backend needs cupy arrays or CUDA tensors"
        )

    def device(self, view: Any) -> str:
        return f"cuda:{view.device.id}"

    def empty(self, nbytes: int, *, like: Any) -> Any:
        with cupy.cuda.Device(like.device.id):
            return cupy.empty(nbytes, dtype=cupy.uint8)

    def _grid(self, nbytes: int) -> int:
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        work = max(1, (nbytes // 16 + THREADS - 1) // THREADS)
        return int(min(work, sms * 8))

    def _table(self, matrix: npt.NDArray[np.uint8]) -> Any:
        key = (cupy.cuda.Device().id, matrix.shape[0].to_bytes(2, "little") + matrix.tobytes())
        table = self._tables.get(key)
        if table is None:
            table = cupy.asarray(gf256.bit_products(matrix).reshape(-1))
            self._tables[key] = table
        return table

    def xor(self, out: Any, srcs: Sequence[Any]) -> None:
        n = int(out.shape[0])
        if n == 0:
            return
        with cupy.cuda.Device(out.device.id):
            for a in range(0, len(srcs), MAX_SOURCES - 1):
                # Beyond MAX_SOURCES sources, fold the partial result back in as the first source.
                part = (
                    list(srcs[a : a + MAX_SOURCES - 1]) if a == 0 else [out, *srcs[a : a + MAX_SOURCES - 1]]
                )
                kernel = _module(out.device.id).get_function("gs_xor")
                args = (
                    _ptrs(part),
                    np.int32(len(part)),
                    _ptrs([out]),
                    np.uint64(n),
                    np.int32(_aligned([out, *part])),
                )
                kernel((self._grid(n),), (THREADS,), args)

    def gf_combine(self, matrix: npt.NDArray[np.uint8], srcs: Sequence[Any], outs: Sequence[Any]) -> None:
        n = int(outs[0].shape[0])
        rows, k = matrix.shape
        if n == 0:
            return
        if k > MAX_SOURCES or rows > MAX_ROWS:
            raise errors.ShardCountError(
                f"the cuda kernels take at most {MAX_SOURCES} sources and {MAX_ROWS} rows"
            )
        with cupy.cuda.Device(outs[0].device.id):
            kernel = _module(outs[0].device.id).get_function(f"gs_gf_{rows}")
            args = (
                _ptrs(srcs),
                np.int32(k),
                _ptrs(outs),
                self._table(matrix),
                np.uint64(n),
                np.int32(_aligned([*srcs, *outs])),
            )
            kernel((self._grid(n),), (THREADS,), args, shared_mem=rows * k * 8)

    def equal(self, a: Any, b: Any) -> bool:
        return bool(cupy.array_equal(a, b))

    def gather(
        self, pool: Any, layout: kvlayout.KVLayout, rows: npt.NDArray[np.int64], start: int, out: Any
    ) -> None:
        def take(pool2d: Any, idx: npt.NDArray[np.int64], out2d: Any) -> None:
            cupy.take(pool2d, cupy.asarray(idx), axis=0, out=out2d)

        kvlayout.gather_range(pool, layout, rows, start, out, take=take)

    def encode_gather_fused(
        self,
        code: str,
        matrix: npt.NDArray[np.uint8] | None,
        pools: Sequence[Any],
        layout: kvlayout.KVLayout,
        slots: npt.NDArray[np.int64],
        parity: Sequence[Any],
    ) -> bool:
        """One kernel gathers from the pools and encodes (xor/rs). Returns False, doing nothing, when
        rows are not whole 16-byte vectors or a buffer is misaligned: the caller takes the blocked path."""
        size = int(parity[0].shape[0])
        if layout.row_bytes % 16 or not _aligned([*pools, *parity]) or size == 0 or len(pools) > MAX_SOURCES:
            return False
        with cupy.cuda.Device(parity[0].device.id):
            module = _module(parity[0].device.id)
            geometry = (
                np.uint32(layout.row_bytes // 16),
                np.uint32(slots.size),
                np.uint64(layout.pool_slots),
                cupy.asarray(slots.astype(np.int64)),
            )
            if code == "xor":
                xor_args = (_ptrs(pools), np.int32(len(pools)), _ptrs(parity), np.uint64(size), *geometry)
                module.get_function("gs_xor_gather")((self._grid(size),), (THREADS,), xor_args)
                return True
            assert matrix is not None
            rows, k = matrix.shape
            args = (_ptrs(pools), np.int32(k), _ptrs(parity), self._table(matrix), np.uint64(size), *geometry)
            module.get_function(f"gs_gf_gather_{rows}")(
                (self._grid(size),), (THREADS,), args, shared_mem=rows * k * 8
            )
        return True


def make() -> CudaBackend:
    return CudaBackend()
