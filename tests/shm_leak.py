"""The /dev/shm leak check behind the `no_shm_leak` fixtures (tests/ is on sys.path via its conftest)."""

from __future__ import annotations

import contextlib
import pathlib
import re
from collections.abc import Iterator


@contextlib.contextmanager
def check(pattern: str = r"gs.*") -> Iterator[None]:
    """Fails if the block leaves new /dev/shm segments whose names fully match `pattern`."""
    shm = pathlib.Path("/dev/shm")

    def present() -> set[str]:
        return {p.name for p in shm.glob("gs*") if re.fullmatch(pattern, p.name)} if shm.exists() else set()

    before = present()
    yield
    leaked = present() - before
    assert not leaked, f"leaked shared memory segments: {sorted(leaked)}"
