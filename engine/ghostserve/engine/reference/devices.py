"""The reference rank's GPU, as far as a CPU engine has one: a seam that fails like a broken device.

The reference engine computes on the CPU, so a GPU fault cannot break it by itself. In the embedded
cluster (docs/cluster.md) every rank is given a GPU UUID (NVIDIA_VISIBLE_DEVICES, rank i = i-th
entry) and its node's fake GPU directory (env GHOSTSERVE_FAKE_GPU_DIR); `Device.check()` raises
`DeviceError` once a fatal fault is recorded for that GPU, which a rank calls before every step, so a
rank on a broken GPU exits with a device error as a CUDA call would fail. Outside the cluster (no
directory) the check is a no-op.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping

from ghostserve.sidecar import fakegpu

VISIBLE = "NVIDIA_VISIBLE_DEVICES"
# Exit status of a rank whose device failed (distinct from a gloo peer loss, which exits 3).
EXIT_DEVICE_ERROR = 4


class DeviceError(RuntimeError):
    """The rank's GPU took a fatal fault: nothing on it can be trusted any more."""


def visible_uuids(env: Mapping[str, str]) -> list[str]:
    """GPU UUIDs the device plugin gave the container, in order ("", "all", "none", "void": none)."""
    raw = env.get(VISIBLE, "").strip()
    if raw in {"", "all", "none", "void"}:
        return []
    return [u.strip() for u in raw.split(",") if u.strip()]


@dataclasses.dataclass(frozen=True)
class Device:
    """The GPU of one rank: its UUID ("" when unknown) and the fake GPU directory, if any."""

    uuid: str = ""
    fake_dir: pathlib.Path | None = None

    @classmethod
    def for_rank(cls, rank: int, env: Mapping[str, str] | None = None) -> Device:
        env = os.environ if env is None else env
        uuids = visible_uuids(env)
        fake = env.get(fakegpu.ENV)
        return cls(uuids[rank] if rank < len(uuids) else "", pathlib.Path(fake) if fake else None)

    def check(self) -> None:
        """Raises DeviceError when this GPU took a fatal fault."""
        if self.fake_dir is None or not self.uuid:
            return
        fault = fakegpu.fault_of(self.fake_dir, self.uuid)
        if fault is not None:
            detail = f"Xid {fault['xid']}" if fault.get("xid") else str(fault.get("kind"))
            raise DeviceError(f"GPU {self.uuid}: {detail}: {fault.get('message', '')}".rstrip(": "))
