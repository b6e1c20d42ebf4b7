"""ghostserve.kernels: lossless erasure codes (xor, rdp, rs over GF(2^8)) for KV-cache shards.

Names are re-exported so that callers write `ghostserve.kernels.Codec(...)` as docs/contracts.md says,
but loaded on first use: `ghostserve.kernels.protection` (standard library only) must stay importable by
the operator without numpy, xxhash or a codec. torch and cupy load only with their backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ghostserve.kernels.checksums import checksum
    from ghostserve.kernels.codec import BACKENDS, CODES, Codec
    from ghostserve.kernels.errors import (
        BackendUnavailableError,
        CodecError,
        ShardCountError,
        ShardSizeError,
        ShardTypeError,
        TooFewShardsError,
    )
    from ghostserve.kernels.layout import KVLayout, gather_shard, scatter_shard

_HOME = {
    "BACKENDS": "codec",
    "CODES": "codec",
    "Codec": "codec",
    "BackendUnavailableError": "errors",
    "CodecError": "errors",
    "ShardCountError": "errors",
    "ShardSizeError": "errors",
    "ShardTypeError": "errors",
    "TooFewShardsError": "errors",
    "KVLayout": "layout",
    "gather_shard": "layout",
    "scatter_shard": "layout",
    "checksum": "checksums",
}

__all__ = [
    "BACKENDS",
    "CODES",
    "BackendUnavailableError",
    "Codec",
    "CodecError",
    "KVLayout",
    "ShardCountError",
    "ShardSizeError",
    "ShardTypeError",
    "TooFewShardsError",
    "checksum",
    "gather_shard",
    "scatter_shard",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
