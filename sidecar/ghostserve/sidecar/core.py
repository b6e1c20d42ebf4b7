"""Former home of the custodian, kept so that old imports keep working: see `custodian`, `commits`
and `encode`."""

from __future__ import annotations

from ghostserve.sidecar.commits import chunk_record
from ghostserve.sidecar.custodian import AttachResult, Counters, Custodian

__all__ = ["AttachResult", "Counters", "Custodian", "chunk_record"]
