"""Compatibility re-export: the checksums are defined once, in ghostserve.kernels.checksums.

Import them from there; this module goes once nothing imports it (docs/design.md, "One definition").
"""

from ghostserve.kernels.checksums import checksum, runs, shard_checksum

__all__ = ["checksum", "runs", "shard_checksum"]
