"""Settings of one sidecar (from the command line or a test)."""

from __future__ import annotations

import dataclasses
import pathlib
import re

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "KI": 1024,
    "MI": 1024**2,
    "GI": 1024**3,
    "TI": 1024**4,
}


def parse_bytes(text: str) -> int:
    """'64GiB', '512MiB', '1G', '4096' -> bytes. Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a byte size: {text!r} (examples: 64GiB, 512MiB, 4096)")
    unit = (m.group(2) or "").upper()
    return int(float(m.group(1)) * _UNITS[unit])


@dataclasses.dataclass(frozen=True)
class Config:
    """budget_bytes: parity host-memory budget. state_dir: where the state file lives (pools are
    re-adopted from it after a restart; None = no re-adoption). spill_dir: parity + ledger records
    survive restarts there (None = parity lives in memory only). keep_pools: a graceful shutdown keeps
    pools, state and spill for the next start instead of freeing them."""

    budget_bytes: int = 1 << 30
    state_dir: pathlib.Path | None = None
    spill_dir: pathlib.Path | None = None
    keep_pools: bool = False
    encode_workers: int = 2
    queue_depth: int = 4096
    node: str = ""
    fake_gpus: int | None = None
    # A fake node's GPU directory (sidecar/fakegpu.py): per-node UUIDs, faults recorded on disk.
    fake_gpu_dir: pathlib.Path | None = None
    # Pools: all groups together, one group, and what /dev/shm must keep free after a new pool.
    max_pool_bytes: int | None = None  # None: no cap beyond /dev/shm's free space
    max_group_pool_bytes: int | None = None  # None: no per-group cap
    shm_headroom_bytes: int = 0
    shm_prefix: str = "gs-"  # segment names: prefix + 16 hex digits
    max_rebuild_streams: int = 4  # StreamRebuild calls served at once (each holds one shard)
    journal_compact_records: int = 4096  # rewrite a group's journal once it has this many stale lines
