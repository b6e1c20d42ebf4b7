"""What outlives the sidecar process: the state file (groups and their pool segments) and the optional
spill directory (parity + ledger record of every protected chunk).

Layout on disk:
  <state_dir>/sidecar-state.json                      groups, layouts, protection, segment names, generations
  <spill_dir>/<group key>/<request key>/<chunk>.json  request id, slots, token ids, checksums
  <spill_dir>/<group key>/<request key>/<chunk>.bin   the parity (or copies) of that chunk
Writes are atomic (temporary file + rename); a chunk counts only when its .json (written last) exists
and its .bin has the recorded size.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

STATE_FILE = "sidecar-state.json"


def key_of(text: str) -> str:
    """A short file-name-safe key for a group or request id."""
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _atomic_write(path: pathlib.Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_state(state_dir: pathlib.Path, state: dict[str, Any]) -> None:
    """Replace the state file with `state` (JSON-able)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    _atomic_write(state_dir / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())


def load_state(state_dir: pathlib.Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none (or it cannot be parsed: then nothing is adopted)."""
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_state(state_dir: pathlib.Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)


class Spill:
    """Parity + ledger records of protected chunks under one directory."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o750)

    def _dir(self, group: str, request_id: str) -> pathlib.Path:
        return self.root / key_of(group) / key_of(request_id)

    def write_chunk(
        self, group: str, request_id: str, index: int, *, parity: npt.NDArray[np.uint8], meta: dict[str, Any]
    ) -> None:
        d = self._dir(group, request_id)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / f"{index}.bin", parity.data)
        _atomic_write(
            d / f"{index}.json", json.dumps({**meta, "request_id": request_id, "index": index}).encode()
        )

    def delete_chunk(self, group: str, request_id: str, index: int) -> None:
        d = self._dir(group, request_id)
        (d / f"{index}.json").unlink(missing_ok=True)
        (d / f"{index}.bin").unlink(missing_ok=True)

    def delete_request(self, group: str, request_id: str) -> None:
        shutil.rmtree(self._dir(group, request_id), ignore_errors=True)

    def delete_group(self, group: str) -> None:
        shutil.rmtree(self.root / key_of(group), ignore_errors=True)

    def load_group(self, group: str) -> Iterator[tuple[dict[str, Any], pathlib.Path]]:
        """(meta, path of the parity file) of every complete chunk record of `group`."""
        base = self.root / key_of(group)
        if not base.is_dir():
            return
        for meta_path in sorted(base.glob("*/*.json")):
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                continue
            bin_path = meta_path.with_suffix(".bin")
            if bin_path.is_file() and bin_path.stat().st_size == meta.get("parity_nbytes"):
                yield meta, bin_path
