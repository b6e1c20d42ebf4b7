"""First-pass admission after an operator start (ghostserve.operator.firstpass): urgent deployments at
once, routine ones FIFO under the limit, a waiter that turns urgent jumps ahead; the asyncio gate
releases a turn when its loop stops. Ordering is observed through events, never through sleeps."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from ghostserve.operator import firstpass


def test_routine_first_come_first_served_under_the_limit() -> None:
    adm = firstpass.Admission(limit=2)
    for key in ("a", "b", "c", "d"):
        adm.request(key, urgent=False)
    assert adm.admit() == ["a", "b"]
    assert adm.admit() == []  # the limit holds until one finishes
    adm.finish("b")
    assert adm.admit() == ["c"]
    adm.finish("a")
    adm.finish("c")
    assert adm.admit() == ["d"]
    assert (adm.waiting(), adm.running()) == (0, 1)


def test_urgent_is_admitted_at_once_and_holds_routine_back() -> None:
    adm = firstpass.Admission(limit=1)
    adm.request("healthy-0", urgent=False)
    assert adm.admit() == ["healthy-0"]
    adm.request("healthy-1", urgent=False)
    adm.request("faulty", urgent=True)
    adm.request("healthy-2", urgent=False)
    assert adm.admit() == ["faulty"]  # over the limit: an urgent pass never waits
    adm.finish("healthy-0")
    assert adm.admit() == []  # the urgent pass counts as running: routine ones still wait
    adm.finish("faulty")
    assert adm.admit() == ["healthy-1"]


def test_promoted_waiter_jumps_ahead_of_earlier_routine_ones() -> None:
    adm = firstpass.Admission(limit=1)
    for key in ("a", "b", "c"):
        adm.request(key, urgent=False)
    assert adm.admit() == ["a"]
    adm.promote("c")
    assert adm.waiting(urgent=True) == 1
    assert adm.admit() == ["c"]
    adm.promote("zzz")  # unknown: ignored
    adm.request("c", urgent=False)  # already running: left as it is
    assert adm.waiting() == 1 and adm.running() == 2


def test_urgency_only_rises_and_finish_of_a_waiter_forgets_it() -> None:
    adm = firstpass.Admission(limit=1)
    adm.request("x", urgent=True)
    adm.request("x", urgent=False)
    assert adm.waiting(urgent=True) == 1
    adm.finish("x")  # its loop stopped while waiting
    assert adm.waiting() == 0 and adm.admit() == []


def test_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        firstpass.Admission(limit=0)


@pytest.mark.parametrize(
    ("status", "faulted", "want"),
    [
        ({}, False, False),
        ({"phase": "Serving", "inFlight": []}, False, False),
        ({"inFlight": [{"replica": 0, "step": "Detected"}]}, False, True),
        ({"recovery": {"step": "Detected"}}, False, True),
        ({"phase": "Serving"}, True, True),
    ],
)
def test_is_urgent(status: dict[str, object], faulted: bool, want: bool) -> None:
    assert firstpass.is_urgent(status, faulted=faulted) is want


def test_gate_faulty_deployment_starts_before_healthy_first_passes_finish() -> None:
    """Ten healthy loops and one whose fault arrives while it waits, limit 1: the faulty loop's pass
    starts while healthy ones are still waiting, and every healthy pass still runs, in order."""

    async def scenario() -> list[str]:
        gate = firstpass.Gate(limit=1)
        started: asyncio.Queue[str] = asyncio.Queue()  # each pass announces its start here
        fault = {"on": False}
        wakers = {f"h{i}": asyncio.Event() for i in range(10)} | {"faulty": asyncio.Event()}
        stopped = asyncio.Event()
        release = {key: asyncio.Event() for key in wakers}

        async def loop(key: str) -> None:
            urgent = await gate.turn(key, lambda: key == "faulty" and fault["on"], wakers[key], stopped)
            started.put_nowait(f"{key}{'!' if urgent else ''}")
            await release[key].wait()  # the pass "runs" until the test lets it end
            gate.done(key)

        tasks = [asyncio.create_task(loop(key)) for key in wakers]
        order = [await started.get()]
        assert order == ["h0"] and started.empty()
        fault["on"] = True
        wakers["faulty"].set()  # what a GPU event for its node does (Runtime.wake)
        order.append(await started.get())
        assert order == ["h0", "faulty!"] and gate.admission.waiting(urgent=False) == 9
        for event in release.values():
            event.set()
        await asyncio.gather(*tasks)
        while not started.empty():
            order.append(started.get_nowait())
        return order

    assert asyncio.run(scenario()) == ["h0", "faulty!", *(f"h{i}" for i in range(1, 10))]


def test_gate_stopped_waiter_releases_its_place() -> None:
    async def scenario() -> tuple[bool, int]:
        gate = firstpass.Gate(limit=1)
        never, stopped_a, stopped_b = asyncio.Event(), asyncio.Event(), asyncio.Event()
        assert await gate.turn("a", lambda: False, asyncio.Event(), never) is False
        waiting = asyncio.create_task(gate.turn("b", lambda: False, asyncio.Event(), stopped_b))
        await asyncio.sleep(0)  # let it register (the gate has no event for "now waiting")
        assert gate.admission.waiting() == 1
        stopped_b.set()  # the deployment was deleted (kopf stops its daemon) while it waited
        admitted_b = await waiting
        gate.done("b")
        gate.done("a")
        assert await gate.turn("c", lambda: False, asyncio.Event(), stopped_a) is False  # no slot leaked
        return admitted_b, gate.admission.running()

    assert asyncio.run(scenario()) == (False, 1)


def test_spec_essence_equals_kopfs_own() -> None:
    """The essence built without copying the status first is kopf's own, byte for byte (else kopf would
    see a spec change on every deployment after an upgrade of the operator)."""
    import kopf
    from ghostserve.operator import handlers

    raw: dict[str, Any] = {
        "apiVersion": "ghostserve.io/v1alpha1",
        "kind": "GhostServeDeployment",
        "metadata": {
            "name": "d",
            "namespace": "ns",
            "uid": "u",
            "resourceVersion": "7",
            "labels": {"team": "a"},
            "annotations": {"note": "x", "kopf.zalando.org/last-handled-configuration": "{}"},
        },
        "spec": {"engine": {"tensorParallel": 2, "args": ["--x"]}, "model": {"name": "m"}},
        "status": {"phase": "Serving", "ranks": [{"group": 0, "rank": r} for r in range(8)]},
    }
    body = kopf.Body(cast(kopf.RawBody, raw))
    ours = handlers.SpecEssence().build(body=body)
    theirs = kopf.AnnotationsDiffBaseStorage().build(body=body)
    assert ours == theirs and "status" not in ours and ours["spec"]["engine"]["args"] == ["--x"]
    assert raw["status"]["phase"] == "Serving"  # the body is left as it was
    # Pods and nodes are only watched (no handler compares their essence): none is built.
    pod = kopf.Body(cast(kopf.RawBody, {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"x": 1}}))
    assert handlers.SpecEssence().build(body=pod) == {}


@pytest.mark.parametrize(
    ("status", "want"),
    [({}, False), ({"sidecarGroups": []}, False), ({"phase": "Pending"}, True), ({"phase": "Serving"}, True)],
)
def test_only_deployments_an_operator_reconciled_before_wait_for_a_turn(
    status: dict[str, object], want: bool
) -> None:
    assert firstpass.waits_for_turn(status) is want
