"""The codec's error tree: every check that can fail has its own class, all of them `ValueError`s.

Every public codec method validates its whole input before it writes a byte, so catching one of these
means no output buffer was touched.
"""

from __future__ import annotations


class CodecError(ValueError):
    """Bad input to a codec or layout call; nothing was written."""


class ShardCountError(CodecError):
    """Wrong number of shards (or parity buffers, or pools) for this codec."""


class ShardSizeError(CodecError):
    """Shards of one stripe differ in byte size, or a buffer does not match the layout."""


class TooFewShardsError(CodecError):
    """More shards are lost than the code can rebuild."""


class ShardTypeError(CodecError):
    """A buffer is of an unsupported type, not contiguous, read-only, or on the wrong device."""


class BackendUnavailableError(CodecError):
    """The requested backend cannot run here (its library or a GPU is missing)."""
