"""What one sidecar may hold: pool quotas (all groups, one group, /dev/shm headroom) and the memory the
ledger costs, which is counted in the parity budget (`store.ParityStore.charge`).

The ledger figures are estimates of what CPython + NumPy hold per record (array data plus object
overhead), erring high: they only have to keep the total within the budget, not account to the byte.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import numpy.typing as npt
from ghostserve.sidecar import errors

REQUEST_OVERHEAD = 512  # the Request object, its dicts and arrays' headers
CHUNK_OVERHEAD = 512  # a Chunk object, its committed set, two array headers


def request_bytes(tokens: npt.NDArray[np.int64]) -> int:
    """Ledger memory of a request with `tokens` recorded (chunks not included)."""
    return REQUEST_OVERHEAD + int(tokens.nbytes)


def chunk_bytes(slots: npt.NDArray[np.int64], token_ids: npt.NDArray[np.int64]) -> int:
    """Ledger memory of one chunk record."""
    return CHUNK_OVERHEAD + int(slots.nbytes) + int(token_ids.nbytes)


def check_pool_room(
    nbytes: int,
    *,
    held_total: int,
    held_group: int,
    max_total: int | None,
    max_group: int | None,
    headroom: int,
    shm_dir: pathlib.Path,
) -> None:
    """Raise ResourceExhausted unless a new pool of `nbytes` fits every quota and leaves `headroom`
    bytes free in `shm_dir` (other tenants of the node's /dev/shm keep working)."""
    if max_total is not None and held_total + nbytes > max_total:
        raise errors.ResourceExhausted(
            f"a pool of {nbytes} B exceeds --max-pool-bytes ({held_total} of {max_total} B held)"
        )
    if max_group is not None and held_group + nbytes > max_group:
        raise errors.ResourceExhausted(
            f"a pool of {nbytes} B exceeds the per-group pool quota ({held_group} of {max_group} B held)"
        )
    st = os.statvfs(shm_dir)
    free = st.f_bavail * st.f_frsize
    if nbytes + headroom > free:
        raise errors.ResourceExhausted(
            f"a pool of {nbytes} B does not fit in {shm_dir}: {free} B free, {headroom} B must stay free"
        )
