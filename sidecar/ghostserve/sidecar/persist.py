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


class Journal:
    """Append-only ledger journal per group in the state dir (`ledger-<group key>.jsonl`): one line per
    completed chunk (request, index, slots, token ids), released request and dropped chunk. Replayed at
    start so that, even without a spill dir, a restarted sidecar knows which chunks exist and reports
    them unprotected. Request token lists (RecordTokens) are not journaled."""

    def __init__(self, state_dir: pathlib.Path) -> None:
        self.dir = state_dir
        self._files: dict[str, Any] = {}

    def _path(self, group: str) -> pathlib.Path:
        return self.dir / f"ledger-{key_of(group)}.jsonl"

    def append(self, group: str, record: dict[str, Any]) -> None:
        f = self._files.get(group)
        if f is None:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            f = self._files[group] = open(self._path(group), "a", encoding="utf-8")  # noqa: SIM115
        f.write(json.dumps(record, separators=(",", ":")) + "\n")
        f.flush()  # a crash of the process (not of the node) keeps what the page cache has

    def load(self, group: str) -> list[dict[str, Any]]:
        """Records in order; a torn last line (crash mid-write) is ignored."""
        try:
            lines = self._path(group).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def rewrite(self, group: str, records: list[dict[str, Any]]) -> None:
        self.close(group)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        _atomic_write(self._path(group), body.encode())

    def delete(self, group: str) -> None:
        self.close(group)
        self._path(group).unlink(missing_ok=True)

    def close(self, group: str | None = None) -> None:
        for name in [group] if group is not None else list(self._files):
            f = self._files.pop(name, None) if name is not None else None
            if f is not None:
                f.close()
