"""A fake node's GPUs kept in a directory (`--fake-gpu-dir`): the per-node stand-in for NVML.

The embedded cluster (docs/cluster.md) gives every simulated node its own directory:

- `gpus.json`: the node's GPUs, `[{"index": 0, "uuid": "GPU-..."}, ...]`, written before the sidecar starts;
- `faults/<uuid>.json`: a fatal fault injected on that GPU (InjectFault), written by the sidecar;
  injecting HEALTHY removes it (the GPU was replaced or reset).

The fault files are the broken hardware: engine ranks told about the directory (env
GHOSTSERVE_FAKE_GPU_DIR) fail on their next device call like on a real broken GPU, and a restarted
sidecar reports the GPU unhealthy again from them, as NVML would. Non-fatal events are not recorded.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import uuid as uuid_mod
from collections.abc import Sequence
from typing import Any

from ghostserve.sidecar import errors, health

INVENTORY = "gpus.json"
FAULTS = "faults"
ENV = "GHOSTSERVE_FAKE_GPU_DIR"


def make_uuids(node: str, count: int, *, namespace: str = "ghostserve") -> list[str]:
    """Stable, distinct NVML-style UUIDs for `count` GPUs of `node`."""
    base = uuid_mod.uuid5(uuid_mod.NAMESPACE_DNS, namespace)
    return [f"GPU-{uuid_mod.uuid5(base, f'{node}/{i}')}" for i in range(count)]


def write_inventory(directory: pathlib.Path, uuids: Sequence[str]) -> None:
    """Create `directory` with the GPU list (index order); clears no fault."""
    (directory / FAULTS).mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / INVENTORY, [{"index": i, "uuid": u} for i, u in enumerate(uuids)])


def read_inventory(directory: pathlib.Path) -> list[tuple[int, str]]:
    """(index, uuid) of every GPU. Raises InvalidArgument when the file is missing or malformed."""
    try:
        rows = json.loads((directory / INVENTORY).read_text())
        gpus = [(int(r["index"]), str(r["uuid"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise errors.InvalidArgument(f"fake GPU directory {directory}: bad {INVENTORY}: {exc}") from exc
    if [i for i, _ in gpus] != list(range(len(gpus))) or len({u for _, u in gpus}) != len(gpus):
        raise errors.InvalidArgument(f"fake GPU directory {directory}: indexes 0..n-1 with distinct uuids")
    return gpus


def fault_of(directory: pathlib.Path, gpu_uuid: str) -> dict[str, Any] | None:
    """The recorded fatal fault of a GPU, or None while it works."""
    try:
        found: dict[str, Any] = json.loads((directory / FAULTS / f"{gpu_uuid}.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"kind": "GPU_LOST", "message": "unreadable fault record"}
    return found


def _atomic_write(path: pathlib.Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class FakeGpuDirSource(health.FakeHealthSource):
    """GpuHealthSource over a fake GPU directory; fatal injections are recorded in it."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self._gpus = read_inventory(directory)
        super().__init__(len(self._gpus))

    def gpus(self) -> list[tuple[int, str]]:
        return list(self._gpus)

    def start(self, publish: health.Publish) -> None:
        """Publish the faults recorded before this start (the hardware stays broken across restarts)."""
        super().start(publish)
        for index, gpu_uuid in self._gpus:
            found = fault_of(self.directory, gpu_uuid)
            if found is not None:
                kind = health.Kind[str(found.get("kind", "GPU_LOST"))]
                xid = int(found.get("xid", 0))
                publish(
                    health.Event(
                        index,
                        gpu_uuid,
                        kind,
                        xid,
                        True,
                        str(found.get("message", "")),
                        float(found.get("time", time.time())),
                    )
                )

    def inject(self, gpu_index: int, kind: health.Kind, *, xid: int, message: str) -> health.Event:
        event = super().inject(gpu_index, kind, xid=xid, message=message)
        if event.kind == health.Kind.HEALTHY:
            (self.directory / FAULTS / f"{event.gpu_uuid}.json").unlink(missing_ok=True)
        elif event.fatal:
            record = {"kind": event.kind.name, "xid": event.xid, "message": event.message, "time": event.time}
            (self.directory / FAULTS).mkdir(parents=True, exist_ok=True)
            _atomic_write(self.directory / FAULTS / f"{event.gpu_uuid}.json", record)
        return event
