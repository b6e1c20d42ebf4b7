"""`Codec`: the public erasure-codec object. Validates every call completely, then hands byte views to
`codes` running on one backend.

Backends: "cpu" (NumPy + ISA-L where installed), "numpy" (NumPy only), "torch" (plain PyTorch ops, CPU or
CUDA tensors), "cuda" (CuPy RawModule kernels). torch and cupy are imported only when their backend is made.
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from ghostserve.kernels import backend as backend_mod
from ghostserve.kernels import codes, errors, protection
from ghostserve.kernels import layout as kvlayout

CODES = protection.ERASURE_CODES
BACKENDS = ("cpu", "numpy", "torch", "cuda")


def make_backend(name: str) -> backend_mod.Backend:
    """Build the named backend. Raises `CodecError` for an unknown name, `BackendUnavailableError` when
    its library (torch, cupy) or a GPU is missing."""
    if name == "cpu":
        from ghostserve.kernels import cpu

        return cpu.CpuBackend()
    if name == "numpy":
        from ghostserve.kernels import cpu

        return cpu.CpuBackend(use_isal=False)
    if name in ("torch", "cuda"):
        try:
            module = importlib.import_module(f"ghostserve.kernels.{name}_backend")
        except ImportError as exc:
            need = "torch" if name == "torch" else "cupy (pip install 'ghostserve[gpu]')"
            raise errors.BackendUnavailableError(f"backend {name!r} needs {need}: {exc}") from exc
        made: backend_mod.Backend = module.make()
        return made
    raise errors.CodecError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _check_counts(code: str, n_data: int, n_parity: int | None) -> int:
    if code not in CODES:
        raise errors.CodecError(f"unknown code {code!r}; choose one of {', '.join(CODES)}")
    if not isinstance(n_data, int) or isinstance(n_data, bool) or n_data < 1:
        raise errors.ShardCountError(f"n_data must be an int >= 1, got {n_data!r}")
    try:
        m = protection.resolve_parity(code, n_parity)
    except protection.ProtectionError as exc:
        raise errors.ShardCountError(str(exc)) from exc
    if n_data + m > 255:
        raise errors.ShardCountError(f"rs over GF(2^8) needs n_data + n_parity <= 255, got {n_data + m}")
    return m


def _shard_index(i: Any, n_shards: int) -> int:
    """`i` as a plain int shard index (numpy integers welcome); CodecError if it is not one."""
    try:
        idx = operator.index(i)
    except TypeError:
        idx = -1
    if isinstance(i, bool) or not 0 <= idx < n_shards:
        raise errors.CodecError(f"out index {i!r} is not a shard index in [0, {n_shards})")
    return idx


class Codec:
    """An erasure code over N data shards and M parity shards of equal byte size.

    Buffers are used by their raw bytes (any dtype; NaN payloads, -0.0 and subnormals survive). Every
    method validates all of its arguments before writing anything: on a `CodecError` no output changed.
    """

    def __init__(self, code: str, n_data: int, n_parity: int | None = None, *, backend: str = "cpu") -> None:
        self.n_parity = _check_counts(code, n_data, n_parity)
        self.code = code
        self.n_data = n_data
        self._be = make_backend(backend)

    @property
    def backend(self) -> str:
        """The backend actually running ("cpu" degrades to "numpy" without ISA-L)."""
        return self._be.name

    @property
    def n_shards(self) -> int:
        return self.n_data + self.n_parity

    def __repr__(self) -> str:
        return f"Codec({self.code!r}, {self.n_data}, {self.n_parity}, backend={self.backend!r})"

    def _views(self, bufs: Sequence[Any], *, role: str, first: int, writable: bool) -> list[Any]:
        return [
            self._be.as_bytes(b, what=f"{role} shard {first + i}", writable=writable)
            for i, b in enumerate(bufs)
        ]

    def _check_stripe(self, views: Mapping[int, Any]) -> int:
        """Common size and device of a stripe's views (keyed by shard index); raises on any mismatch."""
        items = list(views.items())  # the first entry is the reference: callers put survivors first
        idx0, v0 = items[0]
        size, dev = int(v0.shape[0]), self._be.device(v0)
        for idx, v in items[1:]:
            if int(v.shape[0]) != size:
                raise errors.ShardSizeError(
                    f"shard {idx} has {int(v.shape[0])} bytes but shard {idx0} has {size}: a stripe's shards "
                    "must be the same size"
                )
            if self._be.device(v) != dev:
                raise errors.ShardTypeError(
                    f"shard {idx} is on {self._be.device(v)} but shard {idx0} on {dev}"
                )
        return size

    def _check_list(self, bufs: Sequence[Any], count: int, role: str) -> None:
        if isinstance(bufs, str | bytes) or not isinstance(bufs, Sequence):
            raise errors.ShardCountError(
                f"{role} must be a list of {count} buffers, got {type(bufs).__name__}"
            )
        if len(bufs) != count:
            raise errors.ShardCountError(f"{role} has {len(bufs)} buffers, this codec needs {count}")

    def encode(self, data_shards: Sequence[Any], parity_out: Sequence[Any]) -> None:
        """Compute the M parity shards of the N `data_shards` into `parity_out` (mutated, preallocated)."""
        data, parity, size = self._stripe(data_shards, parity_out, "parity_out", writable=True)
        codes.encode(self.code, self._be, data, parity, size)

    def _stripe(
        self, data_shards: Sequence[Any], parity_shards: Sequence[Any], role: str, *, writable: bool
    ) -> tuple[list[Any], list[Any], int]:
        """Byte views of a whole stripe (N data + M parity shards) and its shard size, all checked."""
        self._check_list(data_shards, self.n_data, "data_shards")
        self._check_list(parity_shards, self.n_parity, role)
        data = self._views(data_shards, role="data", first=0, writable=False)
        parity = self._views(parity_shards, role="parity", first=self.n_data, writable=writable)
        return data, parity, self._check_stripe(dict(enumerate([*data, *parity])))

    def reconstruct(self, shards: Sequence[Any | None], out: Mapping[int, Any] | None = None) -> None:
        """Rebuild lost shards (None in `shards`, N + M entries) into the preallocated `out[i]` buffers.

        Every index in `out` must be a lost one; lost indices without an `out` buffer are not rebuilt
        (pass only the ones you need). Mutates only the `out` buffers. Raises `TooFewShardsError` if more
        than M shards are lost, `CodecError` if `out` names a present or out-of-range index or if shards are
        lost and `out` is empty.
        """
        self._check_list(shards, self.n_shards, "shards")
        lost = [i for i, s in enumerate(shards) if s is None]
        if len(lost) > self.n_parity:
            raise errors.TooFewShardsError(
                f"{len(lost)} shards are lost ({lost}); {self.code} with M={self.n_parity} rebuilds at most "
                f"{self.n_parity}"
            )
        out = {_shard_index(i, self.n_shards): buf for i, buf in (out or {}).items()}
        for i in out:
            if shards[i] is not None:
                raise errors.CodecError(
                    f"out[{i}] given but shard {i} is present: only lost shards are rebuilt"
                )
        if lost and not out:
            raise errors.CodecError(
                f"shards {lost} are lost: pass out={{index: buffer}} for those to rebuild"
            )
        views: dict[int, Any] = {}
        for i, s in enumerate(shards):
            if s is not None:
                role = "data" if i < self.n_data else "parity"
                views[i] = self._be.as_bytes(s, what=f"{role} shard {i}", writable=False)
        for i, buf in out.items():
            views[i] = self._be.as_bytes(buf, what=f"out[{i}]", writable=True)
        size = self._check_stripe(views)
        if not lost:
            return
        wanted = sorted(out)
        # RDP peels through every lost shard, so the ones nobody asked for get scratch; xor and rs build
        # only the wanted ones and never look at those placeholders.
        for i in lost:
            if i not in views:
                views[i] = self._be.empty(size if self.code == "rdp" else 0, like=next(iter(views.values())))
        full = [views[i] for i in range(self.n_shards)]
        codes.reconstruct(self.code, self._be, full, self.n_data, lost, size, wanted=wanted)

    def verify(self, data_shards: Sequence[Any], parity_shards: Sequence[Any]) -> bool:
        """True if `parity_shards` is the encoding of `data_shards`. Mutates nothing (uses scratch)."""
        data, parity, size = self._stripe(data_shards, parity_shards, "parity_shards", writable=False)
        fresh = [self._be.empty(size, like=parity[0]) for _ in parity]
        codes.encode(self.code, self._be, data, fresh, size)
        return all(self._be.equal(a, b) for a, b in zip(fresh, parity, strict=True))

    def encode_gather(
        self,
        pools: Sequence[Any],
        layout: kvlayout.KVLayout,
        slots: Any,
        parity_out: Sequence[Any],
        *,
        checksums_out: list[int] | None = None,
    ) -> None:
        """Encode the chunk at `slots` of the N rank `pools` straight into `parity_out` (mutated).

        Each pool is one rank's whole pool buffer (`layout.pool_nbytes` bytes, any dtype); the shards are
        gathered a cache-sized block at a time, never packed whole. With `checksums_out` (a list, replaced
        in place) it also returns each data shard's xxh3-64 (= `checksum` of the gathered shard), hashed
        block by block while the block is in cache where it can. Raises `ShardSizeError` if a pool or
        parity buffer does not match the layout, `CodecError` for bad slots.
        """
        if not isinstance(layout, kvlayout.KVLayout):
            raise errors.CodecError(f"layout must be a KVLayout, got {type(layout).__name__}")
        self._check_list(pools, self.n_data, "pools")
        self._check_list(parity_out, self.n_parity, "parity_out")
        slot_arr = kvlayout.check_slots(layout, slots)
        size = layout.shard_nbytes(slot_arr.size)
        pool_views = [self._be.as_bytes(p, what=f"pool {i}", writable=False) for i, p in enumerate(pools)]
        for i, v in enumerate(pool_views):
            if int(v.shape[0]) != layout.pool_nbytes:
                raise errors.ShardSizeError(
                    f"pool {i} has {int(v.shape[0])} bytes, layout needs {layout.pool_nbytes}"
                )
        parity = self._views(parity_out, role="parity", first=self.n_data, writable=True)
        for i, v in enumerate(parity):
            if int(v.shape[0]) != size:
                raise errors.ShardSizeError(
                    f"parity shard {self.n_data + i} has {int(v.shape[0])} bytes, "
                    f"{slot_arr.size} slots need {size}"
                )
        devices = {self._be.device(v) for v in [*pool_views, *parity]}
        if len(devices) > 1:
            raise errors.ShardTypeError(f"pools and parity must be on one device, got {sorted(devices)}")
        codes.encode_gather(
            self.code, self._be, pool_views, layout, slot_arr, parity, size, checksums_out=checksums_out
        )
