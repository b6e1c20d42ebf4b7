"""NVML health source against a stand-in NVML library (no GPU driver here), and the encode work queue."""

from __future__ import annotations

import queue
import sys
import threading
import types
from typing import Any

import pytest
from ghostserve.sidecar import errors, health, workqueue


class NVMLError(Exception):
    pass


class NVMLError_Timeout(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


def fake_pynvml(events: queue.Queue[tuple[str, int, int]], lost: threading.Event) -> types.ModuleType:
    """The subset of pynvml the source calls, backed by a queue of (uuid, event type, data)."""
    m: Any = types.ModuleType("pynvml")  # attributes set one by one below
    m.NVMLError, m.NVMLError_Timeout, m.NVMLError_GpuIsLost = (
        NVMLError,
        NVMLError_Timeout,
        NVMLError_GpuIsLost,
    )
    m.nvmlEventTypeXidCriticalError, m.nvmlEventTypeDoubleBitEccError = 8, 2
    m.NVML_TEMPERATURE_GPU, m.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 0, 1
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    m.nvmlEventSetCreate = lambda: "set"
    m.nvmlDeviceRegisterEvents = lambda h, mask, s: None
    m.nvmlEventSetFree = lambda s: None

    def wait(s: str, ms: int) -> types.SimpleNamespace:
        try:
            uuid, kind, data = events.get(timeout=ms / 1000)
        except queue.Empty:
            raise NVMLError_Timeout() from None
        return types.SimpleNamespace(device=uuid[4:], eventType=kind, eventData=data)

    def temperature(h: str, sensor: int) -> int:
        if h == "h1" and lost.is_set():
            raise NVMLError_GpuIsLost()
        return 40

    m.nvmlEventSetWait_v2 = wait
    m.nvmlDeviceGetTemperature = temperature
    m.nvmlDeviceGetRetiredPages = lambda h, cause: [0x1000] if h == "h0" else []
    m.nvmlDeviceGetRemappedRows = lambda h: (0, 0, 0, 0)
    return m


def test_nvml_source_reports_xid_ecc_retired_pages_and_lost_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    events: queue.Queue[tuple[str, int, int]] = queue.Queue()
    lost = threading.Event()
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(events, lost))
    src = health.NvmlHealthSource(poll_s=0.05)
    assert src.gpus() == [(0, "GPU-h0"), (1, "GPU-h1")]
    got: list[health.Event] = []
    cond = threading.Condition()

    def publish(e: health.Event) -> None:
        with cond:
            got.append(e)
            cond.notify_all()

    def wait_for(count: int) -> None:
        with cond:
            assert cond.wait_for(lambda: len(got) >= count, timeout=20), got

    src.start(publish)
    try:
        wait_for(1)  # gpu 0 has a retired page (reported once, not at every poll)
        events.put(("GPU-h1", 8, 79))
        wait_for(2)
        events.put(("GPU-h0", 2, 0))
        wait_for(3)
        lost.set()
        wait_for(4)
    finally:
        src.stop()
    kinds = [(e.gpu_index, e.kind, e.xid, e.fatal) for e in got[:4]]
    assert kinds == [
        (0, health.Kind.RETIRED_PAGES, 0, False),
        (1, health.Kind.XID, 79, True),
        (0, health.Kind.ECC_DOUBLE_BIT, 0, True),
        (1, health.Kind.GPU_LOST, 0, True),
    ]
    with pytest.raises(errors.FailedPrecondition):
        src.inject(0, health.Kind.XID, xid=79, message="")


def test_work_queue_refuses_when_full_waits_and_drops_on_close() -> None:
    gate = threading.Event()
    started = threading.Event()
    done: list[int] = []

    def blocker() -> None:
        started.set()
        gate.wait(30)
        done.append(0)

    q = workqueue.WorkQueue(workers=1, depth=1)
    assert q.submit("g", blocker)
    assert started.wait(30)
    assert q.submit("g", lambda: done.append(1))
    assert not q.submit("g", lambda: done.append(2))  # full: refused, never blocks
    assert q.pending("g") == 2 and q.pending() == 2
    assert not q.wait_idle("g", timeout=0.01)
    gate.set()
    assert q.wait_idle("g", timeout=30) and done == [0, 1]
    gate.clear()
    started.clear()
    assert q.submit("h", blocker) and started.wait(30)
    assert q.submit("h", lambda: done.append(3))
    closer = threading.Thread(target=q.close)
    closer.start()
    gate.set()
    closer.join(30)
    assert done == [0, 1, 0] and q.pending() == 0  # the queued job was dropped
