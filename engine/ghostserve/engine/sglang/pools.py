"""sglang KV pools as GhostServe sees them: which pools can be protected, their layout, custody.

An MHATokenToKVPool in sglang's default NHD layout keeps, per layer, one fused tensor
[2][rows][heads][head_dim] (K half, V half) with rows = pool size + one padding page. That is the
contract's pool layout [layers][k|v][slots][heads][dim] with one buffer per layer instead of one for
all, so custody only has to hand sglang views of one sidecar-owned buffer instead of its own zeros.
"""

from __future__ import annotations

import logging
import mmap
from typing import Any

import torch
from ghostserve.engine import adapter
from ghostserve.kernels import layout as layout_mod
from ghostserve.sidecar import pools as sidecar_pools
from sglang.srt.mem_cache import memory_pool

log = logging.getLogger(__name__)

STORE_DTYPES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "float8",  # sglang stores fp8 KV as uint8 (index_put lacks fp8)
    torch.float32: "float32",
}
TORCH_DTYPES = {name: dtype for dtype, name in STORE_DTYPES.items()}


class UnsupportedPoolError(RuntimeError):
    """The KV pool cannot be protected by GhostServe; the message says why and what to change."""


class CustodyError(RuntimeError):
    """The pool could not be placed in the sidecar's custody (GPU pools, a mismatched handle)."""


def padded_slots(size: int, page_size: int) -> int:
    """Token rows sglang allocates per layer half: size + one padding page, rounded up to pages."""
    rows = size + page_size
    return -(-rows // page_size) * page_size


def is_plain_mha(pool: Any) -> bool:
    """True for sglang's MHATokenToKVPool itself (not a subclass, not a composite holding one)."""
    return type(pool) is memory_pool.MHATokenToKVPool


def describe(pool: Any) -> layout_mod.KVLayout:
    """The contract layout of an sglang KV pool. Mutates nothing.

    Raises UnsupportedPoolError for MLA pools (under plain TP every rank holds the same latent KV, so
    striping it across ranks protects nothing), quantized or FP4/MXFP8/page-major pools, HND or
    vectorized layouts and K/V of different widths.
    """
    if isinstance(pool, memory_pool.MLATokenToKVPool):
        raise UnsupportedPoolError(
            "MLA KV pool: under plain tensor parallelism its latent KV is identical on every rank, so "
            "there is no per-rank shard to stripe; GhostServe leaves it unprotected"
        )
    if not is_plain_mha(pool):
        raise UnsupportedPoolError(f"KV pool {type(pool).__name__} is not supported (only MHATokenToKVPool)")
    if getattr(pool, "kv_cache_layout", "nhd") != "nhd":
        raise UnsupportedPoolError(f"KV cache layout {pool.kv_cache_layout!r} is not supported (only 'nhd')")
    quant = getattr(pool, "quant_method", None)
    if quant is not None and not isinstance(quant, memory_pool.UnquantizedKVCacheMethod):
        name = getattr(quant, "name", quant)
        raise UnsupportedPoolError(f"quantized KV cache method {name!r} is not supported")
    if pool.head_dim != pool.v_head_dim:
        raise UnsupportedPoolError(f"K head dim {pool.head_dim} differs from V head dim {pool.v_head_dim}")
    dtype = STORE_DTYPES.get(pool.store_dtype)
    if dtype is None:
        raise UnsupportedPoolError(f"KV store dtype {pool.store_dtype} is not supported")
    return layout_mod.KVLayout(
        layers=pool.layer_num,
        kv_heads=pool.head_num,
        head_dim=pool.head_dim,
        dtype=dtype,
        page_size=pool.page_size,
        pool_slots=padded_slots(pool.size, pool.page_size),
    )


def take_custody(pool: Any, session: adapter.SidecarSession) -> adapter.AttachResult:
    """Allocate `pool`'s K/V buffers in sidecar custody instead of sglang's own zeros.

    Called in place of MHATokenToKVPool._create_buffers_normal: attaches the rank, maps its pool and
    sets `pool.k_buffer`/`pool.v_buffer` to per-layer views of it, exactly the shapes and strides
    sglang would have allocated. The mapping is kept on the pool (`_ghostserve_mapping`) so it lives
    as long as the views. Raises CustodyError for a non-CPU device or a handle that does not fit the
    layout, and adapter.AdapterError when the sidecar refuses the attach.
    """
    device = torch.device(pool.device)
    if device.type != "cpu":
        raise CustodyError(
            f"KV pool on {device}: GPU custody needs CUDA VMM pools exported by the sidecar "
            "(PoolHandle kind 'cuda'), which this GhostServe build does not implement yet. "
            "Unset GHOSTSERVE_SGLANG to let sglang allocate its own (unprotected) pool."
        )
    layout = session.layout
    result = session.attach()
    handle = result.pool
    if int(handle.nbytes) < layout.pool_nbytes or int(handle.row_bytes) != layout.row_bytes:
        raise CustodyError(
            f"sidecar pool of {handle.nbytes} bytes, rows of {handle.row_bytes} does not fit layout {layout}"
        )
    mapping, _ = sidecar_pools.map_pool(handle)
    pool._ghostserve_mapping = mapping
    pool.k_buffer, pool.v_buffer = layer_views(mapping, layout, rows=pool.size + pool.page_size)
    return result


def layer_views(
    buffer: mmap.mmap | bytearray | memoryview, layout: layout_mod.KVLayout, *, rows: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V tensors viewing `buffer` laid out as [layers][2][slots][heads][dim].

    `rows` (<= slots) is how many token rows sglang indexes; the rest is page padding. Raises
    ValueError when the buffer is smaller than the layout.
    """
    if rows > layout.pool_slots:
        raise ValueError(f"rows {rows} exceed the layout's {layout.pool_slots} slots")
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=layout.pool_nbytes)
    shaped = flat.view(TORCH_DTYPES[layout.dtype]).view(
        layout.layers, 2, layout.pool_slots, layout.kv_heads, layout.head_dim
    )
    keys = [shaped[i, 0, :rows] for i in range(layout.layers)]
    values = [shaped[i, 1, :rows] for i in range(layout.layers)]
    return keys, values


def pool_bytes(pool: Any) -> memoryview:
    """The bytes behind a pool in custody (for tests and the sidecar-side checks). Raises CustodyError."""
    mapping = getattr(pool, "_ghostserve_mapping", None)
    if mapping is None:
        raise CustodyError("pool is not in GhostServe custody")
    return memoryview(mapping)
