"""Leader election logic with a fake clock over an in-memory Lease store that does what the API
server does with resourceVersion (a conditional write fails once anyone else wrote). The store is the
only stand-in: it plays the API server, which does not run here; the process-level behaviour is in
test_opsec_ha.py against the emulator."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from ghostserve.operator import leader


class LeaseStore:
    """The three Lease calls of kube.Kube, with optimistic concurrency on resourceVersion."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.lease)

    async def create_lease(self, namespace: str, lease: dict[str, Any]) -> dict[str, Any] | None:
        if self.lease is not None:
            return None
        self.rv += 1
        self.lease = copy.deepcopy(lease)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.lease)

    async def replace_lease_spec(
        self, namespace: str, name: str, resource_version: str, spec: dict[str, Any]
    ) -> dict[str, Any] | None:
        if self.lease is None or self.lease["metadata"]["resourceVersion"] != resource_version:
            return None
        self.rv += 1
        self.lease["spec"] = copy.deepcopy(spec)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.lease)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _elector(store: LeaseStore, clock: Clock, identity: str) -> leader.Elector:
    settings = leader.Settings(namespace="ns", name="l", identity=identity, lease=15, deadline=10, retry=2)
    return leader.Elector(store, settings, clock=clock)  # type: ignore[arg-type]


def test_only_one_candidate_wins_and_takeover_waits_a_full_lease() -> None:
    """The wait is measured on the candidate's clock from when it SAW the last change (clock skew
    between nodes cannot shorten it)."""

    async def scenario() -> None:
        store, clock = LeaseStore(), Clock()
        a, b = _elector(store, clock, "a"), _elector(store, clock, "b")
        assert await a.try_acquire_or_renew() is True
        assert await b.try_acquire_or_renew() is False
        assert a.is_current() and not b.is_current()
        clock.now += 5
        assert await a.try_acquire_or_renew() is True  # renewal
        assert await b.try_acquire_or_renew() is False  # b observes the renewal (its own clock starts)
        clock.now += 14  # b has seen a's last renewal for 14 s < 15 s: it must keep waiting
        assert await b.try_acquire_or_renew() is False
        assert not a.is_current()  # a has not renewed for 14 s > deadline: it must stop writing
        clock.now += 2
        assert await b.try_acquire_or_renew() is True  # 16 s without a renewal: b takes over
        assert store.lease is not None and store.lease["spec"]["leaseTransitions"] == 1
        assert store.lease["spec"]["holderIdentity"] == "b"
        assert await a.try_acquire_or_renew() is False  # a sees b and yields

    asyncio.run(scenario())


def test_a_stale_write_loses_the_race() -> None:
    """Two candidates that both read an expired Lease: only the first conditional write succeeds."""

    async def scenario() -> None:
        store, clock = LeaseStore(), Clock()
        old = _elector(store, clock, "old")
        assert await old.try_acquire_or_renew()
        a, b = _elector(store, clock, "a"), _elector(store, clock, "b")
        await a.try_acquire_or_renew()
        await b.try_acquire_or_renew()  # both observe the record now
        clock.now += 16
        results = [await a.try_acquire_or_renew(), await b.try_acquire_or_renew()]
        assert results == [True, False]

    asyncio.run(scenario())


def test_release_hands_over_at_once() -> None:
    async def scenario() -> None:
        store, clock = LeaseStore(), Clock()
        a, b = _elector(store, clock, "a"), _elector(store, clock, "b")
        assert await a.try_acquire_or_renew()
        await a.release()
        assert await b.try_acquire_or_renew() is True  # an empty holder needs no waiting

    asyncio.run(scenario())


def test_settings_must_order_retry_deadline_lease() -> None:
    with pytest.raises(ValueError, match="retry < deadline < lease"):
        leader.Settings(namespace="ns", name="l", identity="a", lease=10, deadline=10, retry=2)
