"""ghostserve.kernels: lossless erasure codes (xor, rdp, rs over GF(2^8)) for KV-cache shards.

Only numpy and xxhash are imported here; torch and cupy load with their backends. Names are re-exported
so that callers write `ghostserve.kernels.Codec(...)` as the contract in docs/contracts.md says.
"""

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
