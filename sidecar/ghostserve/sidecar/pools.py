"""KV-pool custody on the CPU: named POSIX shared memory, created by the sidecar, mapped by workers.

The sidecar owns every segment (creates, wipes, unlinks it); workers only map it. Workers map the
/dev/shm file with mmap directly instead of attaching through `multiprocessing.shared_memory`, whose
resource tracker unlinks an attached segment when the attacher dies (docs/design.md §11): a worker killed
with SIGKILL must lose nothing. Segment names start with `gs` (the test suite checks /dev/shm for leaks).

GPU custody (CUDA VMM allocations exported as shareable handles) is a different `PoolHandle.kind`
("cuda"); the `Custody` protocol below is the seam it plugs into. Only "cpu" exists in this build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import pathlib
import re
import secrets
import stat
from typing import Any, Protocol

import numpy as np
from ghostserve.sidecar import errors

SHM_DIR = pathlib.Path("/dev/shm")
PREFIX = "gs-"
_NAME = re.compile(r"^gs[A-Za-z0-9._-]{1,200}$")


@dataclasses.dataclass(frozen=True)
class PoolInfo:
    """Where a pool lives; mirrors the proto's PoolHandle (kept proto-free for the pure modules)."""

    kind: str
    shm_name: str
    nbytes: int
    row_bytes: int
    generation: int


class Segment:
    """One shared-memory segment mapped into this process: `array` is a writable uint8 view of it."""

    def __init__(self, name: str, mm: mmap.mmap, nbytes: int) -> None:
        self.name = name
        self.nbytes = nbytes
        self._mmap: mmap.mmap | None = mm
        self.array: np.ndarray = np.frombuffer(mm, dtype=np.uint8, count=nbytes)

    def close(self) -> None:
        """Drop this process's mapping. Views handed out earlier keep the memory mapped until they die."""
        mm, self._mmap = self._mmap, None
        self.array = np.zeros(0, dtype=np.uint8)
        if mm is not None:
            # A numpy view (an encode in flight, a test) may still export the buffer; the mapping then
            # goes away when the last view is garbage collected.
            with contextlib.suppress(BufferError):
                mm.close()

    def unlink(self) -> None:
        """Remove the name from /dev/shm (the memory is freed once no process maps it) and close."""
        discard(self.name)
        self.close()


def discard(name: str) -> None:
    """Remove a segment name from /dev/shm (a link is removed, never followed)."""
    if _NAME.match(name):
        (SHM_DIR / name).unlink(missing_ok=True)


class Custody(Protocol):
    """Creates and re-adopts the memory behind pools; one implementation per `PoolHandle.kind`."""

    kind: str

    def create(self, nbytes: int) -> Segment: ...

    def adopt(self, name: str, nbytes: int) -> Segment: ...


def check_prefix(prefix: str) -> str:
    """Segment-name prefixes start with `gs` (leak checks and operators look for gs*)."""
    if not re.fullmatch(r"gs[A-Za-z0-9._-]{0,40}", prefix):
        raise errors.InvalidArgument(
            f"shared-memory prefix must match gs[A-Za-z0-9._-]{{0,40}}, got {prefix!r}"
        )
    return prefix


class CpuCustody:
    """POSIX shared memory under /dev/shm, mode 0660 (the socket's group may map pools)."""

    kind = "cpu"

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = check_prefix(prefix)

    def create(self, nbytes: int) -> Segment:
        """Create a new zero-filled segment. Raises ResourceExhausted when /dev/shm cannot hold it."""
        if nbytes <= 0:
            raise errors.InvalidArgument(f"pool size must be positive, got {nbytes}")
        name = self.prefix + secrets.token_hex(8)
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
        try:
            os.fchmod(fd, 0o660)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                path.unlink()
                raise errors.ResourceExhausted(
                    f"cannot allocate a {nbytes}-byte pool in {SHM_DIR}: {exc}"
                ) from exc
            # MAP_POPULATE: pay the page-table faults now (attach, MarkLost), not during a rebuild.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return Segment(name, mm, nbytes)

    def adopt(self, name: str, nbytes: int) -> Segment:
        """Map an existing segment (after a sidecar restart). Raises NotFound if it is gone or too small,
        FailedPrecondition if it is not one this sidecar could have made (not a regular file, a link,
        another owner, or a mode beyond 0660): the caller discards it rather than trust its bytes."""
        return Segment(name, *_map(name, nbytes, owner=os.geteuid()))


def _map(name: str, nbytes: int, *, owner: int | None = None) -> tuple[mmap.mmap, int]:
    if not _NAME.match(name):
        raise errors.InvalidArgument(f"not a ghostserve segment name: {name!r}")
    try:
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise errors.NotFound(f"shared memory segment {name} does not exist") from exc
    except OSError as exc:  # ELOOP: a symbolic link sits under the name
        raise errors.FailedPrecondition(f"segment {name} is not a regular file: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.FailedPrecondition(f"segment {name} is not a regular file")
        if owner is not None and (st.st_uid != owner or stat.S_IMODE(st.st_mode) & ~0o660):
            raise errors.FailedPrecondition(
                f"segment {name} has owner {st.st_uid} and mode {oct(stat.S_IMODE(st.st_mode))}, "
                f"expected {owner} and at most 0660"
            )
        size = st.st_size
        if nbytes <= 0 or size < nbytes:
            raise errors.NotFound(f"segment {name} holds {size} bytes, expected {nbytes}")
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return mm, nbytes


def map_pool(handle: Any) -> tuple[mmap.mmap, np.ndarray]:
    """Map a pool for a worker: `handle` is a PoolHandle (proto) or PoolInfo.

    Returns (mmap, uint8 numpy view of the whole pool); keep the mmap alive as long as the view. The
    segment is never registered with multiprocessing's resource tracker, so the worker dying (even by
    SIGKILL) leaves the pool intact. Raises sidecar errors (InvalidArgument for a non-cpu handle,
    NotFound for a missing segment).
    """
    if handle.kind != CpuCustody.kind:
        raise errors.InvalidArgument(f"map_pool maps cpu pools only, got kind {handle.kind!r}")
    mm, nbytes = _map(handle.shm_name, int(handle.nbytes))
    return mm, np.frombuffer(mm, dtype=np.uint8, count=nbytes)


def custody_for(kind: str, *, prefix: str = PREFIX) -> Custody:
    """The custody implementation for a pool kind. Raises FailedPrecondition for kinds this build lacks."""
    if kind == CpuCustody.kind:
        return CpuCustody(prefix)
    raise errors.FailedPrecondition(f"pool kind {kind!r} is not available in this build (cpu only)")
