"""Rebuilds never mark zeroed KV valid (issue 13 item 3).

A hypothesis state machine interleaves Commit, MarkLost, Rebuild (one phase at a time, so a MarkLost or
a restart can land between a rebuild's read and its write), Attach, Detach, Release and a sidecar
restart over several groups of a real custodian (real shared memory, real encode threads), and checks
after every step that whenever a group's ranks are all valid, every committed chunk's bytes on every
rank equal what the engine wrote. Before the fix a MarkLost during a rebuild left the rank marked valid
with chunks that were never rebuilt (the deterministic test below failed: needs_rebuild was False).
"""

from __future__ import annotations

import contextlib
import pathlib
import secrets
import shutil
import tempfile
from typing import Any

import kv
import numpy as np
import pytest
from ghostserve.sidecar import config, convert, custodian, errors, group, recovery, restore
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

N = 3
GROUPS = ("ga", "gb")
LAYOUT = convert.layout_from(kv.LAYOUT)
BLOCKS = LAYOUT.pool_slots // kv.CHUNK


def settings_for(code: str = "rs", m: int = 2) -> group.Settings:
    return group.Settings(N, LAYOUT, convert.protection_from(kv.protection(code, m), N))


def planes(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(LAYOUT.planes, LAYOUT.pool_slots, LAYOUT.row_bytes)


class RebuildRace(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="gs-race-"))
        self.prefix = f"gs-t{secrets.token_hex(3)}-"
        self.cfg = config.Config(
            budget_bytes=1 << 20,
            encode_workers=1,
            state_dir=self.dir / "state",
            spill_dir=self.dir / "spill",
            keep_pools=True,
            shm_prefix=self.prefix,
        )
        self.c = custodian.Custodian(self.cfg)
        self.rng = np.random.default_rng(0)
        self.ref = {g: np.zeros((N, LAYOUT.pool_nbytes), np.uint8) for g in GROUPS}
        self.blocks: dict[str, dict[str, list[int]]] = {g: {} for g in GROUPS}
        self.rebuilds: dict[str, Any] = {}
        for g in GROUPS:
            for r in range(N):
                self.c.attach(g, r, settings_for(), worker_id=f"w{r}")
            for rid in ("r0", "r1"):
                self.commit(g, rid)
        self.flush()

    def teardown(self) -> None:
        c = getattr(self, "c", None)
        if c is None:
            return
        for g in list(c.groups):
            c.delete_group(g)
        c.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        leaked = sorted(p.name for p in pathlib.Path("/dev/shm").glob(self.prefix + "*"))
        assert not leaked, leaked

    def pool(self, g: str, r: int) -> np.ndarray:
        seg = self.c.groups[g].ranks[r].segment
        assert seg is not None
        return seg.array

    def used(self, g: str) -> set[int]:
        return {b for bs in self.blocks[g].values() for b in bs}

    def write(self, g: str, rid: str, count: int) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
        """Write `count` new chunks of `rid` into every rank's pool (and the reference); their commits.
        Nothing is written while the group cannot take commits (a rank invalid or detached)."""
        grp = self.c.groups[g]
        free = sorted(set(range(BLOCKS)) - self.used(g))[:count]
        if not grp.healthy() or not all(rp.attached for rp in grp.ranks):
            return []
        items = []
        for block in free:
            slots = np.arange(block * kv.CHUNK, (block + 1) * kv.CHUNK, dtype=np.int64)
            index = len(self.blocks[g].setdefault(rid, []))
            self.blocks[g][rid].append(block)
            for r in range(N):
                data = self.rng.integers(0, 256, (LAYOUT.planes, kv.CHUNK, LAYOUT.row_bytes), dtype=np.uint8)
                planes(self.pool(g, r))[:, slots, :] = data
                planes(self.ref[g][r])[:, slots, :] = data
            items.append((rid, index, slots, np.zeros(0, np.int64)))
        return items

    @rule(g=st.sampled_from(GROUPS), rid=st.sampled_from(["r0", "r1", "r2"]))
    def commit(self, g: str, rid: str) -> None:
        for _, index, slots, tokens in self.write(g, rid, 1):
            for r in range(N):
                with contextlib.suppress(errors.ResourceExhausted):  # recorded, unprotected
                    self.c.commit_chunk(g, r, rid, index, slots=slots, token_ids=tokens)

    @rule(g=st.sampled_from(GROUPS), rid=st.sampled_from(["r0", "r1", "r2"]), count=st.integers(1, 3))
    def commit_batch(self, g: str, rid: str, count: int) -> None:
        """Several chunks per rank in one CommitChunks call (what the engines' sender sends)."""
        items = self.write(g, rid, count)
        for r in range(N) if items else ():
            for outcome in self.c.commit_chunks(g, r, items):
                # recorded, unprotected is the only error a well-formed commit may get
                assert not isinstance(outcome, Exception) or isinstance(outcome, errors.ResourceExhausted)

    @rule(g=st.sampled_from(GROUPS), ranks=st.sets(st.integers(0, N - 1), min_size=1, max_size=2))
    def mark_lost(self, g: str, ranks: set[int]) -> None:
        self.c.mark_lost(g, sorted(ranks), reason="test")

    @rule(g=st.sampled_from(GROUPS))
    def start_rebuild(self, g: str) -> None:
        grp = self.c.groups[g]
        lost = [r for r, rp in enumerate(grp.ranks) if not rp.valid]
        if not lost or g in self.rebuilds:
            return
        self.rebuilds[g] = recovery.Rebuilder(self.c, g, lost, request_ids=[], first_chunk={}).phases()

    @precondition(lambda self: bool(self.rebuilds))
    @rule(data=st.data(), phases=st.integers(1, 6))
    def rebuild_step(self, data: st.DataObject, phases: int) -> None:
        """Advance a rebuild by a few phases (prepare / write / publish of one chunk each)."""
        g = data.draw(st.sampled_from(sorted(self.rebuilds)))
        try:
            for _ in range(phases):
                next(self.rebuilds[g])
        except (StopIteration, errors.Aborted):
            del self.rebuilds[g]

    @rule(g=st.sampled_from(GROUPS), r=st.integers(0, N - 1), attach=st.booleans())
    def attach_detach(self, g: str, r: int, attach: bool) -> None:
        if attach:
            res = self.c.attach(g, r, settings_for(), worker_id=f"w{r}")
            assert res.needs_rebuild == (not self.c.groups[g].ranks[r].valid)
        else:
            self.c.detach(g, r)

    @rule(g=st.sampled_from(GROUPS), rid=st.sampled_from(["r0", "r1", "r2"]))
    def release(self, g: str, rid: str) -> None:
        try:
            self.c.release_request(g, rid)
        except errors.NotFound:
            return
        self.blocks[g].pop(rid, None)

    @rule()
    def flush(self) -> None:
        assert self.c.flush("", timeout=30)[0]

    @rule()
    def restart(self) -> None:
        """A graceful restart with --keep-pools: pools, state and spilled parity are adopted again."""
        self.c.close()
        self.rebuilds.clear()
        self.c = custodian.Custodian(self.cfg)
        restore.restore(self.c)
        for g in GROUPS:
            assert g in self.c.groups
            for r in range(N):
                self.c.attach(g, r, settings_for(), worker_id=f"w{r}")
            # The journal does not keep a request without chunks: forget its (empty) block list.
            known = self.c.groups[g].ledger.requests
            self.blocks[g] = {rid: b for rid, b in self.blocks[g].items() if rid in known or not b}

    @invariant()
    def valid_ranks_hold_what_was_written(self) -> None:
        if not hasattr(self, "c"):
            return
        for g in GROUPS:
            grp = self.c.groups[g]
            with grp.lock:
                if not grp.healthy():
                    continue
                for rid, req in grp.ledger.requests.items():
                    for ch in req.complete_chunks():
                        assert not ch.kv_lost, f"{g}/{rid}/{ch.index} marked lost in a healthy group"
                        for r in range(N):
                            got = planes(self.pool(g, r))[:, ch.slots, :]
                            want = planes(self.ref[g][r])[:, ch.slots, :]
                            assert np.array_equal(got, want), f"{g}/{rid}/{ch.index} rank {r} differs"


TestRebuildRace = RebuildRace.TestCase
TestRebuildRace.settings = settings(
    max_examples=12,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture
def cust(shm_prefix: str) -> Any:
    c = custodian.Custodian(config.Config(budget_bytes=1 << 20, encode_workers=1, shm_prefix=shm_prefix))
    yield c
    for g in list(c.groups):
        c.delete_group(g)
    c.close()


def test_mark_lost_during_a_rebuild_never_marks_the_rank_valid(cust: custodian.Custodian) -> None:
    """The issue's race, step by step: MarkLost of the rank being rebuilt, between chunks."""
    c = cust
    for r in range(N):
        c.attach("g", r, settings_for("xor", 1), worker_id="w")
    rng = np.random.default_rng(1)
    for idx in range(4):
        slots = np.arange(idx * kv.CHUNK, (idx + 1) * kv.CHUNK, dtype=np.int64)
        for r in range(N):
            seg = c.groups["g"].ranks[r].segment
            assert seg is not None
            planes(seg.array)[:, slots, :] = rng.integers(0, 256, (LAYOUT.planes, kv.CHUNK, LAYOUT.row_bytes))
            c.commit_chunk("g", r, "req", idx, slots=slots, token_ids=np.zeros(0, np.int64))
    assert c.flush("g", timeout=30)[0]
    c.mark_lost("g", [1], reason="fault")
    steps = recovery.Rebuilder(c, "g", [1], request_ids=[], first_chunk={}).phases()
    for _ in range(4):  # two chunks rebuilt (prepared, written, published each)
        next(steps)
    c.mark_lost("g", [1], reason="second fault")
    with pytest.raises(errors.Aborted, match="marked lost"):
        for _ in steps:
            pass
    assert not c.groups["g"].ranks[1].valid
    assert c.attach("g", 1, settings_for("xor", 1), worker_id="w").needs_rebuild
    report = recovery.rebuild(c, "g", [1], request_ids=[], first_chunk={})
    assert sorted(report.requests[0].rebuilt) == [0, 1, 2, 3]
    assert c.groups["g"].ranks[1].valid


@pytest.mark.slow
def test_rebuild_race_long_run() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        RebuildRace,
        settings=settings(
            max_examples=200,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
