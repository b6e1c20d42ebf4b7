"""`KVLayout` <-> `ghostserve.v1.KVLayout`."""

from __future__ import annotations

from typing import Any

from ghostserve.kernels import layout as kvlayout
from ghostserve.v1 import sidecar_pb2 as pb

# The proto's DType enum names each dtype in capitals (FLOAT16 = "float16"); a missing one fails at import.
DTYPE_IDS: dict[str, Any] = {name: pb.DType.Value(name.upper()) for name in kvlayout.ITEMSIZE}
DTYPES: dict[int, str] = {int(v): k for k, v in DTYPE_IDS.items()}


def layout_from(msg: pb.KVLayout) -> kvlayout.KVLayout:
    """Raises ValueError for an unset dtype or a size the layout cannot have."""
    if msg.dtype not in DTYPES:
        raise ValueError(f"layout.dtype must be set (got {msg.dtype})")
    return kvlayout.KVLayout(
        msg.layers, msg.kv_heads, msg.head_dim, DTYPES[msg.dtype], msg.page_size, msg.pool_slots
    )


def layout_to(lay: kvlayout.KVLayout) -> pb.KVLayout:
    return pb.KVLayout(
        layers=lay.layers,
        kv_heads=lay.kv_heads,
        head_dim=lay.head_dim,
        dtype=DTYPE_IDS[lay.dtype],
        page_size=lay.page_size,
        pool_slots=lay.pool_slots,
    )
