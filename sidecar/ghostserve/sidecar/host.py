"""What the commit path and the encode job need from the custodian that runs them.

`commits` and `encode` are called by `custodian.Custodian` and act on its groups, store and queue;
they name this Protocol instead of the Custodian class so that the dependency points one way
(custodian -> commits -> host), with no import back to the caller. `Counters` lives here because the
encode job updates it and the custodian owns it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ghostserve.sidecar import config, group, ledger, metrics, persist, store, workqueue


@dataclasses.dataclass
class Counters:
    encode_bytes: int = 0
    encode_seconds: float = 0.0
    rebuild_bytes: int = 0
    rebuild_seconds: float = 0.0
    unprotected: int = 0  # chunks that completed without getting parity (cumulative)


class Host(Protocol):
    """The custodian as `commits` and `encode` see it (read-only members match plain attributes)."""

    @property
    def config(self) -> config.Config: ...
    @property
    def metrics(self) -> metrics.Metrics: ...
    @property
    def lock(self) -> AbstractContextManager[Any]: ...
    @property
    def groups(self) -> Mapping[str, group.Group]: ...
    @property
    def store(self) -> store.ParityStore: ...
    @property
    def queue(self) -> workqueue.WorkQueue: ...
    @property
    def spill(self) -> persist.Spill | None: ...
    @property
    def journal(self) -> persist.Journal | None: ...
    @property
    def counters(self) -> Counters: ...

    def locked(self, name: str) -> AbstractContextManager[group.Group]: ...
    def tokens_of(self, owner: Any) -> int: ...
    def on_evict(self, owner: Any, keys: list[Any]) -> None: ...
    def sync_gauges(self) -> None: ...
    def unprotect(self, chunk: ledger.Chunk, failure: ledger.Failure, reason: str) -> None: ...
