"""What recovery needs of the driver (a Protocol the ReferenceEngine satisfies), so that recovery and
resilience, which the engine calls, never import the engine module back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ghostserve.engine import adapter
from ghostserve.engine.reference import cluster as cluster_mod
from ghostserve.engine.reference import records
from ghostserve.sidecar import client as client_mod


class Driver(Protocol):
    cluster: cluster_mod.Cluster | None
    opts: records.Options
    group: str
    sidecar: str
    client: client_mod.SidecarClient
    session: adapter.SidecarSession
    requests: dict[str, records.Request]
    needs_rebuild: list[bool]
    pending_lost: set[int]
    recoveries: list[records.RecoveryReport]
    counters: records.Counters
    on_recovered: Callable[[records.RecoveryReport], None] | None
    last_recovery_end: float

    def start(self) -> None: ...

    def resume_all(self) -> None: ...

    def hook(self, point: str) -> None: ...

    def replay(self, ranges: dict[str, list[tuple[int, int]]], *, commit: bool = False) -> int: ...

    def prefill_tokens_per_s(self) -> float: ...

    def replace_client(self, client: client_mod.SidecarClient) -> None: ...
