"""Shard checksums (xxh3-64 of the raw bytes), recorded at encode time and checked after every rebuild."""

from __future__ import annotations

from typing import Any

import numpy as np
import xxhash
from ghostserve.kernels import cpu


def checksum(buf: Any) -> int:
    """xxh3-64 of `buf`'s bytes. Host buffers are hashed in place; CUDA tensors / cupy arrays are copied
    to the host first. Raises `ShardTypeError` for unsupported or non-contiguous buffers."""
    module = type(buf).__module__.split(".")[0]
    if module == "cupy":
        host = buf.reshape(-1).view("uint8").get()
    elif module == "torch" and buf.device.type != "cpu":
        host = cpu.host_bytes(buf.detach().cpu(), what="buffer", writable=False)
    else:
        host = cpu.host_bytes(buf, what="buffer", writable=False)
    return int(xxhash.xxh3_64_intdigest(np.ascontiguousarray(host).data))
