"""Protection settings <-> `ghostserve.v1.Protection` (no numpy: the operator imports this).

proto3 cannot tell an unset `parity_shards` from 0, so 0 on the wire means "the code's default"
(xor 1, rdp 2, rs 2; none and replicate keep no parity shards).
"""

from __future__ import annotations

from typing import Any

from ghostserve.kernels import protection
from ghostserve.v1 import sidecar_pb2 as pb

# The proto's Code enum names each code in capitals (XOR = "xor"); a code without one fails at import.
CODE_IDS: dict[str, Any] = {name: pb.Code.Value(name.upper()) for name in protection.CODES}
CODES: dict[int, str] = {int(v): k for k, v in CODE_IDS.items()}


def protection_from(msg: pb.Protection) -> protection.Protection:
    """Raises ValueError (ProtectionError) for an unset or unknown code, or a parity count the code lacks."""
    if msg.code not in CODES:
        raise protection.ProtectionError(f"protection.code must be set (got {msg.code})")
    return protection.Protection(CODES[msg.code], msg.parity_shards or None, msg.chunk_tokens)


def protection_to(p: protection.Protection) -> pb.Protection:
    return pb.Protection(code=CODE_IDS[p.code], parity_shards=p.parity_shards, chunk_tokens=p.chunk_tokens)
