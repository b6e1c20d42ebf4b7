"""Test data: KV-like shards with every special float bit pattern, as raw bytes."""

from __future__ import annotations

import numpy as np
from ghostserve.kernels.layout import ITEMSIZE as KV_ITEMSIZE

ITEMSIZE = {"uint8": 1, **KV_ITEMSIZE}  # the KV dtypes, plus plain bytes

# NaN with payload bits, quiet and signalling NaN, +-0, +-inf, smallest and largest subnormals.
SPECIALS: dict[str, list[int]] = {
    "uint8": [0x00, 0xFF],
    "float8": [0x7F, 0xFF, 0x00, 0x80, 0x01, 0x07, 0x7E],
    "float16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE5A, 0x0001, 0x83FF],
    "bfloat16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFAB, 0x0001, 0x807F],
    "float32": [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC0DEAD, 1, 0x807FFFFF],
}
_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def shard_bytes(rng: np.random.Generator, dtype: str, nbytes: int) -> np.ndarray:
    """`nbytes` random bytes (a multiple of the dtype's size) with special values sprinkled in."""
    size = ITEMSIZE[dtype]
    words = rng.integers(0, 1 << (8 * size), nbytes // size, dtype=np.uint64).astype(_WORD[size])
    if words.size:
        specials = np.array(SPECIALS[dtype], dtype=_WORD[size])
        where = rng.random(words.size) < 0.2
        words[where] = rng.choice(specials, int(where.sum()))
    return words.view(np.uint8)


def typed(raw: np.ndarray, dtype: str, backend: str) -> object:
    """`raw` bytes as a buffer of `dtype` for `backend` (numpy has no bfloat16: uint16 words there)."""
    if backend in ("torch",):
        import torch

        tdt = {
            "uint8": torch.uint8,
            "float8": torch.float8_e4m3fn,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float32": torch.float32,
        }[dtype]
        if raw.size == 0:  # torch cannot re-view an empty byte tensor as a wider dtype
            return torch.empty(0, dtype=tdt)
        return torch.from_numpy(raw.copy()).view(tdt)
    if backend == "cuda":
        import cupy

        ndt = {
            "uint8": "uint8",
            "float8": "uint8",
            "float16": "float16",
            "bfloat16": "uint16",
            "float32": "float32",
        }
        return cupy.asarray(raw).view(ndt[dtype])
    ndt2 = {
        "uint8": np.uint8,
        "float8": np.uint8,
        "float16": np.float16,
        "bfloat16": np.uint16,
        "float32": np.float32,
    }
    return raw.copy().view(ndt2[dtype])


def to_backend(arr: np.ndarray, backend: str) -> object:
    """A copy of `arr` in the memory the backend works on (host numpy / torch CPU / cupy on the GPU)."""
    if backend == "cuda":
        import cupy

        return cupy.asarray(arr)
    if backend == "torch":
        import torch

        return torch.from_numpy(arr.copy())
    return arr.copy()


def to_host(buf: object) -> np.ndarray:
    """Raw bytes of any buffer as a flat uint8 numpy array."""
    module = type(buf).__module__.split(".")[0]
    if module == "cupy":
        return buf.reshape(-1).view("uint8").get()  # type: ignore[attr-defined]
    if module == "torch":
        import torch

        return buf.detach().cpu().reshape(-1).view(torch.uint8).numpy().copy()  # type: ignore[attr-defined]
    return np.asarray(buf).reshape(-1).view(np.uint8).copy()


def empty_like_backend(nbytes: int, backend: str, fill: int = 0xA5) -> object:
    return to_backend(np.full(nbytes, fill, dtype=np.uint8), backend)
