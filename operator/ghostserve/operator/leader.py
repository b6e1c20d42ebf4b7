"""Lease-based leader election: of several `ghostserve operator` replicas only the Lease holder runs kopf.

The algorithm of client-go's leaderelection: the holder renews `spec.renewTime` every `retry`
seconds; a candidate takes the Lease over only after it has seen the same record (holder, renewTime)
unchanged for a whole `lease` duration, measured on its own monotonic clock (so clock skew between
nodes does not matter). Every write is conditional on the resourceVersion read before it (a JSON
patch `test` op), so two candidates can never both win. A holder that cannot renew within `deadline`
(< `lease`) stops acting at once: it exits, and the Deployment restarts it as a candidate. On a clean
shutdown the holder empties the Lease so a candidate takes over without waiting for it to expire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from ghostserve.operator import kube

log = logging.getLogger("ghostserve.operator.leader")


@dataclasses.dataclass(frozen=True)
class Settings:
    namespace: str
    name: str
    identity: str
    lease: float = 15.0  # a holder silent this long is presumed dead
    deadline: float = 10.0  # a holder that could not renew for this long gives up (must be < lease)
    retry: float = 2.0  # renew / re-check period

    def __post_init__(self) -> None:
        if not 0 < self.retry < self.deadline < self.lease:
            raise ValueError("leader election needs 0 < retry < deadline < lease")


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    """One candidate. `acquire()` returns once it holds the Lease; `hold()` returns when it lost it."""

    def __init__(self, api: kube.Kube, settings: Settings, *, clock: Callable[[], float] = time.monotonic):
        self.api, self.s, self.clock = api, settings, clock
        self._seen: tuple[Any, ...] | None = None  # (holder, renewTime, transitions) last observed
        self._seen_at = 0.0
        self._last_renew = 0.0
        self._rv: str | None = None

    def _spec(self, *, acquired: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.s.identity,
            "leaseDurationSeconds": max(1, round(self.s.lease)),
            "acquireTime": acquired,
            "renewTime": _micro_time(),
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards."""
        lease = await self.api.get_lease(self.s.namespace, self.s.name)
        now = self.clock()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.s.name, "namespace": self.s.namespace},
                "spec": self._spec(acquired=_micro_time(), transitions=0),
            }
            created = await self.api.create_lease(self.s.namespace, body)
            return self._won(created, now)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._seen:
            self._seen, self._seen_at = record, now
        rv = str(lease["metadata"]["resourceVersion"])
        if holder == self.s.identity:
            acquired = spec.get("acquireTime") or _micro_time()
            new = self._spec(acquired=acquired, transitions=int(record[2] or 0))
        elif holder and now - self._seen_at < self.s.lease:
            return False  # someone else holds it and renewed within the lease duration
        else:
            new = self._spec(acquired=_micro_time(), transitions=int(record[2] or 0) + 1)
        patched = await self.api.replace_lease_spec(self.s.namespace, self.s.name, rv, new)
        return self._won(patched, now)

    def is_current(self) -> bool:
        """This candidate renewed within the deadline (so no one else can have taken the Lease yet)."""
        return self._rv is not None and self.clock() - self._last_renew < self.s.deadline

    def _won(self, lease: dict[str, Any] | None, now: float) -> bool:
        if lease is None:
            return False
        self._last_renew = now
        self._rv = str(lease["metadata"]["resourceVersion"])
        return True

    async def acquire(self) -> None:
        """Wait until this candidate holds the Lease."""
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info("leader-elected", extra={"identity": self.s.identity, "lease": self.s.name})
                    return
            except kube.KubeError as exc:
                log.warning("leader-election-failed", extra={"error": str(exc)})
            await asyncio.sleep(self.s.retry * random.uniform(1.0, 1.2))

    async def hold(self) -> None:
        """Renew until a renewal has failed for `deadline` seconds (or the Lease was taken); then return."""
        while True:
            await asyncio.sleep(self.s.retry)
            try:
                if await self.try_acquire_or_renew():
                    continue
                log.error("lease-taken-over", extra={"lease": self.s.name})
                return
            except Exception as exc:  # API unreachable: keep trying until the deadline
                log.warning("lease-renew-failed", extra={"error": str(exc)})
            if self.clock() - self._last_renew >= self.s.deadline:
                log.error("lease-lost", extra={"lease": self.s.name, "deadline_s": self.s.deadline})
                return

    async def release(self) -> None:
        """Empty the Lease if this candidate still holds it (a clean shutdown hands over at once)."""
        if self._rv is None:
            return
        spec = {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _micro_time()}
        try:
            await self.api.replace_lease_spec(self.s.namespace, self.s.name, self._rv, spec)
        except kube.KubeError as exc:
            log.warning("lease-release-failed", extra={"error": str(exc)})
