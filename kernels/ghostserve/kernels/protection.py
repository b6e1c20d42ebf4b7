"""Protection settings: the codes, how many parity shards each has, and what a stripe survives.

The one definition every component uses (the sidecar, the engines, the operator's spec checks and the
wire conversions). Standard library only: the operator imports it without numpy (kernels/__init__.py
loads the codec lazily for that reason).
"""

from __future__ import annotations

import dataclasses

# What a group can be protected with: no protection, full copies of every shard, or an erasure code.
CODES = ("none", "replicate", "xor", "rdp", "rs")
# The erasure codes `ghostserve.kernels.Codec` implements.
ERASURE_CODES = ("xor", "rdp", "rs")
# Codes whose parity count is fixed. none and replicate keep no parity shards (replicate keeps N copies
# instead): a parity count given for them is not used and reads back as 0.
FIXED_PARITY = {"none": 0, "replicate": 0, "xor": 1, "rdp": 2}
DEFAULT_RS_PARITY = 2
MAX_RS_PARITY = 8  # Cauchy RS over GF(2^8): more parity is possible but never worth its memory here
DEFAULT_CHUNK_TOKENS = 256


class ProtectionError(ValueError):
    """A protection setting that cannot work (unknown code, parity count the code does not have)."""


def resolve_parity(code: str, requested: int | None = None) -> int:
    """M for `code`: the fixed count of xor/rdp (a different `requested` is an error), 0 for none and
    replicate (`requested` ignored), `requested` for rs (None: DEFAULT_RS_PARITY). Raises ProtectionError."""
    if code not in CODES:
        raise ProtectionError(f"unknown code {code!r}; choose one of {', '.join(CODES)}")
    if requested is not None and (not isinstance(requested, int) or isinstance(requested, bool)):
        raise ProtectionError(f"parity_shards must be an int, got {requested!r}")
    if code in ("none", "replicate"):
        return 0
    if code in FIXED_PARITY:
        fixed = FIXED_PARITY[code]
        if requested not in (None, fixed):
            raise ProtectionError(f"{code} has exactly {fixed} parity shard(s), got {requested}")
        return fixed
    m = DEFAULT_RS_PARITY if requested is None else requested
    if not 1 <= m <= MAX_RS_PARITY:
        raise ProtectionError(f"rs needs 1..{MAX_RS_PARITY} parity shards, got {m}")
    return m


def tolerates(code: str, parity: int, lost: int, world_size: int) -> bool:
    """Whether a stripe of `world_size` data shards protected by `code` survives `lost` lost shards."""
    if code == "none":
        return False
    return lost <= (world_size if code == "replicate" else parity)


@dataclasses.dataclass(frozen=True, init=False)
class Protection:
    """How a group's KV is protected: `code` (one of CODES), M parity shards, T tokens per chunk.

    `parity_shards=None` means the code's default; the field always holds the resolved count.
    Raises ProtectionError (a ValueError) for settings that cannot work."""

    code: str
    parity_shards: int
    chunk_tokens: int

    def __init__(
        self, code: str = "xor", parity_shards: int | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> None:
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
            raise ProtectionError(f"chunk_tokens must be an int > 0, got {chunk_tokens!r}")
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "parity_shards", resolve_parity(code, parity_shards))
        object.__setattr__(self, "chunk_tokens", chunk_tokens)

    @property
    def m(self) -> int:
        """The parity count (an alias engines use)."""
        return self.parity_shards

    def stored_shards(self, world_size: int) -> int:
        """Shards of S bytes held per chunk: M parity shards, or N copies for replicate."""
        return world_size if self.code == "replicate" else self.parity_shards

    def tolerates(self, lost: int, world_size: int) -> bool:
        return tolerates(self.code, self.parity_shards, lost, world_size)
