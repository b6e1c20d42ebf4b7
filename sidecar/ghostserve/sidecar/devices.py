"""Which rank a GPU belongs to: ranks give their GPU's UUID at Attach, health events carry a UUID.

Pure (no locks, no gRPC): the caller holds the custodian's lock while it reads the groups.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ghostserve.sidecar import errors, group

# NVML UUIDs look like GPU-8f1c...-...; MIG devices MIG-...; fakes GPU-fake-0001.
UUID = re.compile(r"[A-Za-z0-9._:-]{0,128}")


def check_uuid(uuid: str) -> None:
    """Raises InvalidArgument for a device UUID that no driver would report."""
    if not UUID.fullmatch(uuid):
        raise errors.InvalidArgument(f"device_uuid must match [A-Za-z0-9._:-]{{0,128}}, got {uuid[:64]!r}")


def rank_of(groups: Mapping[str, group.Group], uuid: str) -> tuple[str, int] | None:
    """(group, rank) attached with `uuid`, or None when no rank holds it (or uuid is empty).

    When several ranks name the same GPU (a group left behind by a replica that moved away, whose
    worker died without detaching), the rank attached now wins over a detached one, and the latest
    attach over an earlier one: that is the rank running on the GPU."""
    if not uuid:
        return None
    best: tuple[tuple[bool, int], str, int] | None = None
    for name, g in groups.items():
        for r, rp in enumerate(g.ranks):
            if rp.device_uuid != uuid:
                continue
            key = (rp.attached, rp.attach_seq)
            if best is None or key > best[0]:
                best = (key, name, r)
    return None if best is None else (best[1], best[2])
