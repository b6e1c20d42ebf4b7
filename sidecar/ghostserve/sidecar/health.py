"""GPU health: a `GpuHealthSource` interface, an NVML implementation (nvidia-ml-py) and a fake for tests,
plus `HealthHub`, which keeps the current state of every GPU and wakes watchers (asyncio.Condition) with
the events they have not seen yet.

Fatal kinds (device faults: KV on that GPU can no longer be trusted): Xid 48/63/64/74/79/92/94/95,
double-bit ECC, GPU lost. Retired pages and remapped rows are reported as warnings.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ghostserve.sidecar import errors

log = logging.getLogger("ghostserve.sidecar")

FATAL_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95})


class Kind(enum.IntEnum):
    """Values equal ghostserve.v1.HealthKind."""

    HEALTHY = 1
    XID = 2
    ECC_DOUBLE_BIT = 3
    RETIRED_PAGES = 4
    REMAPPED_ROWS = 5
    GPU_LOST = 6


def is_fatal(kind: Kind, xid: int = 0) -> bool:
    return kind in (Kind.ECC_DOUBLE_BIT, Kind.GPU_LOST) or (kind == Kind.XID and xid in FATAL_XIDS)


@dataclasses.dataclass(frozen=True)
class Event:
    gpu_index: int
    gpu_uuid: str
    kind: Kind
    xid: int = 0
    fatal: bool = False
    message: str = ""
    time: float = 0.0


Publish = Callable[[Event], None]


class GpuHealthSource(Protocol):
    """Where health events come from. `start` may call `publish` from any thread."""

    def gpus(self) -> list[tuple[int, str]]: ...

    def start(self, publish: Publish) -> None: ...

    def stop(self) -> None: ...

    def inject(self, gpu_index: int, kind: Kind, *, xid: int, message: str) -> Event:
        """The event to publish for an injected fault; raises a sidecar error where it is impossible."""
        ...


class FakeHealthSource:
    """N fake GPUs; `inject` raises an event (the InjectFault RPC and --fake-nvml use it)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._publish: Publish | None = None

    def gpus(self) -> list[tuple[int, str]]:
        return [(i, f"GPU-fake-{i:04d}") for i in range(self.count)]

    def start(self, publish: Publish) -> None:
        self._publish = publish

    def stop(self) -> None:
        self._publish = None

    def inject(self, gpu_index: int, kind: Kind, *, xid: int, message: str) -> Event:
        """Raises InvalidArgument for an unknown GPU or kind."""
        if not 0 <= gpu_index < self.count:
            raise errors.InvalidArgument(f"gpu {gpu_index} out of range [0, {self.count})")
        if kind not in set(Kind):
            raise errors.InvalidArgument(f"unknown health kind {int(kind)}")
        kind = Kind(kind)
        return Event(
            gpu_index, self.gpus()[gpu_index][1], kind, xid, is_fatal(kind, xid), message, time.time()
        )


class NvmlHealthSource:
    """NVML: Xid and double-bit ECC through an event set (a waiting thread), retired pages / remapped
    rows / GPU lost by polling every `poll_s` seconds in the same thread."""

    def __init__(self, *, poll_s: float = 5.0) -> None:
        import pynvml  # nvidia-ml-py; raises NVMLError when there is no driver

        self._nvml: Any = pynvml
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self._uuids = [str(pynvml.nvmlDeviceGetUUID(h)) for h in self._handles]
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[tuple[int, Kind], int] = {}

    def gpus(self) -> list[tuple[int, str]]:
        return list(enumerate(self._uuids))

    def inject(self, gpu_index: int, kind: Kind, *, xid: int, message: str) -> Event:
        raise errors.FailedPrecondition("fault injection needs the fake health backend (--fake-nvml N)")

    def start(self, publish: Publish) -> None:
        self._thread = threading.Thread(target=self._run, args=(publish,), name="nvml", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2 * self._poll_s)

    def _run(self, publish: Publish) -> None:
        nv = self._nvml
        event_set = nv.nvmlEventSetCreate()
        mask = nv.nvmlEventTypeXidCriticalError | nv.nvmlEventTypeDoubleBitEccError
        for h in self._handles:
            try:
                nv.nvmlDeviceRegisterEvents(h, mask, event_set)
            except nv.NVMLError as exc:
                log.warning("nvml-events-unavailable", extra={"error": str(exc)})
        try:
            while not self._stop.is_set():
                try:
                    data = nv.nvmlEventSetWait_v2(event_set, int(self._poll_s * 1000))
                    uuid = str(nv.nvmlDeviceGetUUID(data.device))
                    index = self._uuids.index(uuid) if uuid in self._uuids else 0
                    if data.eventType == nv.nvmlEventTypeDoubleBitEccError:
                        publish(self._event(index, Kind.ECC_DOUBLE_BIT, 0, "double-bit ECC error"))
                    else:
                        xid = int(data.eventData)
                        publish(self._event(index, Kind.XID, xid, f"Xid {xid}"))
                except nv.NVMLError_Timeout:
                    pass
                except nv.NVMLError as exc:
                    log.warning("nvml-event-wait-failed", extra={"error": str(exc)})
                self._poll(publish)
        finally:
            nv.nvmlEventSetFree(event_set)

    def _poll(self, publish: Publish) -> None:
        nv = self._nvml
        for i, h in enumerate(self._handles):
            try:
                nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
            except nv.NVMLError_GpuIsLost:
                self._once(publish, i, Kind.GPU_LOST, 1, "GPU fell off the bus")
                continue
            except nv.NVMLError:
                pass
            try:
                pages = len(
                    nv.nvmlDeviceGetRetiredPages(h, nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
                )
                self._once(publish, i, Kind.RETIRED_PAGES, pages, f"{pages} retired pages (DBE)")
            except nv.NVMLError:
                pass
            try:
                rows = nv.nvmlDeviceGetRemappedRows(h)
                self._once(
                    publish, i, Kind.REMAPPED_ROWS, int(rows[1]), f"{rows[1]} rows remapped (uncorrectable)"
                )
            except nv.NVMLError:
                pass

    def _once(self, publish: Publish, index: int, kind: Kind, count: int, message: str) -> None:
        if count and self._seen.get((index, kind), 0) < count:
            self._seen[(index, kind)] = count
            publish(self._event(index, kind, 0, message))

    def _event(self, index: int, kind: Kind, xid: int, message: str) -> Event:
        return Event(index, self._uuids[index], kind, xid, is_fatal(kind, xid), message, time.time())


class HealthHub:
    """Current state per GPU and a bounded history of events; watchers wait on a Condition."""

    def __init__(self, source: GpuHealthSource, *, on_event: Callable[[Event], None] | None = None) -> None:
        self.source = source
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond: asyncio.Condition | None = None
        self._history: collections.deque[Event] = collections.deque(maxlen=1024)
        self._seq = 0  # events ever published; history holds the last len(history) of them
        self._state: dict[int, Event] = {
            i: Event(i, uuid, Kind.HEALTHY, time=time.time()) for i, uuid in source.gpus()
        }
        self._on_event = on_event
        self.closed = False

    def start(self) -> None:
        """Bind to the running loop and start the source."""
        self._loop = asyncio.get_running_loop()
        self._cond = asyncio.Condition()
        self.source.start(self._publish_threadsafe)

    async def stop(self) -> None:
        self.source.stop()
        self.closed = True
        if self._cond:
            async with self._cond:
                self._cond.notify_all()

    def _publish_threadsafe(self, event: Event) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                loop.create_task(self._publish(event))
                return
        except RuntimeError:
            pass
        asyncio.run_coroutine_threadsafe(self._publish(event), loop)

    async def _publish(self, event: Event) -> None:
        assert self._cond is not None
        async with self._cond:
            self._state[event.gpu_index] = event
            self._history.append(event)
            self._seq += 1
            self._cond.notify_all()
        if self._on_event:
            self._on_event(event)

    def snapshot(self) -> list[Event]:
        return [self._state[i] for i in sorted(self._state)]

    def position(self) -> int:
        return self._seq

    async def wait_after(self, seq: int) -> tuple[list[Event], int]:
        """Events published after position `seq` (waits for at least one; empty when closing)."""
        assert self._cond is not None
        async with self._cond:
            await self._cond.wait_for(lambda: self._seq > seq or self.closed)
            if self.closed and self._seq <= seq:
                return [], seq
            missed = self._seq - seq
            events = list(self._history)[-min(missed, len(self._history)) :]
            return events, self._seq

    async def inject(self, gpu_index: int, kind: Kind, *, xid: int, message: str) -> None:
        """Publish a fake fault. Raises InvalidArgument (bad GPU/kind), FailedPrecondition (NVML)."""
        await self._publish(self.source.inject(gpu_index, kind, xid=xid, message=message))
